"""LLC chains over ``torch.distributed``: each rank runs its share of the chains, all ranks gather them.

A chain's noise depends on ``(seed, chain index)`` only and the minibatch order on ``seed`` only
(:mod:`degeneracy.llc.sgld`), so chain ``c`` is the same whichever rank runs it, alone or with others:
under an initialised process group the chains ``rank, rank + world, ...`` run on rank ``rank``
(:func:`my_chains`) and :func:`gather_chain_runs` puts every rank's chains back in order on every rank.
The estimate then does not depend on the number of processes, and every rank returns the same result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from degeneracy.llc.sgld import ChainRun

__all__ = ["process_group", "is_main_process", "my_chains", "gather_chain_runs", "empty_chain_run"]


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` without an initialised process group.

    >>> process_group()
    (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes files and logs.

    >>> is_main_process()
    True
    """
    return process_group()[0] == 0


def my_chains(num_chains: int) -> list[int]:
    """The chains this rank runs: ``rank, rank + world, ...`` (all of them in one process).

    >>> my_chains(4)
    [0, 1, 2, 3]
    """
    rank, world = process_group()
    return list(range(num_chains))[rank::world]


def empty_chain_run(num_draws: int, num_burnin: int, dim: int, dtype: torch.dtype) -> ChainRun:
    """The run of no chain (a rank with more ranks than chains).

    >>> empty_chain_run(5, 2, 3, torch.float64).loss_traces.shape
    torch.Size([0, 5])
    """
    return ChainRun(
        torch.zeros(0, num_draws, dtype=torch.float64),
        torch.zeros(0, num_burnin, dtype=torch.float64),
        torch.zeros(0, dim, dtype=dtype),
        seconds=0.0,
    )


def gather_chain_runs(run: ChainRun, ids: list[int], num_chains: int) -> ChainRun:
    """Every rank's chains, in chain order, on every rank (``run`` holds the chains ``ids`` of this
    rank); the wall time is the slowest rank's. Without a process group ``run`` is returned as is.

    >>> run = empty_chain_run(3, 0, 2, torch.float64)
    >>> gather_chain_runs(run, [], 0) is run
    True
    """
    rank, world = process_group()
    if world == 1:
        return run
    mine = (
        ids,
        run.loss_traces.cpu(),
        run.burnin_traces.cpu(),
        run.final_params.cpu(),
        None if run.acceptance is None else run.acceptance.cpu(),
        float(run.seconds),
    )
    parts: list[tuple | None] = [None] * world
    dist.all_gather_object(parts, mine)
    order: dict[int, tuple[int, int]] = {}
    for r, part in enumerate(parts):
        assert part is not None
        for row, c in enumerate(part[0]):
            order[c] = (r, row)
    if sorted(order) != list(range(num_chains)):
        raise RuntimeError(f"the ranks ran chains {sorted(order)}, expected 0..{num_chains - 1}")

    def stack(field: int) -> torch.Tensor:
        return torch.stack([parts[r][field][row] for r, row in (order[c] for c in range(num_chains))])  # type: ignore[index]

    acceptance = None
    if all(part[4] is not None for part in parts if part is not None and part[0]):
        acceptance = stack(4)
    return ChainRun(
        loss_traces=stack(1),
        burnin_traces=stack(2),
        final_params=stack(3),
        seconds=max(float(part[5]) for part in parts if part is not None),
        acceptance=acceptance,
    )
