import sys

from pancls.cli import main

sys.exit(main())
