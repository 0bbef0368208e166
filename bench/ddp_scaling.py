"""DDP scaling on the CPU: 1 -> 2 (or more) processes at the same global batch, through the engine pancls trains with.

Each configuration trains the reduced CIFAR network of ``configs/lt_cpu_reduced.yaml`` (ResNet-20 at half width
+ tSP head, 10 classes) with :func:`pancls.train.engine.fit`, in ``P`` processes started by
``torch.multiprocessing.spawn`` that join a ``gloo`` process group (:func:`pancls.distributed.session` then uses
it, exactly as under ``torchrun``). The data are a synthetic in-memory set of 32 x 32 x 3 images
(:class:`~pancls.train.loaders.TensorBatchLoader`, global batch ``--batch`` = 128 split over the ranks as
:mod:`pancls.distributed` prescribes), so the loader costs nothing and the number is the step (forward,
backward, gradient all-reduce, SGD) alone. Every process gets ``--threads`` intra-op threads (default 1).

Throughput is the engine's own training images/s (global images / epoch seconds, the all-reduce of the epoch
totals included), the median over the epochs after the first (warm-up). Efficiency of ``P`` processes =
``throughput(P) / (P x throughput(1))``: 1.0 is linear scaling.

    python bench/ddp_scaling.py [--procs 1 2] [--steps 20] [--epochs 3] [--batch 128] [--threads 1]
        [--json bench/results/ddp_scaling.json] [--md bench/results/ddp_scaling.md]

Read the result against ``nproc`` (recorded): P processes of T threads need P x T free cores; a core that another
job keeps busy halves the second process's speed, and the efficiency shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from pancls import distributed
    from pancls.models import create_model
    from pancls.train.engine import TrainConfig, fit
    from pancls.train.loaders import TensorBatchLoader

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with distributed.session(torch.device("cpu")) as (ctx, device):
            g = torch.Generator().manual_seed(0)
            n = args.steps * args.batch
            x = torch.randn(n, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (n,), generator=g)
            loader = TensorBatchLoader(x, y, args.batch, shuffle=True, seed=0, rank=ctx.rank, world_size=ctx.world_size)
            torch.manual_seed(0)
            model = create_model("resnet20_cifar", "tsp", 10, backbone_kwargs={"width": 0.5})
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=0.1, warmup_epochs=0, schedule="constant",
                              amp="off", progress=False, tensorboard=False, seed=0)
            with tempfile.TemporaryDirectory() as run_dir:
                result = fit(model, loader, None, nn.CrossEntropyLoss(), cfg, run_dir, device=device,
                             log=lambda _: None)
            if ctx.is_main:
                Path(out).write_text(json.dumps(result.history))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(procs: int, args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "history.json")
        started = time.perf_counter()
        mp.spawn(_worker, args=(procs, _free_port(), args, out), nprocs=procs, join=True)
        wall = time.perf_counter() - started
        history = json.loads(Path(out).read_text())
    timed = history[1:] or history
    rates = [r["images_per_s"] for r in timed]
    return {"processes": procs, "threads_per_process": args.threads, "global_batch": args.batch,
            "per_rank_batch": args.batch // procs, "steps_per_epoch": args.steps, "epochs": args.epochs,
            "images_per_s": statistics.median(rates), "images_per_s_epochs": rates,
            "epoch_seconds": [r["seconds"] for r in timed], "wall_s_with_start": round(wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20, help="steps (global batches) per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs; the first is warm-up, the rest are timed")
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--json", type=Path, default=Path("bench/results/ddp_scaling.json"))
    p.add_argument("--md", type=Path, default=Path("bench/results/ddp_scaling.md"))
    p.add_argument("--note", default="", help="a caveat recorded with the result (e.g. another job on a core)")
    args = p.parse_args(argv)
    if 1 not in args.procs:
        p.error("--procs must include 1 (the reference)")
    rows = []
    for procs in args.procs:
        if args.batch % procs:
            p.error(f"--batch {args.batch} does not divide by {procs} processes")
        rows.append(measure(procs, args))
        print(f"{procs} process(es): {rows[-1]['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    base = next(r for r in rows if r["processes"] == 1)["images_per_s"]
    for r in rows:
        r["efficiency"] = round(r["images_per_s"] / (r["processes"] * base), 3)
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    machine = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "loadavg_at_end": load, "torch": torch.__version__, "backend": "gloo", "note": args.note}
    result = {"benchmark": "ddp_scaling", "model": "resnet20_cifar width 0.5 + tsp head, 10 classes, 32x32x3",
              "engine": "pancls.train.engine.fit via pancls.distributed (torch.multiprocessing.spawn + gloo)",
              "machine": machine, "rows": rows}
    lines = ["| processes | threads/process | per-rank batch | images/s | efficiency |", "|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['threads_per_process']} | {r['per_rank_batch']} | {r['images_per_s']:.1f} | "
              f"{r['efficiency']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.md.write_text(
        f"# DDP scaling on the CPU (bench/ddp_scaling.py)\n\n{result['model']}; global batch {args.batch}, "
        f"{args.steps} steps/epoch, {args.epochs} epochs (first untimed); {result['engine']}.\n\n{table}\n\n"
        f"efficiency = images/s(P) / (P x images/s(1)). Machine: nproc {machine['nproc']}, "
        f"{machine['processor']}, torch {machine['torch']}, load average at the end {machine['loadavg_at_end']}."
        + (f"\n\nNote: {args.note}\n" if args.note else "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
