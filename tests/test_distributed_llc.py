"""LLC chains over torch.distributed (gloo, 2 processes): the chains are split over the ranks and
gathered, so the estimate equals the one-process estimate chain by chain, every rank returns the same
result, N_eff(ε) sweeps agree, and the llc command writes files on rank 0 only (issue 10)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import mlp

KW = dict(
    loss="behavioral",
    nbeta=30.0,
    localization=10.0,
    step_size=1e-3,
    num_chains=5,
    num_draws=40,
    num_burnin=10,
    batch_size=16,
    seed=3,
    warn=False,
)


def _problem():
    torch.manual_seed(0)
    return mlp([4, 6, 3]), torch.randn(48, 4, dtype=torch.float64)


def _cli_config(folder: str, rank: int = 0) -> str:
    path = os.path.join(folder, f"llc{rank}.yaml")  # one file per rank: a shared one races
    with open(path, "w") as f:
        f.write(
            "model: {name: digits_mlp, split: test, limit: 64, dtype: float64}\n"
            "sampler: {nbeta: 50, localization: 100, num_chains: 3, num_draws: 10, num_burnin: 5,\n"
            "          batch_size: 32}\n"
            "plots: false\nprogress: false\n"
        )
    return path


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from degeneracy.commands.config import LLCRunConfig, load_run
        from degeneracy.commands.llc import run_llc
        from degeneracy.llc import effective_parameter_count, estimate_llc

        model, x = _problem()
        result = estimate_llc(model, x, **KW)
        count = effective_parameter_count(model, x, [0.05], **{k: v for k, v in KW.items() if k != "nbeta"})
        # the test itself writes each rank's return value, to compare them
        torch.save(
            {
                "traces": result.loss_traces,
                "estimates": result.chain_estimates,
                "mean": result.mean,
                "n_eff": count.n_eff,
                "nbetas": count.nbetas,
            },
            os.path.join(folder, f"rank{rank}.pt"),
        )
        cfg, cli_model, data, _ = load_run(_cli_config(folder, rank), LLCRunConfig)
        summary = run_llc(cfg, cli_model, data, os.path.join(folder, f"out{rank}"), log=None)
        with open(os.path.join(folder, f"summary{rank}.json"), "w") as f:
            json.dump(summary["estimate"], f)
        dist.barrier()  # both ranks leave together
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# default tier (issue 10: CI runs it): two spawned interpreters, a sweep and the command
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_give_the_one_process_chains(tmp_path) -> None:
    from degeneracy.commands.config import LLCRunConfig, load_run
    from degeneracy.commands.llc import run_llc
    from degeneracy.llc import effective_parameter_count, estimate_llc

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)
    model, x = _problem()
    one = estimate_llc(model, x, **KW)
    sweep = effective_parameter_count(model, x, [0.05], **{k: v for k, v in KW.items() if k != "nbeta"})
    for got in ranks:  # every rank returns the one-process result, chain by chain
        torch.testing.assert_close(got["traces"], one.loss_traces, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["estimates"], one.chain_estimates, rtol=0, atol=1e-10)
        assert got["mean"] == pytest.approx(one.mean, abs=1e-10)
        torch.testing.assert_close(got["n_eff"], sweep.n_eff, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["nbetas"], sweep.nbetas, rtol=1e-10, atol=1e-10)
    assert torch.equal(ranks[0]["traces"], ranks[1]["traces"])
    # the command: rank 0 writes, rank 1 writes nothing, both return the one-process estimate
    assert (tmp_path / "out0" / "llc.safetensors").exists() and (tmp_path / "out0" / "summary.json").exists()
    assert not (tmp_path / "out1").exists()
    cfg, cli_model, data, _ = load_run(_cli_config(str(tmp_path)), LLCRunConfig)
    alone = run_llc(cfg, cli_model, data, tmp_path / "alone", log=None)["estimate"]
    for r in range(2):
        got = json.loads((tmp_path / f"summary{r}.json").read_text())
        assert got["llc"] == pytest.approx(alone["llc"], abs=1e-10)
        assert got["num_parameters"] == alone["num_parameters"]
