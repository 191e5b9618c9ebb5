"""Data-parallel builds over torch.distributed (gloo) equal a single-process build."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import degeneracy
from tests.conftest import mlp

LAYERS = ["fc1", "fc2", "output"]


def _problem():
    torch.manual_seed(0)
    return mlp([5, 8, 7, 3]), torch.randn(101, 5, dtype=torch.float64)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, x = _problem()
        basis = degeneracy.interaction_basis(model, x, LAYERS, batch_size=16, progress=False)
        if rank == 0:
            basis.save(os.path.join(out_dir, "dist.safetensors"))
        dist.barrier()  # both ranks leave together: a rank exiting while gloo still talks to it aborts
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_equal_one(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = degeneracy.load_basis(tmp_path / "dist.safetensors")
    model, x = _problem()
    one = degeneracy.interaction_basis(model, x, LAYERS, batch_size=16, progress=False)
    for name in LAYERS:
        torch.testing.assert_close(two[name].eigenvalues, one[name].eigenvalues, rtol=1e-10, atol=1e-14)
        f1 = one.transform(name, torch.ones(1, one[name].width - 1, dtype=torch.float64))
        f2 = two.transform(name, torch.ones(1, one[name].width - 1, dtype=torch.float64))
        torch.testing.assert_close(f2.abs(), f1.abs(), rtol=1e-8, atol=1e-10)
    assert two.info["n_examples"] == one.info["n_examples"] == 101
