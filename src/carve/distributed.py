"""carve under torch.distributed (`torchrun --nproc-per-node N -m carve extract ...`, or the Python
API inside an initialized process group): calibration is sharded across ranks, statistics are
all-reduced, every rank then prunes the same way, and rank 0 alone writes.

With one process (no process group, or a world of one) every function here is the identity: the
engines run exactly as before.

- `shard(items)`: this rank's share of the calibration batches (rank r takes items r, r+N, ...).
- `sum_(tensor)`: summed over the ranks in place.  The layer-wise statistics (Hessians, Wanda's row
  norms) are float64 sums over tokens (carve.scorers.stats), so the statistic of N ranks equals one
  process's up to float64 rounding, hidden by the cast to float32: the same mask.  An all-reduce
  gives every rank the same bits, so every rank's pruning step chooses the same mask.
- `merge_mean(tensor, n)`: a mean over n items on each rank made the mean over all ranks' items, in
  place; returns the total count (the gradient engine's per-weight means: float32, so equal to one
  process's within float tolerance, not bit for bit).
- `writes()`: whether this process writes outputs (rank 0).
- The masked training loop (ops/train.py) shares each step's micro-batches out the same way and
  sums the gathered gradients over the ranks before the optimizer step (data parallel, as DDP):
  every rank then takes the same step.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

from carve.errors import UsageError

T = TypeVar("T")


def _dist() -> object | None:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1  # type: ignore[attr-defined]


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0  # type: ignore[attr-defined]


def active() -> bool:
    return world() > 1


def writes() -> bool:
    return rank() == 0


def shard(items: list[T], what: str = "calibration batches") -> list[T]:
    """This rank's share of `items`; every rank must get at least one."""
    n = world()
    if n == 1:
        return items
    if len(items) < n:
        raise UsageError(f"{len(items)} {what} cannot be shared by {n} processes: use at least {n}")
    return items[rank() :: n]


def merge_mean(tensor: torch.Tensor, n: int) -> int:
    """`tensor`, a mean over `n` items on this rank, becomes the mean over every rank's items."""
    if not active():
        return n
    import torch.distributed as dist

    count = torch.tensor([float(n)], dtype=torch.float64, device=tensor.device)
    dist.all_reduce(count)
    tensor.mul_(n)
    dist.all_reduce(tensor)
    total = int(count.item())
    tensor.div_(total)
    return total


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (one process: as is)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def sum_float(x: float) -> float:
    if not active():
        return x
    return float(sum_(torch.tensor([x], dtype=torch.float64)).item())


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on
    CUDA, gloo on CPU.  Returns whether a group is (now) initialized."""
    import torch.distributed as dist

    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dist.is_available() and dist.is_initialized()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
