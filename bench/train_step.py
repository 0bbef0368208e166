"""Training-step time of the networks pancls trains, on the CPU and, where one is present, a CUDA GPU.

One step is what :func:`pancls.train.engine.fit` does per batch: forward under autocast (bf16 on CUDA with
``--amp auto``, none on the CPU), cross-entropy in float32, ``zero_grad``, backward, SGD step (momentum 0.9,
weight decay). Inputs are random tensors already on the device (the loader is measured by
``bench/loader_speed.py``). Each case runs ``--warmup`` untimed steps, then ``--steps`` timed ones; the median
step time is reported, with images/s = batch / median.

Cases (``--cases``, default all):

* ``cifar_resnet32``: ResNet-32 (CIFAR, 0.46 M parameters) + tSP head, batch 128, 32 x 32 x 3; the epoch estimate
  is for CIFAR-10-LT IR 100 (12,406 images, 97 steps; the issue's GPU goal is <= 0.3 s);
* ``cifar_resnet20_half``: ResNet-20 at half width, the reduced CPU protocol's backbone
  (``configs/lt_cpu_reduced.yaml``), same batch and epoch estimate;
* ``ct3d_resnet18``: 3D ResNet-18 (MONAI, full width, stem stride 2) + tSP head at 96 x 96 x 96, one channel
  (the issue's 96^3; the cv default ROI is 96 x 96 x 48, ``--ct-size`` changes it);
* ``lt224_resnet10`` / ``lt224_resnet50`` / ``lt224_resnext50``: the ImageNet-LT backbones at 224 x 224 x 3.

    python bench/train_step.py [--device auto|cpu|cuda] [--cases ...] [--steps 5] [--warmup 2]
        [--cpu-batch-3d 2] [--gpu-batch-3d 16] [--cpu-batch-224 16] [--gpu-batch-224 256] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CIFAR_LT_IR100_TRAIN = 12406


def cases(args, device: torch.device):
    """``name -> (backbone, backbone_kwargs, input shape without batch, batch, classes)``."""
    gpu = device.type == "cuda"
    b3d = args.gpu_batch_3d if gpu else args.cpu_batch_3d
    b224 = args.gpu_batch_224 if gpu else args.cpu_batch_224
    return {
        "cifar_resnet32": ("resnet32_cifar", {}, (3, 32, 32), 128, 10),
        "cifar_resnet20_half": ("resnet20_cifar", {"width": 0.5}, (3, 32, 32), 128, 10),  # lt_cpu_reduced.yaml
        "ct3d_resnet18": ("resnet18", {"spatial_dims": 3, "in_channels": 1, "conv1_t_stride": 2},
                          (1, *args.ct_size), b3d, 6),
        "lt224_resnet10": ("resnet10_2d", {}, (3, 224, 224), b224, 1000),
        "lt224_resnet50": ("resnet50_2d", {}, (3, 224, 224), b224, 1000),
        "lt224_resnext50": ("resnext50_32x4d", {}, (3, 224, 224), b224, 1000),
    }


def amp_dtype(amp: str, device: torch.device):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def time_case(backbone, kwargs, shape, batch, classes, device, amp, steps, warmup, channels_last):
    from pancls.models import create_model

    torch.manual_seed(0)
    model = create_model(backbone, "tsp", classes, backbone_kwargs=kwargs).to(device).train()
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape) + 1)
    if channels_last and fmt is not None:
        model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, *shape, device=device)
    if channels_last and fmt is not None:
        x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    dtype = amp_dtype(amp, device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return statistics.median(times), params, "bf16" if dtype is not None else "fp32"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    from pancls.machine import cpu_model

    cpu = cpu_model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {torch.get_num_threads()} threads, load {load:.1f}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "both"))
    p.add_argument("--cases", nargs="+", default=None, help="subset of the case names (default: all)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--channels-last", action="store_true", help="channels-last / channels-last-3d memory format")
    p.add_argument("--ct-size", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--cpu-batch-3d", type=int, default=2)
    p.add_argument("--gpu-batch-3d", type=int, default=16)
    p.add_argument("--cpu-batch-224", type=int, default=16)
    p.add_argument("--gpu-batch-224", type=int, default=256)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)

    if args.device == "both":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "auto":
        devices = ["cuda" if torch.cuda.is_available() else "cpu"]
    else:
        devices = [args.device]
    rows = []
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        table = cases(args, device)
        chosen = args.cases or list(table)
        unknown = [c for c in chosen if c not in table]
        if unknown:
            p.error(f"unknown case(s) {unknown}; choose from {list(table)}")
        print(f"\n{name}: {machine(device)}")
        print(f"{'case':<20} {'input':<16} {'batch':>5} {'params':>8} {'amp':>5} {'ms/step':>9} {'img/s':>8}  epoch")
        for case in chosen:
            backbone, kwargs, shape, batch, classes = table[case]
            seconds, params, precision = time_case(backbone, kwargs, shape, batch, classes, device, args.amp,
                                                   args.steps, args.warmup, args.channels_last)
            epoch = ""
            if case.startswith("cifar_"):
                epoch = f"CIFAR-10-LT IR100: {seconds * -(-CIFAR_LT_IR100_TRAIN // batch):.1f} s"
            row = {"device": name, "machine": machine(device), "case": case, "input": "x".join(map(str, shape)),
                   "batch": batch, "parameters": params, "amp": precision, "ms_per_step": round(seconds * 1e3, 1),
                   "images_per_s": round(batch / seconds, 1), "channels_last": args.channels_last}
            rows.append(row)
            print(f"{case:<20} {row['input']:<16} {batch:>5} {params / 1e6:>7.2f}M {precision:>5} "
                  f"{row['ms_per_step']:>9.1f} {row['images_per_s']:>8.1f}  {epoch}", flush=True)
    if args.json:
        from pancls.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
