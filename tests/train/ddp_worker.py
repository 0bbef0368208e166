"""The training runs of tests/test_distributed.py, as a script ``torchrun`` can start (and a test can import).

    torchrun --standalone --nproc-per-node 2 tests/train/ddp_worker.py OUT VARIANT [VARIANT ...] [--resume]
        [--epochs E] [--kill-after-epoch K]

Each VARIANT trains the tiny blob problem of tests/train/test_engine.py into ``OUT/VARIANT`` with
:func:`pancls.train.engine.fit`, and rank 0 saves ``OUT/VARIANT.result.pt`` (weights, history, eval logits).
Run without torchrun it is the single-process reference. ``--kill-after-epoch K``: rank 0 SIGKILLs itself
right after epoch K's checkpoint and log line (torchrun then stops the other ranks).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from pancls import distributed
from pancls.losses import create_loss
from pancls.train.engine import TrainConfig, fit
from pancls.train.loaders import TensorBatchLoader
from pancls.train.samplers import ShardSampler, make_batch_sampler, sample_weights

#: 89 images: the last global batch of 16 holds 9, split 4 / 5 over two ranks (the uneven case)
COUNTS = [47, 24, 12, 6]
CFG = TrainConfig(epochs=4, batch_size=16, lr=0.05, warmup_epochs=1, milestones=(3,), gamma=0.1, amp="off",
                  sampler="class_balanced", sampler_start_epoch=2, progress=False, seed=1, tensorboard=False)
VARIANTS = ("tensor", "dataloader", "batchnorm", "sync_bn", "drw")  # drw: the tensor run with a DRW loss


def blobs(counts, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), 2, 4, 4, generator=torch.Generator().manual_seed(42))
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return centres[y] + spread * torch.randn(len(y), 2, 4, 4, generator=g), y


def model(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(16)] if batchnorm else []
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 16), *norm, nn.ReLU(), nn.Linear(16, len(COUNTS)))


def augment(x, generator):
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def loaders(variant: str, cfg: TrainConfig, ctx: distributed.Context):
    x, y = blobs(COUNTS)
    xe, ye = blobs([9] * len(COUNTS), seed=1)  # 36 evaluation images, 18 per rank
    r, w = ctx.rank, ctx.world_size
    if variant == "dataloader":  # the cv path: a DataLoader over items, sampler sqrt from epoch 0
        items = [{"image": x[i], "label": y[i:i + 1]} for i in range(len(y))]
        batches = make_batch_sampler(y.numpy(), "sqrt", cfg.batch_size, seed=cfg.seed, rank=r, world_size=w)
        evaluation = list(zip(xe, ye, strict=True))
        return (DataLoader(items, batch_sampler=batches),
                DataLoader(evaluation, batch_size=8, sampler=ShardSampler(len(evaluation), r, w)))
    train = TensorBatchLoader(x, y, cfg.batch_size, sample_weights=sample_weights(y.numpy(), cfg.sampler),
                              weights_from_epoch=cfg.sampler_start_epoch, transform=augment, seed=cfg.seed,
                              rank=r, world_size=w)
    return train, TensorBatchLoader(xe, ye, 8, shuffle=False, rank=r, world_size=w, shard="data")


def train(out: Path, variant: str, ctx: distributed.Context, resume=False, epochs=None, kill_after=None):
    cfg = dataclasses.replace(CFG, epochs=epochs or CFG.epochs, sync_bn=variant == "sync_bn")
    net = model(batchnorm=variant in ("batchnorm", "sync_bn"))
    train_loader, eval_loader = loaders(variant, cfg, ctx)

    def log(line: str) -> None:
        if kill_after is not None and line.startswith(f"epoch {kill_after}/"):
            os.kill(os.getpid(), signal.SIGKILL)

    # DRW's weighted mean divides by the global batch's sum of weights, not by each rank's (pancls.losses)
    loss = create_loss("ce", COUNTS, drw_epoch=1) if variant == "drw" else nn.CrossEntropyLoss()
    result = fit(net, train_loader, eval_loader, loss, cfg, out / variant, device="cpu", resume=resume, log=log)
    if ctx.is_main:
        torch.save({"model": net.state_dict(), "history": result.history, "eval_logits": result.eval_logits,
                    "world_size": ctx.world_size}, out / f"{variant}.result.pt")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--kill-after-epoch", type=int)
    args = parser.parse_args(argv)
    with distributed.session(torch.device("cpu")) as (ctx, _):
        for variant in args.variants:
            try:
                train(args.out, variant, ctx, args.resume, args.epochs, args.kill_after_epoch)
            except ValueError as exc:  # the refusals the test expects (sync_bn on CPU)
                if ctx.is_main:
                    (args.out / f"{variant}.error.txt").write_text(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
