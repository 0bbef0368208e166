"""Data-parallel training with PyTorch's own engine: ``DistributedDataParallel`` launched by ``torchrun``.

``torchrun`` starts one process per device and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`session` joins that process group (``nccl`` on CUDA, ``gloo`` on CPU)
and pins the process to GPU ``LOCAL_RANK``. Without those variables (a plain ``pancls`` command) everything
here is the identity: one process, rank 0, nothing communicated.

The rules that make a run on ``W`` processes the same run as on one (see :func:`pancls.train.engine.fit`):

* ``train.batch_size`` is the GLOBAL batch. Every process builds the same global order of the epoch (the same
  seeded sampler) and takes its contiguous ``batch_size / W`` slice of every global batch
  (:func:`batch_slice`), so the ranks see disjoint shards whose union is exactly the single-process batch;
* evaluation runs on contiguous shards of the evaluation set (:func:`shard_bounds`) whose logits are gathered
  in rank order (:func:`gather_rows`): the full set, in its order, with exact counts;
* only rank 0 writes (checkpoints, logs, TensorBoard, results, reports); every decision that depends on a file
  is taken by rank 0 and broadcast (:meth:`Context.broadcast`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from pancls.validation import InvalidParameter

#: The variables torchrun sets in every process it starts.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: gradients, metrics and decisions are communicated."""
        return self.world_size > 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object); ``value`` itself in one process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> List[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        if not self.active:
            return [value]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returned for chaining."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def context() -> Context:
    """The current process group's :class:`Context` (single-process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    rank, world = dist.get_rank(), dist.get_world_size()
    return Context(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def launched_by_torchrun() -> bool:
    """True when the environment asks for more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Tuple[Context, torch.device]]:
    """Join torchrun's process group for the duration of a run; yields ``(context, device)``.

    Under torchrun (``WORLD_SIZE`` > 1) the backend is ``nccl`` for a CUDA ``device`` and ``gloo`` otherwise;
    a CUDA process gets GPU ``LOCAL_RANK`` (``cuda:LOCAL_RANK``). The group is destroyed on the way out, after a
    barrier when the body ended normally. A group that already exists (a caller that initialised it, e.g. a test
    with ``torch.multiprocessing.spawn``) is used and left alone; without torchrun the context is single-process
    and ``device`` is returned unchanged.
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        ctx = context()
        yield ctx, _rank_device(device, ctx)
        return
    if not launched_by_torchrun():
        yield Context(), device
        return
    missing = [v for v in TORCHRUN_VARS if not os.environ.get(v)]
    if missing:
        raise InvalidParameter(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset; start "
                               "distributed runs with torchrun (it sets them all)", "environment")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InvalidParameter(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                                   "visible; start at most one process per GPU (torchrun --nproc-per-node)",
                                   "environment")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        ctx = context()
        yield ctx, _rank_device(device, ctx)
        # every rank is done with the group before any tears it down: a rank that closes its connections while
        # a peer is still between its last collective and its own teardown can abort the peer (gloo, SIGABRT
        # "terminate called without an active exception", seen once in CI). Not on an exception: the peers may
        # be gone, and a barrier would wait for them until the timeout.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank_device(device: torch.device, ctx: Context) -> torch.device:
    if device.type == "cuda" and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return device


def check_rank(rank: int, world_size: int) -> None:
    """``0 <= rank < world_size``, or a ValueError naming both (every sharded loader and sampler checks it)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")


def main_log(log: Callable[[str], None], ctx: Context) -> Callable[[str], None]:
    """``log`` on rank 0; a function that prints nothing on the other ranks (one process writes the log)."""
    return log if ctx.is_main else _quiet


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


def per_rank_batch(batch_size: int, world_size: int, key: str = "train.batch_size") -> int:
    """``batch_size / world_size``: the images one process takes of every global batch. A global batch that
    does not divide by the number of processes is refused (the ranks would differ in batch size)."""
    if batch_size % world_size:
        raise InvalidParameter(f"the global batch {batch_size} does not divide by the {world_size} processes; "
                               f"choose a multiple of {world_size}", key)
    return batch_size // world_size


def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items: ``n * r // W`` to ``n * (r+1) // W``.

    Shares differ by at most one item and, concatenated in rank order, are ``range(n)`` again."""
    return n * rank // world_size, n * (rank + 1) // world_size


def batch_slice(n: int, rank: int, world_size: int) -> slice:
    """This rank's part of a global batch of ``n`` items (:func:`shard_bounds`)."""
    return slice(*shard_bounds(n, rank, world_size))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random draws (dropout, augmentation): ``seed`` on rank 0, so that one
    process draws what it always drew; a well-mixed 31-bit derivative of ``(seed, rank)`` elsewhere."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0] % (2 ** 31))


def gather_rows(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (ranks may hold different row counts).

    Rows are padded to the largest count for ``all_gather`` and trimmed after, so the result is exact."""
    if not ctx.active:
        return tensor
    tensor = tensor.contiguous()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def broadcast_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP only broadcasts them before each
    training forward pass, so after the last step each rank holds its own; evaluation must use rank 0's, the
    ones its checkpoint saves."""
    if ctx.active:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def is_main_process() -> bool:
    """Rank 0 of torchrun's processes (``RANK`` unset or 0), also before or after :func:`session`: the process
    that prints a command's result."""
    return int(os.environ.get("RANK", "0") or 0) == 0
