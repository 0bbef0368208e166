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


@pytest.mark.parametrize("command", ["lt", "cv"])
def test_set_with_a_space_names_the_form_to_type(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([command, "--out", str(tmp_path / "r"), "--set", "train.lr", "0.05"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines()[-1].startswith(f"pancls {command}: error: argument --set")
    assert "argument --set: expected KEY=VALUE as one word, got 'train.lr': write --set train.lr=VALUE" in err
    assert "unrecognized arguments" not in err
    with pytest.raises(SystemExit):
        main([command, "--out", str(tmp_path / "r"), "--set", "train.lr=", "0.05"])
    assert "nothing after '=' in 'train.lr=': write --set train.lr=VALUE" in capsys.readouterr().err


def test_set_key_value_still_parses():
    from pancls.cli import build_parser

    args = build_parser().parse_args(["lt", "--out", "r", "--set", "train.lr=0.05", "--set=model.head=cosine"])
    assert args.overrides == ["train.lr=0.05", "model.head=cosine"]


def test_lt_help_shows_the_real_defaults(capsys):
    """--help names LTConfig's defaults without importing torch; they must not drift apart."""
    from pancls.commands.lt import DEFAULTS
    from pancls.lt import LTConfig

    cfg = LTConfig()
    for key, value in DEFAULTS.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    with pytest.raises(SystemExit):
        main(["lt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs N training epochs (default: the recipe's train.epochs, else 200)" in text
    assert "--seed N seed of initialisation, sampling and augmentation (default: the recipe's train.seed, else 0)" in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_has_a_typical_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "``" not in out  # written for a terminal, not reStructuredText
    assert f"pancls {command} " in out.split("options:")[0].split("\n", 2)[-1]  # an example before the options


def test_top_level_help_lists_the_workflow(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "pancreatic tumour subtypes" in out and "typical use:" in out
    assert out.index("\n    ingest ") < out.index("\n    check ") < out.index("\n    predict ")


def test_ingest_config_error_names_the_file_then_the_key(capsys, tmp_path):
    """Issue 18: '<file>: <section>: unknown key(s) ...', a space after the file name's colon."""
    config = tmp_path / "bad.yaml"
    config.write_text("selection:\n  min_slice: 3\n")
    (tmp_path / "src").mkdir()
    code = main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"pancls ingest: error: {config}: selection: unknown key(s) 'min_slice'; known: ")


@pytest.mark.parametrize("command", ["cv", "lt"])
def test_head_help_names_every_registered_head(command, capsys):
    """--head's help is written without importing torch; it must not fall behind the registry."""
    from pancls.heads import HEADS

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    described = text.split("options:", 1)[1].split("--head ", 1)[1].split(" --", 1)[0]
    missing = [name for name in HEADS.names() if name not in described]
    assert not missing, f"pancls {command} --help does not name head(s) {missing}"
