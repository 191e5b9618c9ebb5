"""Every long loop advances its progress bar in examples (steps for LLC, vectors for Krylov methods), by
the examples of each batch and within a batch as its work is done, up to the number of examples; and
prints nothing when stderr is not a terminal. The bars are recorded by a stand-in for tqdm."""

from __future__ import annotations

import io
import itertools
import sys

import pytest
import torch
import tqdm.auto

import degeneracy
import degeneracy.progress
from degeneracy.ablation import edge_ablation, node_ablation_curves
from tests.conftest import mlp

LAYERS = ["fc1", "fc2", "output"]
N, BATCH = 20, 8  # batches of 8, 8 and 4 examples


class Recorder:
    """A tqdm stand-in that records each bar shown (not disabled): its total, unit, description and
    every update."""

    bars: list[Recorder] = []

    def __init__(self, iterable=None, total=None, desc="", unit="it", disable=None, **_: object) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.updates: list[int] = []
        if disable is not True:  # None: shown on a terminal
            Recorder.bars.append(self)

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.updates.append(1)

    @property
    def positions(self) -> list[int]:
        return list(itertools.accumulate(self.updates))

    @staticmethod
    def write(*_: object, **__: object) -> None:
        pass


@pytest.fixture
def bars(monkeypatch) -> list[Recorder]:
    Recorder.bars = []
    monkeypatch.setattr(degeneracy.progress, "tqdm", Recorder)
    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)  # the samplers import it where they run
    return Recorder.bars


def _named(bars: list[Recorder], desc: str) -> list[Recorder]:
    return [b for b in bars if b.desc.startswith(desc)]


def _counts_examples_by_batch(bar: Recorder) -> None:
    """Total N examples; the bar passes each batch's end (8, 16, 20); no step larger than a batch."""
    assert bar.total == N and bar.unit == "ex" and sum(bar.updates) == N, (bar.desc, bar.updates)
    assert {BATCH, 2 * BATCH, N} <= set(bar.positions), (bar.desc, bar.positions)
    assert max(bar.updates) <= BATCH


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3])
    x = torch.randn(N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, model(x).argmax(-1)


def test_basis_passes_move_per_example_within_each_batch(bars, setup) -> None:
    """The activation pass moves after the forward pass and after each node layer's moments (4 parts
    per batch); the M passes per block of Jacobian rows (max_elements small: one row per block)."""
    model, x, _ = setup
    moved = degeneracy.interaction_basis(model, x, LAYERS, batch_size=BATCH, max_elements=1, progress=True)
    moments = _named(bars, "moments")[0]
    _counts_examples_by_batch(moments)
    assert moments.updates == [2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1]  # 8·j//4 for j = 1..4, then 4·j//4
    m_bars = _named(bars, "M[")
    assert m_bars and all(b.total == N for b in m_bars)
    for bar in m_bars:
        _counts_examples_by_batch(bar)
    assert max(len(b.updates) for b in m_bars) > 3  # an autodiff pass moves within its batches
    quiet = degeneracy.interaction_basis(model, x, LAYERS, batch_size=BATCH, max_elements=1, progress=False)
    for name in LAYERS:  # the bar only watches: the same numbers, bit for bit
        torch.testing.assert_close(moved[name].C, quiet[name].C, rtol=0, atol=0)


def test_edges_move_per_pair_within_each_batch(bars, setup) -> None:
    model, x, _ = setup
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, batch_size=BATCH, progress=True)
    edges = _named(bars, "edges")[0]
    _counts_examples_by_batch(edges)
    assert edges.updates == [2, 3, 3, 2, 3, 3, 1, 1, 2]  # 3 parts (forward, 2 pairs) per batch
    quiet = degeneracy.interaction_graph(model, x, basis, batch_size=BATCH, progress=False)
    for pair in graph.pairs:
        torch.testing.assert_close(graph.edges[pair], quiet.edges[pair], rtol=0, atol=0)


def test_node_and_edge_ablation_evaluations_count_examples(bars, setup) -> None:
    model, x, labels = setup
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    bars.clear()
    node_ablation_curves(model, x, basis, labels=labels, num_points=2, batch_size=BATCH, progress=True)
    edge_ablation(
        model, x, basis, graph, labels=labels, pairs=[("fc1", "fc2")], batch_size=BATCH, progress=True
    )
    evaluations = [b for b in bars if b.unit == "ex"]
    assert len(evaluations) >= 4
    for bar in evaluations:
        _counts_examples_by_batch(bar)
        assert bar.updates == [8, 8, 4]


def test_hessian_exact_lanczos_slq_and_hutchinson_bars(bars) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    x = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    degeneracy.hessian_spectrum(model, x, method="exact", batch_size=BATCH, chunk_size=None, progress=True)
    exact = _named(bars, "Hessian")[0]
    _counts_examples_by_batch(exact)
    assert exact.updates == [8, 8, 4]
    bars.clear()
    degeneracy.hessian_spectrum(
        model, x, method="lanczos", k=2, block_size=2, num_trace_probes=6, num_rank_probes=2,
        num_rank_steps=4, progress=True,
    )  # fmt: skip
    lanczos, slq, trace = (_named(bars, d)[0] for d in ("Lanczos", "SLQ", "Hutchinson"))
    assert all(b.unit == "vec" for b in (lanczos, slq, trace))
    assert 0 < sum(lanczos.updates) <= lanczos.total
    assert sum(slq.updates) == slq.total == 8 and sum(trace.updates) == trace.total == 6


def test_llc_bar_moves_per_sampler_step(bars, setup) -> None:
    model, x, _ = setup
    degeneracy.estimate_llc(model, x, num_chains=2, num_draws=5, num_burnin=3, warn=False, progress=True)
    steps = [b for b in bars if b.unit == "step"]
    assert len(steps) == 1 and steps[0].updates == [1] * 8, [(b.desc, b.updates) for b in bars]


def test_every_bar_is_quiet_off_a_terminal(monkeypatch, setup) -> None:
    """A real tqdm, stderr not a terminal: edges, Hutchinson/SLQ and LLC print nothing."""
    model, x, labels = setup
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    basis = degeneracy.interaction_basis(model, x, LAYERS, batch_size=BATCH, progress=True)
    degeneracy.interaction_graph(model, x, basis, batch_size=BATCH, progress=True)
    degeneracy.hessian_spectrum(
        model, x, method="lanczos", k=2, block_size=2, num_trace_probes=4, num_rank_probes=2,
        num_rank_steps=4, progress=True,
    )  # fmt: skip
    degeneracy.estimate_llc(model, x, num_chains=1, num_draws=4, num_burnin=0, warn=False, progress=True)
    assert quiet.getvalue() == ""
