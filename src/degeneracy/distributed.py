"""The one place that talks to ``torch.distributed``: ranks, exact reductions, and who writes files.

Every heavy stage shards its data by rank (:func:`degeneracy.run.shard`) and combines its sums with
the helpers here, so that every rank returns the single-process result. Without an initialised
process group (or with one process) every helper is the identity, at no cost.

* :func:`is_distributed`, :func:`rank`, :func:`world_size`, :func:`is_main`;
* :func:`all_reduce_sum` / :func:`all_reduce_max` (tensors, float64 sums stay float64),
  :func:`sum_scalars` (a dict of floats, e.g. summed metrics), :func:`all_gather_rows` (stack the
  ranks' rows, uneven counts allowed), :func:`barrier`;
* :class:`MainRankFilter`: log lines of the ``"degeneracy"`` logger only on rank 0 (installed on import;
  progress bars and the command line's progress lines ask :func:`is_main` too);
* :func:`global_indices`: the global index of this rank's examples (to key per-example random draws);
* :func:`main_writes` / :func:`writes_enabled`: inside ``with main_writes():`` only rank 0 writes
  result files (:mod:`degeneracy.io` and the figures ask :func:`writes_enabled`); the command line
  runs every command in it;
* :func:`process_group_from_env`: the process group ``torchrun`` asks for (gloo on CPUs, NCCL with
  GPUs), so that the command line runs under ``torchrun`` unchanged.

Tensors are reduced on the backend's device (CUDA for NCCL, CPU for gloo) and returned on their own.
Sums are reduced in one collective, so every rank receives bitwise the same numbers and takes the same
decisions (bisections, Lanczos restarts, rank thresholds).

>>> import torch
>>> all_reduce_sum(torch.tensor([1.0, 2.0])).tolist()  # one process: unchanged
[1.0, 2.0]
>>> sum_scalars({"correct": 3.0, "count": 4.0}), is_main(), writes_enabled()
({'correct': 3.0, 'count': 4.0}, True, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "all_reduce_max",
    "sum_scalars",
    "all_gather_rows",
    "global_indices",
    "MainRankFilter",
    "main_writes",
    "writes_enabled",
    "process_group_from_env",
]

_WRITES = {"main_only": False}


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is initialised.

    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group).

    >>> rank()
    0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group).

    >>> world_size()
    1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0 (always true without a process group).

    >>> is_main()
    True
    """
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group).

    >>> barrier()
    """
    if is_distributed():
        dist.barrier()


def _comm_device(x: Tensor) -> torch.device:
    """Where the backend reduces: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(x: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
    if not is_distributed():
        return x
    buffer = x.detach().to(_comm_device(x), copy=True).contiguous()
    dist.all_reduce(buffer, op=op)
    return buffer.to(x.device)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Σ over ranks of ``x`` (same shape on every rank); a new tensor on ``x``'s device, same dtype.

    >>> all_reduce_sum(torch.ones(2, dtype=torch.float64)).dtype
    torch.float64
    """
    return _reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: Tensor) -> Tensor:
    """The elementwise maximum over ranks of ``x``.

    >>> all_reduce_max(torch.tensor([3.0])).item()
    3.0
    """
    return _reduce(x, dist.ReduceOp.MAX)


def sum_scalars(values: Mapping[str, float]) -> dict[str, float]:
    """A dict of floats summed over ranks (float64; every rank must have the same keys).

    >>> sum_scalars({"loss": 1.5})
    {'loss': 1.5}
    """
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    count = all_reduce_sum(torch.tensor([float(len(keys))], dtype=torch.float64))
    if int(count.item()) != len(keys) * world_size():
        raise ValueError(
            "the ranks summed different metrics (a rank without data?): give every rank at least one "
            "example and metrics that return the same keys for every batch"
        )
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) for k, v in zip(keys, total.tolist(), strict=True)}


def all_gather_rows(x: Tensor) -> Tensor:
    """The rows of ``x`` from every rank, concatenated in rank order (row counts may differ).

    >>> all_gather_rows(torch.zeros(3, 2)).shape
    torch.Size([3, 2])
    """
    if not is_distributed():
        return x
    device = _comm_device(x)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=device))
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.detach().to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(x.device)


def global_indices(start: int, count: int) -> Tensor:
    """The global indices of this rank's examples ``start`` … ``start + count − 1`` (counted over its
    shard): example j of rank r is example r + j · world of the data, as :func:`degeneracy.run.shard`
    splits tensors (and a ``DistributedSampler`` without shuffling splits a dataset).

    >>> global_indices(2, 3).tolist()  # one process: its own numbering
    [2, 3, 4]
    """
    return torch.arange(start, start + count) * world_size() + rank()


class MainRankFilter(logging.Filter):
    """A logging filter that passes records on rank 0 only (every record without a process group).
    It is installed on the ``"degeneracy"`` logger, so that under ``torchrun`` its lines appear once.

    >>> record = logging.LogRecord("degeneracy", logging.INFO, "", 0, "built", None, None)
    >>> MainRankFilter().filter(record)  # one process: rank 0
    True
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to emit ``record``: on rank 0."""
        return is_main()


logging.getLogger("degeneracy").addFilter(MainRankFilter())


@contextmanager
def main_writes() -> Iterator[None]:
    """Inside the block only rank 0 writes result files (other ranks compute the same results).

    >>> with main_writes():
    ...     writes_enabled()  # one process: it is rank 0
    True
    """
    before = _WRITES["main_only"]
    _WRITES["main_only"] = True
    try:
        yield
    finally:
        _WRITES["main_only"] = before


def writes_enabled() -> bool:
    """Whether this process writes result files: always, except on ranks > 0 inside :func:`main_writes`.

    >>> writes_enabled()
    True
    """
    return not _WRITES["main_only"] or is_main()


@contextmanager
def process_group_from_env() -> Iterator[None]:
    """A process group inside the block when ``torchrun`` started this process (``WORLD_SIZE`` > 1 in
    the environment) and none is initialised yet: NCCL when CUDA is available (each process on the GPU
    ``LOCAL_RANK``), gloo otherwise; destroyed on exit. Otherwise nothing happens.

    >>> with process_group_from_env():  # not under torchrun
    ...     is_distributed()
    False
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
        dist.barrier()  # leave together: a rank exiting while another still talks to it aborts
    finally:
        dist.destroy_process_group()
