"""An in-memory, on-device batch loader for small 2D data sets (CIFAR-sized).

A CIFAR-LT training set (12k-50k images of 32x32x3 uint8, at most 150 MB) fits on any GPU, so the
whole set is kept as one tensor on the training device and batches are gathered by indexing it: no
worker processes, no host-to-device copies, no per-image Python. Augmentation runs batched on the
device through ``transform(x, generator)``.

Reproducibility: all randomness (order, re-sampling, augmentation) comes from the loader's own
``torch.Generator``, reseeded from ``(seed, epoch)`` by :meth:`TensorBatchLoader.set_epoch`. A run
resumed at an epoch boundary therefore sees exactly the batches and augmentations of an
uninterrupted run, whatever else consumed the global RNG.

Distributed training: with ``world_size`` processes each builds the same loader and the same epoch order;
``shard="batch"`` (training) gives rank ``r`` its contiguous ``batch_size / world_size`` slice of every global
batch, augmented as part of the whole global batch so that its images are bit for bit those a single process
would train on (the price: each rank augments ``batch_size`` images, not ``batch_size / world_size``; small
next to the model on the device). ``shard="data"`` (evaluation) gives rank ``r`` its contiguous share of the
data set (:func:`pancls.distributed.shard_bounds`), iterated in batches of ``batch_size``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Literal, Optional, Tuple

import torch

from pancls.distributed import batch_slice, check_rank, per_rank_batch, shard_bounds
from pancls.train.samplers import epoch_seed

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class TensorBatchLoader:
    """Iterate ``(x, y)`` batches of an in-memory tensor data set, on its device.

    Parameters
    ----------
    images : Tensor, shape (N, ...)
        uint8 or float images. They are moved to ``device`` once; batches are yielded as stored unless
        ``transform`` converts them (e.g. uint8 NHWC -> normalised float NCHW).
    labels : Tensor or array-like of int, shape (N,)
    batch_size : int
    shuffle : bool
        Random order each epoch (without replacement). Ignored while ``sample_weights`` is active.
    drop_last : bool
        Drop the last incomplete batch.
    sample_weights : Tensor or array-like, shape (N,), optional
        Per-image sampling weights (see :func:`pancls.train.samplers.sample_weights`). From epoch
        ``weights_from_epoch`` on, each epoch draws N indices with replacement with probability ∝ weight.
    device : torch.device or str, optional
        Where the data and batches live; defaults to the device ``images`` are on.
    transform : callable ``(x, generator) -> x``, optional
        Batched augmentation / normalisation; must draw its randomness from ``generator`` only.
    seed : int
        Base seed of the loader's generator.
    weights_from_epoch : int
        First epoch that uses ``sample_weights`` (deferred re-sampling); earlier epochs use ``shuffle``.
    rank, world_size : int
        This process and the number of processes of a distributed run (see the module docstring).
    shard : {"batch", "data"}
        ``"batch"``: ``batch_size`` is the global batch, split across the ranks (it must divide by
        ``world_size``; a last global batch smaller than ``world_size`` is dropped). ``"data"``: each rank
        iterates its contiguous share of the data set in batches of ``batch_size``, in order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        sample_weights=None,
        *,
        device: torch.device | str | None = None,
        transform: Optional[Transform] = None,
        seed: int = 0,
        weights_from_epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shard: Literal["batch", "data"] = "batch",
    ):
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = torch.as_tensor(labels).to(self.device, torch.long)
        n = len(self.images)
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match images, got {tuple(self.labels.shape)}")
        if n == 0:
            raise ValueError("cannot build a loader over an empty data set")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} > {n} images with drop_last=True leaves no batch")
        if weights_from_epoch < 0:
            raise ValueError(f"weights_from_epoch must be >= 0, got {weights_from_epoch}")
        self.weights = None
        if sample_weights is not None:
            w = torch.as_tensor(sample_weights, dtype=torch.float64)
            if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"sample_weights must be {n} finite non-negative numbers with a positive sum")
            # multinomial takes float32 on CUDA; normalising first keeps the float32 cast accurate.
            self.weights = (w / w.sum()).to(self.device, torch.float32)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.transform = transform
        self.seed = int(seed)
        self.weights_from_epoch = int(weights_from_epoch)
        if shard not in ("batch", "data"):
            raise ValueError(f"shard must be 'batch' or 'data', got {shard!r}")
        check_rank(rank, world_size)
        if shard == "batch":
            per_rank_batch(self.batch_size, world_size)
        self.rank, self.world_size, self.shard = int(rank), int(world_size), shard
        self.generator = torch.Generator(device=self.device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reseed from ``(seed, epoch)``: the epoch's batches depend on nothing else."""
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def __len__(self) -> int:
        if self.shard == "data":
            start, stop = shard_bounds(len(self.images), self.rank, self.world_size)
            return -(-(stop - start) // self.batch_size)
        full, rest = divmod(len(self.images), self.batch_size)
        return full + (1 if not self.drop_last and rest >= self.world_size else 0)

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        if self.weights is not None and self.epoch >= self.weights_from_epoch:
            return torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        if self.shuffle:
            return torch.randperm(n, generator=self.generator, device=self.device)
        return torch.arange(n, device=self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        if self.shard == "data":
            order = order[slice(*shard_bounds(len(order), self.rank, self.world_size))]
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.transform is not None:
                x = self.transform(x, self.generator)
            if self.shard == "batch" and self.world_size > 1:  # this rank's slice of the augmented global batch
                mine = batch_slice(len(idx), self.rank, self.world_size)
                x, idx = x[mine], idx[mine]
            yield x, self.labels[idx]
