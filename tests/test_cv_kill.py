"""`pancls cv` killed from outside (issue 14): SIGKILL while a fold trains, then --resume, gives the run an
uninterrupted one gives, bit for bit, and leaves no temporary file; SIGTERM ends it promptly, non-zero, clean.

The commands run as subprocesses on the tiny synthetic recipe of tests/conftest.py (TINY_CV); each process
pays torch/MONAI's import (~10 s on a busy 2-core box), so the SIGKILL round trip is marked slow."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pancls.config import dump_yaml
from pancls.io import is_temp_name


@pytest.fixture(scope="module")
def recipe(tiny_cv_config_factory, cohort, tmp_path_factory):
    """The tiny recipe as a YAML file (its preprocessing cache, outside the run folders, is shared by the runs)."""
    from pancls import cv

    tmp = tmp_path_factory.mktemp("cv_kill")
    cfg = tiny_cv_config_factory(cohort, tmp)
    path = tmp / "tiny.yaml"
    dump_yaml(cfg, path)
    return path, cfg, cv


def _start(recipe_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pancls", "cv", "--config", str(recipe_path), "--out", str(out),
                             "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc: subprocess.Popen, fold_dir: Path, timeout: float = 120.0) -> None:
    """Until the first epoch of the fold is on disk (its metrics line is written after its checkpoint)."""
    deadline = time.monotonic() + timeout
    metrics = fold_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().strip():
            return
        if proc.poll() is not None:
            raise AssertionError(f"pancls cv ended (rc {proc.returncode}) before training:\n{proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no epoch finished in time")


def _temps(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if is_temp_name(p.name))


@pytest.mark.slow
def test_sigkill_while_a_fold_trains_then_resume_is_bit_identical(recipe, tmp_path):
    path, cfg, cv = recipe
    reference = tmp_path / "reference"
    cv.run(cfg, reference, log=lambda _: None)  # uninterrupted, in this process (the same code path)

    out = tmp_path / "killed"
    proc = _start(path, out)
    _wait_for_training(proc, out / "fold_0")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "fold_0" / "fold.json").exists() and not (out / "summary.json").exists()  # killed mid-fold
    # a SIGKILL inside an atomic write leaves its temporary file: put one wherever such a write happens
    for folder, name in ((out / "fold_0", ".last.pt.0a1b2c3d.tmp.pt"), (out, ".splits.json.0a1b2c3d.tmp.json"),
                         (out / "configs", ".config.yaml.0a1b2c3d.tmp.yaml")):
        (folder / name).write_bytes(b"half")
    assert len(_temps(out)) == 3

    resumed = subprocess.run([sys.executable, "-m", "pancls", "cv", "--config", str(path), "--out", str(out),
                              "--device", "cpu", "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _temps(out) == [] and _temps(reference) == []
    assert (out / "oof_predictions.csv").read_bytes() == (reference / "oof_predictions.csv").read_bytes()
    for k in range(cfg.cv.folds):
        assert (out / f"fold_{k}" / "predictions.csv").read_bytes() == \
            (reference / f"fold_{k}" / "predictions.csv").read_bytes()
    assert _without_timing(_summary(out)) == _without_timing(_summary(reference))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _without_timing(node):
    """summary.json minus its wall-clock facts (seconds, images/s)."""
    if isinstance(node, dict):
        return {k: _without_timing(v) for k, v in node.items() if "seconds" not in k and k != "images_per_s"}
    if isinstance(node, list):
        return [_without_timing(v) for v in node]
    return node


def test_sigterm_exits_promptly_non_zero_and_leaves_no_temporary_file(recipe, tmp_path):
    path, _, _ = recipe
    out = tmp_path / "terminated"
    proc = _start(path, out)
    _wait_for_training(proc, out / "fold_0")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10, "SIGTERM took too long to end the run"
    assert proc.returncode == 130 and "pancls cv: interrupted" in err  # unwound: finally blocks ran
    assert "Traceback" not in err
    assert _temps(out) == []
    assert not (out / "fold_0" / "fold.json").exists()
