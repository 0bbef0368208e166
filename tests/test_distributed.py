"""DDP on CPU (gloo, 2 processes started by torchrun) against one process with the same global batch.

The runs are those of tests/train/ddp_worker.py: a tiny blob problem, 89 training images in global batches of
16 (the last one, 9 images, splits 4 / 5 over the ranks: the uneven case), class-balanced re-sampling from
epoch 2, augmentation drawn from the loader's generator, 36 evaluation images sharded 18 / 18.

Tolerance: 1e-5 on weights, 1e-6 on the epoch losses, not zero. DDP's gradient all-reduce adds the two ranks'
partial sums, where one process reduces the whole batch in one sum; float32 addition is not associative, so
the last bits differ after the first step and drift a little over 4 epochs x 6 steps. Resume under DDP is
compared bit for bit with an uninterrupted DDP run (same number of processes: the same sums in the same order).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "train" / "ddp_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _ddp(env: dict, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this interpreter")
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(WORKER), str(out), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _single(env: dict, out: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, str(WORKER), str(out), *args], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, process_env):
    """One single-process and one 2-process run of each variant (all in two launches)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _single(process_env, one, "tensor", "dataloader", "batchnorm", "drw")
    _ddp(process_env, two, "tensor", "dataloader", "batchnorm", "sync_bn", "drw")
    return one, two


@pytest.mark.parametrize("variant", ["tensor", "dataloader", "drw"])
def test_two_processes_train_what_one_process_trains(runs, variant):
    one, two = runs
    a, b = _load(one / f"{variant}.result.pt"), _load(two / f"{variant}.result.pt")
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=0, abs=1e-6)
        # counts summed over the ranks are exact: the same correct/seen ratio, not an average of two ratios
        assert ha["train_top1"] == hb["train_top1"]
        assert ha["eval_top1"] == hb["eval_top1"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(torch.as_tensor(b["eval_logits"]), torch.as_tensor(a["eval_logits"]),
                               rtol=0, atol=1e-5)  # gathered from both shards in order: all 36 rows
    assert b["eval_logits"].shape == (36, 4)


def test_the_run_folder_is_the_one_process_folder(runs):
    one, two = runs
    names = sorted(p.name for p in (one / "tensor").iterdir())
    assert sorted(p.name for p in (two / "tensor").iterdir()) == names
    assert "last.pt" in names and "metrics.jsonl" in names
    lines = (two / "tensor" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # rank 0 alone writes: one line per epoch, not two


def test_plain_batchnorm_differs_by_more_than_the_summation_tolerance(runs):
    """Each rank normalises its half batch by its own statistics: DDP without SyncBatchNorm is a different
    computation (the reason train.sync_bn exists), visibly so, not within float noise."""
    one, two = runs
    a, b = _load(one / "batchnorm.result.pt"), _load(two / "batchnorm.result.pt")
    worst = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"] if a["model"][k].is_floating_point())
    assert worst > 1e-3


def test_sync_batchnorm_on_cpu_processes_is_refused_naming_the_key(runs):
    _, two = runs
    message = (two / "sync_bn.error.txt").read_text()
    assert "train.sync_bn" in message and "CUDA" in message
    assert not (two / "sync_bn" / "last.pt").exists()


def test_resume_after_a_kill_under_ddp_is_bit_exact(runs, tmp_path, process_env):
    _, two = runs
    killed = _ddp(process_env, tmp_path, "tensor", "--kill-after-epoch", "2", check=False)
    assert killed.returncode != 0  # rank 0 was SIGKILLed after epoch 2's checkpoint
    assert len((tmp_path / "tensor" / "metrics.jsonl").read_text().splitlines()) == 2
    _ddp(process_env, tmp_path, "tensor", "--resume")
    a, b = _load(two / "tensor.result.pt"), _load(tmp_path / "tensor.result.pt")
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in a["history"]]
    assert [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in b["history"]] == strip
    assert not [p for p in (tmp_path / "tensor").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    shutil.rmtree(tmp_path / "tensor")
