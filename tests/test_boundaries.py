"""Command-line boundary checks (issue 14): each bad argument is one line on stderr and exit 2, before any work."""
from __future__ import annotations

import pytest
import torch

from pancls.cli import main


def _fails(capsys, argv, *expected):
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    for text in expected:
        assert text in err[0], err
    return err[0]


def test_ingest_out_that_cannot_be_written(ct_data, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _fails(capsys, ["ingest", str(ct_data / "jpeg2000"), "--out", str(blocker / "out"), "--no-progress"],
           "cannot write into the output folder")


def test_ingest_config_not_utf8(ct_data, tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("selection:\n  exclude_description: 'r\xe9sum\xe9'\n".encode("latin-1"))
    _fails(capsys, ["ingest", str(ct_data / "jpeg2000"), "--out", str(tmp_path / "out"), "--config", str(config)],
           "not UTF-8")


def test_ingest_config_with_the_old_salt_is_refused(ct_data, tmp_path, capsys):
    config = tmp_path / "salt.yaml"
    config.write_text("patient_salt: abc\n")
    _fails(capsys, ["ingest", str(ct_data / "jpeg2000"), "--out", str(tmp_path / "out"), "--config", str(config)],
           "patient_salt is gone")


def test_lt_out_is_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("x")
    _fails(capsys, ["lt", "--out", str(blocker), "--data", str(tmp_path / "none.npz"), "--device", "cpu"],
           "exists and is not a folder")


def test_lt_device_is_checked_even_in_a_dry_run(tmp_path, capsys):
    _fails(capsys, ["lt", "--out", str(tmp_path / "r"), "--dry-run", "--device", "tpu"],
           "config.device: unknown device 'tpu' (did you mean 'cpu'?); choose one of: auto, cpu, cuda")
    if not torch.cuda.is_available():
        _fails(capsys, ["lt", "--out", str(tmp_path / "r"), "--dry-run", "--device", "cuda"], "no CUDA device")


def test_lt_eval_batch_size_zero(tmp_path, capsys):
    _fails(capsys, ["lt", "--out", str(tmp_path / "r"), "--dry-run", "--set", "eval_batch_size=0"],
           "config.eval_batch_size: must be an integer >= 1, got 0")


@pytest.mark.parametrize("flags, expected", [
    (["--scale", "inf"], "--scale"),
    (["--scale", "nan"], "--scale"),
    (["--spacing", "1", "nan", "1"], "--spacing"),
    (["--spacing", "1", "inf", "1"], "--spacing"),
])
def test_synth_non_finite_numbers(tmp_path, capsys, flags, expected):
    _fails(capsys, ["synth", "--out", str(tmp_path / "s"), "--no-progress", *flags], expected)
    assert not (tmp_path / "s").exists()  # no synth.json with NaN in it


def test_synth_into_a_folder_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _fails(capsys, ["synth", "--out", str(blocker / "s"), "--scale", "0.01", "--no-progress"], "cannot write")
