"""A minimal, independent CIFAR-10-LT trainer: the yardstick the engine is checked against (issue 19).

Plain PyTorch in one file, sharing no code with pancls: its own PNG decoding of the packed
``cifar10.npz`` (the recipe in ``shared/data/SOURCES.md``), its own LDAM-DRW subset construction, its own
ResNet-32 (option-A shortcuts, Kaiming-normal convolutions), its own per-image pad-4 crop + flip, its own
per-iteration warm-up + cosine schedule, and the textbook loop. Any pancls piece can be swapped in one at a
time (``--swap``), which is how the deficit of issue 19 was bisected.

    python bench/reference_lt.py --data ../shared/data/cifar10.npz --epochs 15 --seed 0
    python bench/reference_lt.py ... --swap loader        # pancls TensorBatchLoader + augment instead of ours
    python bench/reference_lt.py ... --head tsp           # our own tSP kernel head (scale 16) instead of linear

``--head tsp`` checks the other half of the project's headline (tSP trails softmax): the same gap must appear
here, with a tSP head written from its formula below, or the engine is what handicaps tSP.

Recipe (issue 19): SGD lr 0.1, momentum 0.9, wd 2e-4 on every parameter, batch 128, 1 linear warm-up epoch
(per step) then cosine to 0, zero-pad 4 after normalisation + random crop + flip per image, last epoch,
eval mode, top-1 on the 10,000 test images.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def decode(z, split):
    from PIL import Image

    tile, cols = (int(v) for v in z["layout"])
    n = len(z["train_index"]) if split == "train" else len(z["test_labels"])
    g = np.asarray(Image.open(io.BytesIO(z[split + "_png"].tobytes())).convert("RGB"))
    return g.reshape(g.shape[0] // tile, tile, cols, tile, 3).swapaxes(1, 2).reshape(-1, tile, tile, 3)[:n]


def ldam_subset(path, ir=100.0):
    z = np.load(path, allow_pickle=False)
    labels = z["train_labels"].astype(np.int64)
    np.random.seed(0)  # LDAM-DRW's IMBALANCECIFAR10: one seed, classes in order, full shuffle of each
    keep = []
    for c in range(10):
        n_c = int(5000 * (1.0 / ir) ** (c / 9.0))
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        keep.append(idx[:n_c])
    keep = np.concatenate(keep)
    rows = np.searchsorted(z["train_index"], keep)
    assert (z["train_index"][rows] == keep).all()
    return decode(z, "train")[rows], labels[keep], decode(z, "test"), z["test_labels"].astype(np.int64)


def normalise(x_uint8):
    x = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2
        self.stride = stride

    def forward(self, x):
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        short = x
        if self.stride != 1 or self.pad:
            short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class TSPKernel(nn.Module):
    """The tSP kernel form written from its formula (not imported): ``x = P f / ||P f||`` (P: 64 -> 128, no bias),
    ``cos_k = x . mu_k / ||mu_k||``, ``logit_k = 2 s / (1 + kappa (1 - cos_k))`` with ``s = 1 + softplus(rho)``
    learned from ``scale`` and ``kappa`` fixed."""

    def __init__(self, cin, num_classes, dim=128, scale=16.0, kappa=16.0):
        super().__init__()
        self.proj = nn.Linear(cin, dim, bias=False)
        self.mu = nn.Parameter(torch.randn(num_classes, dim))
        self.rho = nn.Parameter(torch.tensor(math.log(math.expm1(scale - 1.0))))
        self.kappa = kappa

    def forward(self, f):
        cos = F.normalize(self.proj(f), dim=1) @ F.normalize(self.mu, dim=1).T
        return 2.0 * (1.0 + F.softplus(self.rho)) / (1.0 + self.kappa * (1.0 - cos))


class ResNet32(nn.Module):
    def __init__(self, num_classes=10, n=5, head="linear"):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            for b in range(n):
                layers.append(Block(cin, c, 2 if i > 0 and b == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes) if head == "linear" else TSPKernel(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.layers(F.relu(self.bn(self.conv(x)))), 1).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def crop_flip(x, gen):
    """Per image: zero-pad 4, random 32x32 crop, horizontal flip with p = 1/2 (a loop, the obvious way)."""
    padded = F.pad(x, (4, 4, 4, 4))
    out = torch.empty_like(x)
    dy = torch.randint(0, 9, (len(x),), generator=gen)
    dx = torch.randint(0, 9, (len(x),), generator=gen)
    flip = torch.rand(len(x), generator=gen) < 0.5
    for i in range(len(x)):
        img = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = img.flip(-1) if flip[i] else img
    return out


def lr_at(it, iters_per_epoch, epochs, base=0.1, warmup=1):
    w = warmup * iters_per_epoch
    if it < w:
        return base * (it + 1) / w
    t = (it - w) / (epochs * iters_per_epoch - w)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def train(path, epochs, seed, swap=(), batch=128, log=print, head="linear"):
    """Train and return ``{"top1", "per_class", "history"}``. ``swap`` names pancls pieces to use instead:
    ``model`` (create_model resnet32_cifar + linear head), ``loader`` (TensorBatchLoader + pancls augment),
    ``schedule`` (pancls LRSchedule), ``epoch_warmup`` (pancls LRSchedule with the per-epoch warm-up staircase
    that the engine used before issue 19), ``data`` (pancls load_cifar_lt)."""
    torch.manual_seed(seed)
    if "data" in swap:
        from pancls.data.cifar import load_cifar_lt
        d = load_cifar_lt(path, "cifar10", 100, "ldam")
        xtr, ytr, xte, yte = d.train_images, d.train_labels.astype(np.int64), d.test_images, d.test_labels.astype(np.int64)
    else:
        xtr, ytr, xte, yte = ldam_subset(path)
    if "model" in swap:
        from pancls.models import create_model
        model = create_model("resnet32_cifar", head, 10,
                             head_kwargs={"form": "kernel", "scale_init": 16.0} if head == "tsp" else None)
    else:
        model = ResNet32(head=head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    n = len(ytr)
    iters = -(-n // batch)
    if "schedule" in swap or "epoch_warmup" in swap:
        from pancls.train.engine import TrainConfig
        from pancls.train.optim import LRSchedule
        sched = LRSchedule(TrainConfig(epochs=epochs, schedule="cosine", warmup_epochs=1,
                                       warmup="epoch" if "epoch_warmup" in swap else "step"), iters)
        lr_fn = lambda it: sched.lr_at(it // iters, it % iters)  # noqa: E731
    else:
        lr_fn = lambda it: lr_at(it, iters, epochs)  # noqa: E731
    if "loader" in swap:
        from pancls.data import augment
        from pancls.train.loaders import TensorBatchLoader

        def tf(x, g):
            return augment.random_crop_flip(augment.to_float_normalised(x), padding=4, generator=g)
        loader = TensorBatchLoader(torch.from_numpy(xtr), torch.from_numpy(ytr), batch, transform=tf, seed=seed)
    else:
        xtr_f, ytr_t = normalise(xtr), torch.from_numpy(ytr)
        gen = torch.Generator().manual_seed(seed)
    xte_f, yte_t = normalise(xte), torch.from_numpy(yte)
    history, it = [], 0
    for epoch in range(epochs):
        model.train()
        started, loss_sum = time.perf_counter(), 0.0
        if "loader" in swap:
            loader.set_epoch(epoch)
            batches = iter(loader)
        else:
            perm = torch.randperm(n, generator=gen)
            batches = ((crop_flip(xtr_f[perm[i:i + batch]], gen), ytr_t[perm[i:i + batch]]) for i in range(0, n, batch))
        for x, y in batches:
            for g in opt.param_groups:
                g["lr"] = lr_fn(it)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            it += 1
        history.append({"epoch": epoch, "loss": loss_sum / n, "seconds": round(time.perf_counter() - started, 1)})
        log(json.dumps(history[-1]))
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xte_f[i:i + 1000]).argmax(1) for i in range(0, len(yte_t), 1000)])
    per_class = [float((pred[yte_t == c] == c).float().mean()) for c in range(10)]
    return {"top1": float((pred == yte_t).float().mean()), "per_class": per_class, "history": history,
            "swap": sorted(swap), "seed": seed, "epochs": epochs, "head": head}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swap", nargs="*", default=[], choices=["model", "loader", "schedule", "epoch_warmup", "data"])
    p.add_argument("--head", default="linear", choices=["linear", "tsp"],
                   help="linear softmax, or the tSP kernel form at scale 16, kappa 16 (TSPKernel)")
    p.add_argument("--out", help="write the result JSON here")
    a = p.parse_args(argv)
    r = train(a.data, a.epochs, a.seed, tuple(a.swap), log=lambda s: print(s, file=sys.stderr), head=a.head)
    print(json.dumps({k: v for k, v in r.items() if k != "history"}))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
