"""The commands themselves under ``torchrun`` (2 CPU processes, gloo): ``pancls lt`` and ``pancls cv`` end to end.

tests/test_distributed.py drives :func:`pancls.train.engine.fit` directly and checks the numbers (losses and
weights against one process). Here the question is the command a user types, ``torchrun --nproc-per-node 2 -m
pancls ...``: it must exit 0, print its result once (rank 0), write the same run folder one process writes (no
file twice, no file missing, one metrics line per epoch, every evaluation row once), and resume a finished run
as a no-op. The numbers are not compared with one process: the 2D and 3D ResNets have BatchNorm, which each
rank computes on its half batch (test_distributed shows that this differs by design; train.sync_bn is CUDA only).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[1]


def _pancls(env: dict, *argv: str, procs: int) -> subprocess.CompletedProcess:
    """``pancls ARGV`` in ``procs`` processes (torchrun) or in one (plain ``python -m pancls``)."""
    if procs > 1:
        if not TORCHRUN.exists():
            pytest.skip("torchrun is not installed beside this interpreter")
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(procs), "-m", "pancls", *argv]
    else:
        cmd = [sys.executable, "-m", "pancls", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def _tree(root: Path) -> list:
    """Every file under ``root``, relative, less TensorBoard's event files (their names carry host and pid)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "events.out" not in p.name)


def _no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.suffix == ".tmp" or p.name.startswith(".tmp")]


# --------------------------------------------------------------------------------------------------- pancls lt
def test_pancls_lt_under_torchrun_writes_the_one_process_run_folder(tiny_lt_factory, tmp_path, process_env):
    root, train, val = tiny_lt_factory(tmp_path / "lists", (12, 6, 3, 3), 2)

    def argv(out: Path, *extra: str) -> list:
        return ["lt", "--config", str(REPO / "configs" / "imagenet_lt_resnet10.yaml"), "--dataset", "imagenet_lt",
                "--data", str(root), "--set", f"data.train_list={train}", "--set", f"data.eval_list={val}",
                "--set", "data.num_classes=4", "--out", str(out), "--epochs", "2", "--device", "cpu",
                "--set", "model.backbone_kwargs.widen_factor=0.25", "--set", "model.head_kwargs.dim=16",
                "--set", "images.crop_size=32", "--set", "images.resize=36", "--set", "images.workers=0",
                "--set", "train.batch_size=8", "--set", "eval_batch_size=4", "--set", "train.warmup_epochs=0",
                "--set", "train.progress=false", *extra]

    one, two = tmp_path / "one", tmp_path / "two"
    _pancls(process_env, *argv(one), procs=1)
    done = _pancls(process_env, *argv(two), procs=2)
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 alone prints the result
    assert _tree(two) == _tree(one)
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 2  # one line per epoch, not one per rank
    results = json.loads((two / "results.json").read_text())
    assert results["epochs"] == 2 and results["class_counts"] == [12, 6, 3, 3]
    assert printed[0]["top1"] == results["top1"]
    _no_temporaries(two)

    again = _pancls(process_env, *argv(two, "--resume"), procs=2)  # finished: a no-op that prints the same result
    assert [json.loads(line)["top1"] for line in again.stdout.splitlines() if line.startswith("{")] == [
        results["top1"]]
    assert json.loads((two / "results.json").read_text())["top1"] == results["top1"]


# --------------------------------------------------------------------------------------------------- pancls cv
def _rows(path: Path) -> list:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_pancls_cv_under_torchrun_evaluates_every_patient_once(tiny_cv_config_factory, cohort, tmp_path, process_env):
    from pancls.config import dump_yaml

    cfg = tiny_cv_config_factory(cohort, tmp_path, **{"cv.folds": 2, "cv.inner_folds": 2, "train.epochs": 2})
    dump_yaml(cfg, tmp_path / "config.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    _pancls(process_env, "cv", "--config", str(tmp_path / "config.yaml"), "--out", str(one), procs=1)
    done = _pancls(process_env, "cv", "--config", str(tmp_path / "config.yaml"), "--out", str(two), procs=2)

    assert done.stdout.strip() and done.stdout.count("balanced accuracy") == 1  # rank 0 alone prints the headline
    assert _tree(two) == _tree(one)
    assert (two / "splits.json").read_bytes() == (one / "splits.json").read_bytes()
    patients = []
    for k in range(2):
        rows = _rows(two / f"fold_{k}" / "predictions.csv")
        ids = [r["patient_id"] for r in rows]
        assert len(ids) == len(set(ids))  # gathered from both ranks' shards: each test patient once
        assert sorted(ids) == sorted(_rows(one / f"fold_{k}" / "predictions.csv")[i]["patient_id"]
                                     for i in range(len(rows)))
        assert len((two / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()) == 2
        patients += ids
    oof = [r["patient_id"] for r in _rows(two / "oof_predictions.csv")]
    assert sorted(oof) == sorted(patients) and len(set(oof)) == len(oof)
    _no_temporaries(two)

    again = _pancls(process_env, "cv", "--config", str(tmp_path / "config.yaml"), "--out", str(two), "--resume", procs=2)
    assert again.stdout.count("balanced accuracy") == 1
    summary = json.loads((two / "summary.json").read_text())
    assert summary["folds"] == 2
