"""`pancls lt` end to end: dry run on the real CIFAR-10 copy, and one clear line for every bad input."""
import json
import subprocess
import sys

import pytest

from pancls.cli import main


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_one_json_line(cifar10_npz, tmp_path, capsys):
    code, out, err = _run(["lt", "--dataset", "cifar10", "--imbalance-ratio", "100", "--head", "tsp",
                           "--data", str(cifar10_npz), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert info["n_train"] == 12406
    assert info["class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert 0.40e6 < info["parameters"] < 0.55e6  # ResNet-32 + a 128-d tSP head
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "cifar10", "--imbalance-ratio", "0.5"], "imbalance_ratio"),
        (["--dataset", "svhn"], "svhn"),
        (["--dataset", "cifar10", "--head", "nonsense"], "unknown head 'nonsense'"),
        (["--dataset", "cifar10", "--loss", "nonsense"], "unknown loss 'nonsense'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, cifar10_npz, tmp_path, capsys):
    code, out, err = _run(["lt", *argv, "--data", str(cifar10_npz), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err


def test_missing_and_corrupt_archives(tmp_path, capsys):
    code, _, err = _run(["lt", "--data", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2 and "nope.tar.gz" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    code, _, err = _run(["lt", "--data", str(bad), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2 and "cifar-10-python.tar.gz" in err and len(err.strip().splitlines()) == 1


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "pancls", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "lt" in proc.stdout and "ingest" in proc.stdout
