"""fit(): exact resume, crash-safe files, refusals, AMP on CPU, batch contract, and that it learns."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pancls.errors import UserError
from pancls.train.checkpoint import load_checkpoint
from pancls.train.engine import BEST_SELECTED_ON, TrainConfig, fit
from pancls.train.loaders import TensorBatchLoader
from pancls.train.samplers import make_torch_sampler, sample_weights

COUNTS = [48, 24, 12, 6]
CFG = TrainConfig(epochs=4, batch_size=15, lr=0.05, warmup_epochs=1, milestones=(3,), gamma=0.1, amp="off",
                  sampler="class_balanced", sampler_start_epoch=2, progress=False, seed=1)
TIMING = ("seconds", "images_per_s")


def _blobs(counts, seed=0, spread=0.6):
    """Gaussian blobs on 2x4x4 'images': class c is centred on a fixed random pattern."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), 2, 4, 4, generator=torch.Generator().manual_seed(42))
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return centres[y] + spread * torch.randn(len(y), 2, 4, 4, generator=g), y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, len(COUNTS)))


def _augment(x, generator):
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x + 0.05 * torch.randn(x.shape, generator=generator)


class _DeferredReweightedCE(nn.Module):
    """Cross-entropy that switches to inverse-frequency class weights from epoch 3 (DRW-like)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.ones(len(COUNTS)), persistent=False)

    def set_epoch(self, epoch):
        self.weight = torch.ones(len(COUNTS)) if epoch < 3 else 1.0 / torch.tensor(COUNTS, dtype=torch.float)

    def forward(self, logits, target):
        return nn.functional.cross_entropy(logits, target, weight=self.weight)


def _loaders(cfg, counts=COUNTS):
    x, y = _blobs(counts)
    train = TensorBatchLoader(x, y, cfg.batch_size, sample_weights=sample_weights(y.numpy(), cfg.sampler),
                              weights_from_epoch=cfg.sampler_start_epoch, transform=_augment, seed=cfg.seed)
    xe, ye = _blobs([10] * len(counts), seed=1)
    return train, TensorBatchLoader(xe, ye, 32, shuffle=False)


def _fit(run_dir, cfg=CFG, resume=False, model_seed=0, **kw):
    model = _model(model_seed)
    train, evaluation = _loaders(cfg)
    result = fit(model, train, evaluation, _DeferredReweightedCE(), cfg, run_dir, device="cpu", resume=resume,
                 log=lambda line: None, **kw)
    return model, result


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    whole, whole_result = _fit(tmp_path / "whole")

    _fit(tmp_path / "split", dataclasses.replace(CFG, epochs=2))  # "killed" after epoch 2
    with open(tmp_path / "split" / "metrics.jsonl", "a") as fh:  # a line the checkpoint does not hold
        fh.write(json.dumps({"epoch": 2, "train_loss": -1.0}) + "\n")
    torch.manual_seed(999)  # the resumed process starts with other global RNG states...
    np.random.seed(999)
    split, split_result = _fit(tmp_path / "split", resume=True, model_seed=5)  # ...and another initialisation

    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert _strip(split_result.history) == _strip(whole_result.history)
    np.testing.assert_array_equal(split_result.eval_logits, whole_result.eval_logits)
    lines = _lines(tmp_path / "split")
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert _strip(lines) == _strip(whole_result.history)
    assert [r["lr"] for r in lines] == pytest.approx([0.05 / 6, 0.05, 0.05, 0.005])  # per-step warm-up, 6 steps


def test_metrics_and_result(tmp_path):
    calls = []

    def evaluate(y_true, logits):
        calls.append((y_true.shape, logits.shape))
        return {"per_class": np.bincount(logits.argmax(1), minlength=4), "n": np.int64(len(y_true))}

    _, result = _fit(tmp_path, dataclasses.replace(CFG, eval_every=3), evaluate=evaluate)
    lines = _lines(tmp_path)
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert ["eval_top1" in r for r in lines] == [False, False, True, True]  # every 3rd, and the last
    assert calls == [((40,), (40, 4))] * 2 and lines[-1]["eval_n"] == 40 and sum(lines[-1]["eval_per_class"]) == 40
    assert result.last_metrics == lines[-1] and result.eval_labels.shape == (40,)
    best = result.best_epoch_metrics
    assert best["selected_on"] == BEST_SELECTED_ON
    assert best["eval_top1"] == max(r["eval_top1"] for r in lines if "eval_top1" in r)
    assert all(r["images_per_s"] > 0 and r["train_loss"] > 0 for r in lines)


def test_finished_run_resumes_as_a_no_op_with_its_weights(tmp_path):
    done, result = _fit(tmp_path, dataclasses.replace(CFG, epochs=2))
    mtime = (tmp_path / "last.pt").stat().st_mtime_ns
    again, again_result = _fit(tmp_path, dataclasses.replace(CFG, epochs=2), resume=True, model_seed=7)
    assert (tmp_path / "last.pt").stat().st_mtime_ns == mtime
    assert again_result.history == result.history
    np.testing.assert_array_equal(again_result.eval_logits, result.eval_logits)
    assert all(torch.equal(a, b) for a, b in zip(done.state_dict().values(), again.state_dict().values(), strict=True))


def test_refuses_to_overwrite_and_to_resume_a_different_config(tmp_path):
    _fit(tmp_path, dataclasses.replace(CFG, epochs=1))
    with pytest.raises(UserError, match="--resume") as info:
        _fit(tmp_path)
    assert info.value.where == str(tmp_path)
    with pytest.raises(UserError) as info:
        _fit(tmp_path, dataclasses.replace(CFG, lr=0.1, gamma=0.5), resume=True)
    assert "train.lr: 0.05 -> 0.1" in info.value.reason and "train.gamma" in info.value.reason
    assert "train.epochs" not in info.value.reason
    with pytest.raises(UserError, match="run.loss"):
        _fit(tmp_path, resume=True, run_config={"loss": "ldam"})


def test_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _fit(tmp_path, dataclasses.replace(CFG, epochs=1))
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        _fit(tmp_path, dataclasses.replace(CFG, epochs=2), resume=True)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "tensorboard")  # TensorBoard logs as it goes
    assert left == ["last.pt", "metrics.jsonl"]  # no temp files left
    assert [r["epoch"] for r in _lines(tmp_path)] == [0]  # the unsaved epoch was not logged

    monkeypatch.setattr(torch, "save", real_save)
    _, result = _fit(tmp_path, dataclasses.replace(CFG, epochs=2), resume=True)
    assert [r["epoch"] for r in _lines(tmp_path)] == [0, 1] == [r["epoch"] for r in result.history]


def test_damaged_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="damaged"):
        _fit(tmp_path, resume=True)


def test_amp_auto_is_off_on_cpu_and_bf16_runs(tmp_path):
    cfg = dataclasses.replace(CFG, epochs=2)
    off, _ = _fit(tmp_path / "off", cfg)
    auto, _ = _fit(tmp_path / "auto", dataclasses.replace(cfg, amp="auto"))
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), auto.state_dict().values(), strict=True))
    bf16, result = _fit(tmp_path / "bf16", dataclasses.replace(cfg, amp="bf16", clip_grad_norm=1.0))
    assert np.isfinite(result.last_metrics["train_loss"])
    assert not torch.equal(bf16[1].weight, off[1].weight)  # autocast really changed the arithmetic
    with pytest.raises(UserError, match="train.amp"):
        _fit(tmp_path / "fp16", dataclasses.replace(cfg, amp="fp16"))


def test_learns_a_separable_problem(tmp_path):
    cfg = TrainConfig(epochs=8, batch_size=16, lr=0.1, warmup_epochs=1, schedule="cosine", amp="off", progress=False)
    x, y = _blobs([40] * 4, spread=0.8)
    xe, ye = _blobs([25] * 4, seed=3, spread=0.8)
    result = fit(_model(), TensorBatchLoader(x, y, 16), TensorBatchLoader(xe, ye, 50, shuffle=False),
                 nn.CrossEntropyLoss(), cfg, tmp_path, device="cpu", log=lambda line: None)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.last_metrics["eval_top1"] >= 0.9  # chance is 0.25


def test_dataloader_with_dict_batches_and_an_epoch_sampler(tmp_path):
    x, y = _blobs(COUNTS)
    items = [{"image": x[i], "label": y[i:i + 1]} for i in range(len(y))]  # MONAI-style: label of shape (1,)
    sampler = make_torch_sampler(y.numpy(), "sqrt", seed=0)
    train = DataLoader(items, batch_size=10, sampler=sampler)
    evaluation = DataLoader(TensorDataset(*_blobs([5] * 4, seed=1)), batch_size=8)  # tuple batches
    cfg = dataclasses.replace(CFG, epochs=2, sampler="sqrt", sampler_start_epoch=0)
    result = fit(_model(), train, evaluation, nn.CrossEntropyLoss(), cfg, tmp_path, device="cpu",
                 log=lambda line: None)
    assert sampler.epoch == 1 and len(result.history) == 2
    assert result.eval_logits.shape == (20, 4) and result.eval_labels.tolist() == sorted(result.eval_labels.tolist())


def test_missing_tensorboard_is_a_user_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install") as info:
        _fit(tmp_path / "tb", dataclasses.replace(CFG, tensorboard=True))
    assert info.value.where == "train.tensorboard" and not (tmp_path / "tb").exists()


def test_tensorboard_logs_by_default_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(CFG, tensorboard=None)
    _fit(tmp_path / "run", cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert any("loss" in t for t in tags)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss_tag = next(t for t in tags if "loss" in t)
    logged = [e.value for e in events.Scalars(loss_tag)]
    assert len(logged) == len(history)


def test_default_tensorboard_is_skipped_quietly_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    _fit(tmp_path / "run", dataclasses.replace(CFG, tensorboard=None))
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_progress_on_a_file_is_plain_lines_with_the_step_loss_and_both_etas(tmp_path, capsys):
    """nohup / Slurm / tee: no tqdm bar (its carriage returns fill a log file); one line every progress_steps
    steps, the running loss and accuracy equal to the epoch's when the line is at the last step."""
    cfg = dataclasses.replace(CFG, progress=True, progress_steps=3, progress_seconds=3600.0)
    _, result = _fit(tmp_path, cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert "\r" not in err
    assert [line.split()[1] + " " + line.split()[3] for line in lines] == \
        [f"{e}/4 {s}/6" for e in range(1, 5) for s in (3, 6)]  # 90 images / 15 = 6 steps, a line every 3
    for line in lines:
        assert "it/s" in line and "epoch ETA" in line and "run ETA" in line
    last = [line for line in lines if line.split()[1] == "4/4" and line.split()[3] == "6/6"][0]
    assert last.split()[5] == f"{result.history[-1]['train_loss']:.4f}"
    assert last.split()[-1] == "00:00"  # nothing left after the last step of the last epoch


def test_progress_off_prints_nothing(tmp_path, capsys):
    _fit(tmp_path, dataclasses.replace(CFG, progress=False, progress_steps=1))
    assert capsys.readouterr().err == ""


def _lrs(cfg, steps=3):
    from pancls.train.optim import LRSchedule

    schedule = LRSchedule(cfg, steps)
    return [schedule.lr_at(e, s) for e in range(cfg.epochs) for s in range(steps)]


def test_inactive_keys_name_what_does_nothing_and_why():
    from pancls.train.engine import inactive_keys

    assert set(inactive_keys(CFG)) == {"progress_steps", "progress_seconds"}  # progress: false
    assert inactive_keys(dataclasses.replace(CFG, progress=True)) == {}  # the test recipe uses every other key
    default = inactive_keys(TrainConfig())
    assert set(default) == {"sampler_start_epoch"} and "'none'" in default["sampler_start_epoch"]
    cosine = TrainConfig(epochs=6, schedule="cosine", warmup_epochs=0, sampler="sqrt", progress=False,
                         optimizer="adamw", weight_decay=0.0)
    found = inactive_keys(cosine)
    assert set(found) == {"milestones", "gamma", "warmup", "momentum", "nesterov", "wd_on_all", "progress_steps",
                          "progress_seconds"}
    assert "cosine" in found["milestones"] and "cosine" in found["gamma"] and "warmup_epochs is 0" in found["warmup"]
    assert set(inactive_keys(dataclasses.replace(CFG, milestones=(4, 9), progress=True))) == {"gamma"}  # no milestone before epoch 4
    assert "never multiplied" in inactive_keys(dataclasses.replace(CFG, milestones=(), progress=True))["gamma"]
    assert set(inactive_keys(dataclasses.replace(CFG, schedule="constant", progress=True))) == {"milestones", "gamma"}


@pytest.mark.parametrize("cfg, changes", [
    (TrainConfig(epochs=6, schedule="cosine", warmup_epochs=2), {"milestones": (1, 2), "gamma": 0.5}),
    (TrainConfig(epochs=6, schedule="constant", warmup_epochs=0), {"milestones": (3,), "gamma": 0.5, "warmup": "epoch"}),
    (TrainConfig(epochs=6, milestones=(6, 8)), {"gamma": 0.5}),
])
def test_keys_called_inactive_really_leave_the_schedule_unchanged(cfg, changes):
    from pancls.train.engine import inactive_keys

    assert set(changes) <= set(inactive_keys(cfg))
    assert _lrs(dataclasses.replace(cfg, **changes)) == _lrs(cfg)
    active = dataclasses.replace(cfg, schedule="step", milestones=(3,), warmup_epochs=2)  # now they matter
    assert not set(changes) & set(inactive_keys(active))
    assert _lrs(dataclasses.replace(active, **{k: v for k, v in changes.items() if k != "milestones"})) != _lrs(active)


def test_a_run_that_predates_an_added_config_key_still_resumes():
    """Keys added to the config after runs were written (train.checkpoint.ADDED_KEYS) at their neutral value do
    not make an older run "a different config"; set to anything else, they do."""
    from pancls.errors import UserError
    from pancls.train.checkpoint import check_same_config

    old = {"run.model.head": "tsp", "train.lr": 0.1}
    check_same_config(old, {**old, "run.model.init_backbone_from": None, "run.model.freeze_backbone": False}, "x")
    with pytest.raises(UserError, match="freeze_backbone: \\(absent\\) -> True"):
        check_same_config(old, {**old, "run.model.freeze_backbone": True}, "x")
    with pytest.raises(UserError, match="other_key"):  # only the listed keys are forgiven
        check_same_config(old, {**old, "run.other_key": None}, "x")


def test_best_pt_is_written_after_last_pt_and_repaired_after_a_kill_between_them(tmp_path, monkeypatch):
    """best.pt never holds an epoch last.pt does not; a kill between the two writes leaves an older best.pt while
    last.pt's record names its own epoch as best: resume rewrites best.pt from that checkpoint, and the run ends
    with the best.pt of an uninterrupted run. A best.pt ahead of last.pt (the order before) is removed."""
    from pancls.train import engine

    cfg = dataclasses.replace(CFG, epochs=4, eval_every=1)
    _fit(tmp_path / "whole", cfg, save_best=True)
    whole = load_checkpoint(tmp_path / "whole" / "best.pt")

    class Killed(Exception):
        pass

    real, seen = engine._Run.save_best_weights, []

    def killed_at_the_last_improvement(self):
        seen.append(self.best["epoch"] + 1)
        if seen[-1] == whole["epoch"]:
            raise Killed  # after last.pt of that epoch, before its best.pt
        real(self)

    monkeypatch.setattr(engine._Run, "save_best_weights", killed_at_the_last_improvement)
    with pytest.raises(Killed):
        _fit(tmp_path / "split", cfg, save_best=True)
    monkeypatch.undo()
    last = load_checkpoint(tmp_path / "split" / "last.pt")
    assert last["epoch"] == whole["epoch"] == last["best"]["epoch"] + 1
    assert len(seen) == 1 or load_checkpoint(tmp_path / "split" / "best.pt")["epoch"] < whole["epoch"]
    _fit(tmp_path / "split", cfg, resume=True, save_best=True)
    again = load_checkpoint(tmp_path / "split" / "best.pt")
    assert again["epoch"] == whole["epoch"]
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])
    # a best.pt from after the checkpoint's epoch (the order before): removed on resume; when the best epoch so far
    # is earlier than the checkpoint and no later epoch beats it, no weights hold it any more: said, not hidden
    ahead = tmp_path / "ahead"
    _fit(ahead, dataclasses.replace(cfg, epochs=2), save_best=True)
    last = load_checkpoint(ahead / "last.pt")
    last["best"] = {**last["best"], "epoch": 0, "eval_top1": 2.0}  # epoch 1 best, beyond any later epoch's top-1
    torch.save(last, ahead / "last.pt")
    torch.save({"epoch": 3, "model": whole["model"]}, ahead / "best.pt")
    lines = []
    train, evaluation = _loaders(cfg)
    fit(_model(), train, evaluation, _DeferredReweightedCE(), cfg, ahead, device="cpu", resume=True,
        log=lines.append, save_best=True)
    assert not (ahead / "best.pt").exists()
    assert any("best.pt of epoch 3, after the checkpoint's epoch 2, removed" in line for line in lines)
