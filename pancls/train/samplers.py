"""Class-rebalancing samplers: instance-balanced, class-balanced and square-root sampling.

With ``n_c`` training images in class ``c``, sampling with class probabilities

    p(c) = n_c^q / sum_k n_k^q

gives instance-balanced sampling for ``q = 1`` (every image equally likely; the plain shuffle),
class-balanced sampling for ``q = 0`` (every class equally likely) and square-root sampling for
``q = 1/2`` (Mahajan et al., "Exploring the Limits of Weakly Supervised Pretraining", ECCV 2018;
Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020).
Each image of class ``c`` then carries the weight ``p(c) / n_c = n_c^(q-1) / sum_k n_k^q``.

Deferred re-sampling (DRS, Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss", NeurIPS 2019) is the same weights switched on from a given epoch; both
:class:`~pancls.train.loaders.TensorBatchLoader` (``weights_from_epoch``) and
:class:`EpochWeightedRandomSampler` (``start_epoch``) implement the switch.

Every random draw here comes from a generator reseeded from ``(seed, epoch)``, never from the global
RNG, so that a run resumed at an epoch boundary draws exactly what an uninterrupted one would.

Distributed training (:mod:`pancls.distributed`): every process builds the same epoch order from the same
``(seed, epoch)`` and :class:`ShardedBatchSampler` hands each rank its contiguous slice of every GLOBAL batch,
so the ranks see disjoint shards of one permutation (or one weighted draw) and their union is, batch for batch,
what a single process trains on. :class:`ShardSampler` splits an evaluation set into contiguous shards whose
predictions, gathered in rank order, are the whole set in its order.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sized

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from pancls.distributed import batch_slice, check_rank, per_rank_batch, shard_bounds

#: sampler kind -> exponent ``q`` of the class count in ``p(c) ∝ n_c^q``
_EXPONENT = {"class_balanced": 0.0, "sqrt": 0.5}
SAMPLER_KINDS = ("none", *_EXPONENT)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed for ``(seed, epoch)``; neighbouring epochs get unrelated streams."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0])


def sample_weights(labels, kind: str) -> Optional[np.ndarray]:
    """Per-image sampling probabilities that realise the class distribution of sampler ``kind``.

    Parameters
    ----------
    labels : array-like of int, shape (N,)
        Training labels (non-negative class indices).
    kind : {"none", "class_balanced", "sqrt"}
        ``"none"`` returns ``None`` (plain shuffling, i.e. instance-balanced sampling).

    Returns
    -------
    numpy.ndarray of float64, shape (N,), summing to 1, or None.
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}; choose one of {list(SAMPLER_KINDS)}")
    if kind == "none":
        return None
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be a non-empty 1-D array of non-negative integers")
    counts = np.bincount(labels).astype(np.float64)
    q = _EXPONENT[kind]
    present = counts > 0
    class_prob = np.zeros_like(counts)
    class_prob[present] = counts[present] ** q
    class_prob /= class_prob.sum()
    per_image = np.zeros_like(counts)
    per_image[present] = class_prob[present] / counts[present]
    weights = per_image[labels]
    return weights / weights.sum()  # exact normalisation against rounding


class EpochWeightedRandomSampler(WeightedRandomSampler):
    """:class:`~torch.utils.data.WeightedRandomSampler` whose draws depend only on ``(seed, epoch)``.

    Call :meth:`set_epoch` before each epoch (the engine does, as with ``DistributedSampler``). Before
    ``start_epoch`` it yields a plain random permutation of the data set (deferred re-sampling); from
    ``start_epoch`` on it draws ``num_samples`` indices with replacement with probability ∝ ``weights``.
    """

    def __init__(self, weights, num_samples: int, seed: int = 0, start_epoch: int = 0):
        super().__init__(torch.as_tensor(weights, dtype=torch.double), num_samples, replacement=True,
                         generator=torch.Generator())
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.seed = int(seed)
        self.start_epoch = int(start_epoch)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def __iter__(self) -> Iterator[int]:
        if self.epoch < self.start_epoch:
            n = len(self.weights)
            order = torch.cat([torch.randperm(n, generator=self.generator)
                               for _ in range(-(-self.num_samples // n))])[: self.num_samples]
            return iter(order.tolist())
        return super().__iter__()


def make_torch_sampler(labels, kind: str, num_samples: Optional[int] = None, seed: int = 0,
                       start_epoch: int = 0) -> Optional[EpochWeightedRandomSampler]:
    """A ``DataLoader`` sampler for ``kind`` (``None`` for ``"none"``: pass ``shuffle=True`` instead).

    ``num_samples`` defaults to the data-set size, so an epoch keeps its usual length.
    """
    weights = sample_weights(labels, kind)
    if weights is None:
        return None
    return EpochWeightedRandomSampler(weights, len(weights) if num_samples is None else int(num_samples),
                                      seed=seed, start_epoch=start_epoch)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` that depends only on ``(seed, epoch)`` (instance-balanced sampling).

    The stand-in for ``DataLoader(shuffle=True)``, whose order comes from the global RNG: every process of a
    distributed run draws the same permutation, and a resumed run the same one as an uninterrupted run."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.seed = int(n), int(seed)
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class ShardedBatchSampler(Sampler[List[int]]):
    """Global batches of ``batch_size`` cut from ``sampler``'s epoch order; this rank gets its slice of each.

    With ``world_size`` processes rank ``r`` yields indices ``order[i*B:(i+1)*B][r*B//W:(r+1)*B//W]`` for
    global batch ``i`` (:func:`pancls.distributed.batch_slice`); ``world_size=1`` is a plain batch sampler
    (``drop_last=False``). ``batch_size`` must divide by ``world_size``. A last global batch smaller than
    the number of processes would leave a rank without an image; it is dropped (the only case where the
    epoch differs from a single process's, by fewer than ``world_size`` images). The last global batch may
    otherwise split unevenly (by one image); the engine weights each rank's loss by its share, so the
    gradient is still the global batch mean.

    :meth:`set_epoch` reseeds ``sampler`` (which must draw from ``(seed, epoch)`` only, as
    :class:`EpochShuffleSampler` and :class:`EpochWeightedRandomSampler` do).
    """

    shard = "batch"

    def __init__(self, sampler: Sized, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_rank(rank, world_size)
        per_rank_batch(batch_size, world_size)
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)

    def __iter__(self) -> Iterator[List[int]]:
        order = list(self.sampler)
        for i in range(len(self)):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield batch[batch_slice(len(batch), self.rank, self.world_size)]


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous share of ``range(n)``, in order (:func:`pancls.distributed.shard_bounds`):
    evaluation on ``world_size`` processes, each predicting its share, the shares gathered in rank order."""

    shard = "data"

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        check_rank(rank, world_size)
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.start, self.stop = shard_bounds(self.n, self.rank, self.world_size)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


def make_batch_sampler(labels, kind: str, batch_size: int, seed: int = 0, start_epoch: int = 0, rank: int = 0,
                       world_size: int = 1) -> ShardedBatchSampler:
    """The training batch sampler of ``DataLoader(batch_sampler=...)``, for one process or ``world_size``.

    ``kind`` ``"none"``: :class:`EpochShuffleSampler`; otherwise :func:`make_torch_sampler`'s re-sampling
    (deferred to ``start_epoch``). ``batch_size`` is the global batch."""
    sampler = make_torch_sampler(labels, kind, seed=seed, start_epoch=start_epoch)
    if sampler is None:
        sampler = EpochShuffleSampler(len(labels), seed=seed)
    return ShardedBatchSampler(sampler, batch_size, rank=rank, world_size=world_size)
