"""What several subcommands share: the recipe a command starts from (the config keys that hold file paths, made
absolute before a run, are :data:`pancls.config.PATH_KEYS`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def starting_recipe(config: Optional[Path], resume: bool, stored: Path, default: Optional[Path] = None) -> dict:
    """The config mapping a training command starts from, before its flags: ``--config`` when given; with
    ``--resume`` and no ``--config``, the run's own resolved config ``stored`` when it exists, so that a run
    resumes as it was started whatever the defaults are now (nnU-Net's "the experiment is a folder"; flags that
    would change it are then refused by the resume check); else ``default`` (a packaged recipe), or nothing."""
    from pancls.config import load_yaml

    if config is not None:
        return load_yaml(config)
    if resume and Path(stored).is_file():
        return load_yaml(stored)
    return load_yaml(default) if default is not None else {}
