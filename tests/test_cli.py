"""The pancls command line itself: wiring shared by every subcommand."""
from __future__ import annotations

import pytest

from pancls.cli import COMMANDS, main


@pytest.mark.parametrize("command, prefix", [("lt", "--epoch"), ("ingest", "--lab"), ("check", "--no-im")])
def test_an_option_prefix_is_not_taken_for_the_option(command, prefix, capsys, tmp_path):
    argv = {"lt": ["lt", "--out", str(tmp_path / "r"), prefix, "1"], "ingest": ["ingest", str(tmp_path), "--out", str(tmp_path / "o"), prefix, "x"],
            "check": ["check", str(tmp_path / "m.csv"), prefix]}[command]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_check_is_a_command():
    assert COMMANDS["check"][0] == "pancls.commands.check"
