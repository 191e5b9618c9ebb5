"""Data-parallel runs over torch.distributed (gloo) equal a single-process run.

One spawn of two processes computes every stage (basis, edges, node and edge ablations, exact Hessian
spectra on every Gram path, Lanczos top-k with trace and SLQ, the degeneracy report, neuron
synchronisation); rank 0 stores both ranks' results, and the test compares each with the same stage run
in this (single) process: float64 statistics to 1e-10 relative, decisions (edges needed, ranks, blocks)
exactly, and the two ranks bitwise alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import degeneracy
from degeneracy.ablation import edge_ablation, node_ablation_curves
from degeneracy.accounting import degeneracy_report, hessian_spectrum, neuron_synchronization, sparsify
from degeneracy.commands.errors import echo_err
from degeneracy.distributed import all_gather_rows, all_reduce_max, all_reduce_sum, main_writes, sum_scalars
from degeneracy.io import save_json
from degeneracy.run import shard
from tests.conftest import mlp
from tests.test_accounting import planted_mlp
from tests.test_edges import SEQ_LAYERS, SeqModel
from tests.test_progress import Terminal

LAYERS = ["fc1", "fc2", "output"]
RTOL = 1e-10


def _problem():
    torch.manual_seed(3)
    model, x = mlp([5, 8, 7, 3]), torch.randn(101, 5, dtype=torch.float64)
    with torch.no_grad():  # logits that vary with the input: all three classes predicted
        model.fc2.weight.mul_(6.0)
        model.fc2.bias.zero_()
    return model, x


def _seq_problem():
    torch.manual_seed(2)
    return SeqModel(positions=3).double(), torch.randn(13, 3, 4, dtype=torch.float64)


def _relu_problem():
    torch.manual_seed(1)
    model = mlp([4, 6, 5, 2], act=nn.ReLU)
    x = torch.randn(61, 4, dtype=torch.float64)
    x[:, 3] = 0.0  # a constant input: activation rank drops
    with torch.no_grad():
        model.fc0.bias[:2] = -50.0  # two dead neurons: a synchronised block
    return model, x


def _stages(full: bool) -> dict[str, Any]:
    """The stages on the problems above (the same code on one process and on each rank): the quick set
    (basis, edges, edge and node ablations, exact Hessian, Lanczos, the degeneracy report, ±1 sources,
    Section 4) or, with ``full``, also the other exact Gram paths and neuron synchronisation."""
    model, x = _problem()
    out: dict[str, Any] = {}
    basis = degeneracy.interaction_basis(model, x, LAYERS, batch_size=32, progress=False)
    out["basis"] = basis
    graph = degeneracy.interaction_graph(model, x, basis, batch_size=32, progress=False)
    out["edges"] = graph
    labels = model(x).argmax(-1)
    out["edge_ablation"] = edge_ablation(model, x, basis, graph, labels=labels, delta=0.001)
    out["exact_kronecker"] = hessian_spectrum(model, x, method="exact", batch_size=32)
    seq, xs = _seq_problem()  # ±1 sources, drawn per example: the shards draw the one-process signs
    sourced = dict(num_sources=3, seed=5, batch_size=4, progress=False)
    out["sourced_basis"] = degeneracy.interaction_basis(seq, xs, SEQ_LAYERS, sections=None, **sourced)
    out["sourced_edges"] = degeneracy.interaction_graph(
        seq, xs, out["sourced_basis"], jacobian_mode="vjp", **sourced
    )
    planted, xp = planted_mlp()  # the Section 4 construction: sharded sums, the same new model
    out["sparsify"] = sparsify(planted, xp, batch_size=64)
    noisy = xp + 1e-4 * torch.randn(xp.shape, generator=torch.Generator().manual_seed(0), dtype=xp.dtype)
    out["sparsify_epsilon"] = sparsify(planted, noisy, epsilon=1e-6, batch_size=64)  # folds by least squares
    out["nodes"] = node_ablation_curves(model, x, basis, labels=labels, num_points=3, batch_size=32)
    out["lanczos"] = hessian_spectrum(
        model, x, method="lanczos", k=4, block_size=4, tol=1e-8, num_trace_probes=4, num_rank_probes=2,
        num_rank_steps=8,
    )  # fmt: skip
    relu, xr = _relu_problem()
    out["report"] = degeneracy_report(relu, xr, hessian="exact", batch_size=32)
    if not full:
        return out
    out["exact_jacobians"] = hessian_spectrum(model, x, method="exact", forward=lambda m, i: m(i))
    out["exact_outputs"] = hessian_spectrum(model, x[:21], method="exact", batch_size=8)  # 63 rows < N
    out["sync"] = neuron_synchronization(relu, xr, "act0", jacobians=True)
    return out


def _helpers(rank: int, out_dir: str) -> dict[str, Any]:
    """The reduction helpers and the write rule on two ranks."""
    out: dict[str, Any] = {
        "rows": all_gather_rows(torch.full((rank + 1, 2), float(rank), dtype=torch.float64)),
        "max": all_reduce_max(torch.tensor([float(rank), -float(rank)])),
        "sum": all_reduce_sum(torch.tensor([1.0, float(rank)], dtype=torch.float64)),
        "scalars": sum_scalars({"loss": 0.5 + rank, "count": 2.0}),
    }
    try:
        sum_scalars({"loss": 1.0} if rank == 0 else {"loss": 1.0, "extra": 2.0})
    except ValueError as err:
        out["mismatch"] = str(err)
    try:
        shard(torch.zeros(1, 3))
    except ValueError as err:
        out["too_few"] = str(err)
    logged, logger = io.StringIO(), logging.getLogger("degeneracy")
    handler, level = logging.StreamHandler(logged), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:  # progress bars, log lines and a command's progress lines: rank 0 only
        with contextlib.redirect_stderr(Terminal()) as printed:  # bars draw in a terminal only
            model, x = _problem()
            degeneracy.interaction_basis(model, x[:20], LAYERS, progress=True)
            hessian_spectrum(model, x[:20], method="exact", progress=True)
            echo_err("[stage] running ...")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    out["printed"], out["logged"] = printed.getvalue(), logged.getvalue()
    with main_writes():
        save_json(os.path.join(out_dir, f"written_by_rank{rank}.json"), "test", {"rank": rank})
    save_json(os.path.join(out_dir, f"outside_by_rank{rank}.json"), "test", {"rank": rank})
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, full: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {**_stages(full), "helpers": _helpers(rank, out_dir)}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            results["basis"].save(os.path.join(out_dir, "dist.safetensors"))
            torch.save(gathered, os.path.join(out_dir, "ranks.pt"))
        dist.barrier()  # both ranks leave together: a rank exiting while gloo still talks to it aborts
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """|a − b| ≤ rtol·max|b| (+ a float64 floor for all-zero tensors)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=0.0, atol=rtol * scale + 1e-300, msg=lambda m: f"{what}: {m}")


def _scalar(a: float, b: float, what: str, rtol: float = RTOL) -> None:
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-14), f"{what}: {a} != {b}"


def _spectrum(two, one, what: str) -> None:
    assert two.num_examples == one.num_examples and two.method == one.method, what
    assert two.gram_side == one.gram_side and two.matvecs == one.matvecs, what
    _close(two.eigenvalues, one.eigenvalues, f"{what} eigenvalues")
    assert two.rank() == one.rank() if two.complete else True
    if one.trace is not None:
        _scalar(two.trace, one.trace, f"{what} trace")
    if one.residuals is not None:
        _close(two.residuals, one.residuals, f"{what} residuals", rtol=1e-6)


def _compare(two: dict[str, Any], one: dict[str, Any]) -> None:
    for name in LAYERS:  # the basis
        b1, b2 = one["basis"][name], two["basis"][name]
        _close(b2.eigenvalues, b1.eigenvalues, f"basis {name}")
        f1 = one["basis"].transform(name, torch.ones(1, b1.width - 1, dtype=torch.float64))
        f2 = two["basis"].transform(name, torch.ones(1, b1.width - 1, dtype=torch.float64))
        torch.testing.assert_close(f2.abs(), f1.abs(), rtol=1e-8, atol=1e-10)
    g1, g2 = one["edges"], two["edges"]  # the edges: sums and counts over both shards
    assert g2.info["n_examples"] == g1.info["n_examples"] == 101
    for pair in g1.pairs:
        _close(g2.edges[pair], g1.edges[pair], f"edges {pair}")
        assert g2.completeness[pair] < 1e-10 and g1.completeness[pair] < 1e-10  # rounding level on both
    for pair, r1 in one["edge_ablation"].items():  # the bisection decides alike
        r2 = two["edge_ablation"][pair]
        assert r1.num_needed > 0, "the check needs a pair where some edges are needed"
        assert (r2.num_needed, r2.evaluations) == (r1.num_needed, r1.evaluations)
        _scalar(r2.threshold, r1.threshold, f"edge ablation {pair} threshold")
        for n, loss in r1.losses.items():
            _scalar(r2.losses[n], loss, f"edge ablation {pair} loss at {n}")
    _spectrum(two["exact_kronecker"], one["exact_kronecker"], "exact_kronecker")
    b1, b2 = one["sourced_basis"], two["sourced_basis"]  # ±1 sources: eigenvalues and their SEs
    assert b1.info["jacobians"]["mix->out"] == "±1 sources"
    assert float(b1["mix"].eigenvalue_se.max()) > 1e-3 * float(b1["mix"].eigenvalues.max())  # a spread
    for name in SEQ_LAYERS[:-1]:  # ("out" -> "output" is affine: exact, SEs at rounding level)
        _close(b2[name].eigenvalues, b1[name].eigenvalues, f"sourced basis {name}")
        scale = RTOL * float(b1[name].eigenvalues.max())
        torch.testing.assert_close(b2[name].eigenvalue_se, b1[name].eigenvalue_se, rtol=0, atol=scale)
    g1, g2 = one["sourced_edges"], two["sourced_edges"]  # edges and their SEs
    for pair in g1.pairs:
        assert g1.info["modes"][f"{pair[0]}->{pair[1]}"] == "vjp" and float(g1.edge_se[pair].max()) > 0
        _close(g2.edges[pair], g1.edges[pair], f"sourced edges {pair}")
        _close(g2.edge_se[pair], g1.edge_se[pair], f"sourced edges {pair} SE")
    s1, s2 = one["sparsify"], two["sparsify"]
    assert s1.verified and s2.verified and s1.free_directions == 8 + 12 + 30
    assert s2.layers == s1.layers and s2.pinned == s1.pinned
    assert (s2.zeros_before, s2.zeros_after, s2.free_directions) == (s1.zeros_before, s1.zeros_after, 50)
    for name, w1 in s1.model.state_dict().items():
        _close(s2.model.state_dict()[name], w1, f"sparsified {name}")
    s1, s2 = one["sparsify_epsilon"], two["sparsify_epsilon"]  # the fold depends on every rank's rows
    assert s1.layers[0]["dependencies"] == 1 and s2.layers == s1.layers
    for name, w1 in s1.model.state_dict().items():
        _close(s2.model.state_dict()[name], w1, f"sparsified with epsilon {name}")
    for layer, c1 in one["nodes"].items():  # node ablations: metrics summed over the shards
        c2 = two["nodes"][layer]
        assert c2.num_kept == c1.num_kept and c2.accuracy == c1.accuracy, layer
        _scalar(c2.base_loss, c1.base_loss, f"node {layer} base loss")
        for a, b in zip(c2.loss, c1.loss, strict=True):
            _scalar(a, b, f"node {layer} loss")
    _spectrum(two["lanczos"], one["lanczos"], "lanczos")
    _scalar(two["lanczos"].trace_stderr, one["lanczos"].trace_stderr, "Hutchinson stderr")
    _scalar(two["lanczos"].rank_estimate(1e-6)[0], one["lanczos"].rank_estimate(1e-6)[0], "SLQ rank")
    r1, r2 = one["report"], two["report"]  # the degeneracy report: every row, count and the Hessian
    assert r2.num_examples == r1.num_examples == 61 and r2.union == r1.union
    assert [(r.layer, r.source, r.count) for r in r2.rows] == [(r.layer, r.source, r.count) for r in r1.rows]
    assert (r2.hessian_rank, r2.hessian_nullity) == (r1.hessian_rank, r1.hessian_nullity)
    assert [d["blocks"] for d in r2.neuron_layers] == [d["blocks"] for d in r1.neuron_layers]
    assert r1.count("activation rank") > 0 and r1.hessian_nullity > 0
    if "sync" not in one:
        return
    for key in ("exact_jacobians", "exact_outputs"):
        _spectrum(two[key], one[key], key)
    assert one["exact_kronecker"].gram_side == "parameters" and one["exact_outputs"].gram_side == "outputs"
    s1, s2 = one["sync"], two["sync"]
    assert s2.blocks == s1.blocks and s2.block_ranks == s1.block_ranks and [0, 1] in s1.blocks


def _check(tmp_path, full: bool) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), full), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=False)
    one = _stages(full)
    for two in ranks:
        _compare(two, one)
    _compare(ranks[1], ranks[0])  # the ranks agree (with each other, as with one process)
    for rank, two in enumerate(ranks):
        helpers = two["helpers"]
        assert helpers["rows"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert helpers["max"].tolist() == [1.0, 0.0] and helpers["sum"].tolist() == [2.0, 1.0]
        assert helpers["scalars"] == {"count": 4.0, "loss": 2.0}
        assert "different metrics" in helpers["mismatch"], rank
        assert "1 examples cannot be split over 2 processes" in helpers["too_few"], rank
        printed, logged = helpers["printed"], helpers["logged"]
        if rank == 0:
            assert "M[fc1]" in printed and "Hessian" in printed and "[stage] running ..." in printed
            assert "exact LIB M" in logged
        else:
            assert printed == logged == "", (printed, logged)
    assert (tmp_path / "written_by_rank0.json").exists() and not (tmp_path / "written_by_rank1.json").exists()
    assert (tmp_path / "outside_by_rank1.json").exists()  # outside main_writes() every rank writes
    saved = degeneracy.load_basis(tmp_path / "dist.safetensors")
    assert saved.info["n_examples"] == 101
    _close(saved["fc1"].eigenvalues, one["basis"]["fc1"].eigenvalues, "saved basis")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_equal_one(tmp_path) -> None:
    """Basis, edges (all-reduced sums and counts), edge and node ablations (the same bisection on both
    ranks), the exact Hessian, Lanczos top-k with Hutchinson and SLQ, the degeneracy report, a basis and
    edges with ±1 sources (eigenvalue and edge standard errors too), the Section 4 construction, and
    progress bars and log lines on rank 0 alone."""
    _check(tmp_path, full=False)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_equal_one_every_stage(tmp_path) -> None:
    """And the other exact Gram paths (per-example Jacobians, output-side Gram) and neuron
    synchronisation."""
    _check(tmp_path, full=True)
