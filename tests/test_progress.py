"""Progress bars: counted in examples with a rate and an ETA when stderr is a terminal; quiet otherwise."""

from __future__ import annotations

import functools
import io
import sys

import torch
from tqdm.auto import tqdm

import degeneracy
import degeneracy.progress
from degeneracy.ablation import node_ablation_curves
from tests.conftest import mlp


def _draw_every_update(monkeypatch) -> None:
    """tqdm draws at most every 0.1 s: draw every update, so that the test sees each step (every bar of
    the package is made by degeneracy.progress)."""
    monkeypatch.setattr(degeneracy.progress, "tqdm", functools.partial(tqdm, mininterval=0, miniters=1))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _setup():
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3])
    x = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def test_bars_count_examples_in_a_terminal_and_are_quiet_otherwise(monkeypatch) -> None:
    _draw_every_update(monkeypatch)
    model, x = _setup()
    quiet = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", quiet)
    basis = degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], batch_size=16, progress=True)
    node_ablation_curves(model, x, basis, labels=model(x).argmax(-1), num_points=2, progress=True)
    assert quiet.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], batch_size=16, progress=True)
    node_ablation_curves(model, x, basis, labels=model(x).argmax(-1), num_points=2, progress=True)
    text = terminal.getvalue()
    for shown in ("moments", "M[fc1]", "ablate fc1", "16/40", "32/40", "40/40", "ex/s"):
        assert shown in text, (shown, text[-500:])
    assert "<" in text  # tqdm's elapsed<remaining: the ETA


def test_hessian_bar_counts_examples_in_a_terminal(monkeypatch) -> None:
    _draw_every_update(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    first = degeneracy.hessian_spectrum(model, x, method="exact", batch_size=10, progress=True)
    assert quiet.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    again = degeneracy.hessian_spectrum(model, x, method="exact", batch_size=10, progress=True)
    text = terminal.getvalue()
    assert all(shown in text for shown in ("Hessian", "10/30", "20/30", "30/30", "ex/s")), text[-400:]
    torch.testing.assert_close(first.eigenvalues, again.eigenvalues, rtol=0, atol=0)  # look only


def test_edge_ablation_progress_writes_nothing_to_stdout(monkeypatch, capsys, caplog) -> None:
    """Each bisection evaluation goes to the ``degeneracy`` logger and, on a terminal, above the bars on
    stderr; never to stdout."""
    import logging

    from degeneracy.ablation import edge_ablation

    model, x = _setup()
    basis = degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    labels = model(x).argmax(-1)
    with caplog.at_level(logging.INFO, logger="degeneracy"):
        quiet = edge_ablation(model, x, basis, graph, labels=labels, pairs=[("fc1", "fc2")], progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # pytest's stderr is not a terminal: quiet
    logged = [r.getMessage() for r in caplog.records if "edges kept" in r.getMessage()]
    assert len(logged) == quiet[("fc1", "fc2")].info["evaluations"], logged  # one line per evaluation
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    edge_ablation(model, x, basis, graph, labels=labels, pairs=[("fc1", "fc2")], progress=True)
    assert capsys.readouterr().out == ""
    assert "fc1->fc2:" in terminal.getvalue() and "edges kept, accuracy" in terminal.getvalue()


def test_exact_hessian_bar_moves_within_a_batch_and_lanczos_has_an_eta(monkeypatch) -> None:
    """The exact Jacobians advance per vmap chunk of examples (the same numbers as one batch-wide vmap);
    Lanczos counts its Hessian-vector products against their bound."""
    from degeneracy.linalg import krylov_max_vectors

    _draw_every_update(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    options = {"method": "exact", "batch_size": 30}
    chunked = degeneracy.hessian_spectrum(model, x, chunk_size=7, progress=True, **options)
    text = terminal.getvalue()
    assert all(f"{n}/30" in text for n in (7, 14, 21, 28, 30)), text[-400:]  # one batch, five chunks
    whole = degeneracy.hessian_spectrum(model, x, chunk_size=None, **options)
    torch.testing.assert_close(chunked.eigenvalues, whole.eigenvalues, rtol=0, atol=0)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    n = sum(p.numel() for p in model.parameters())
    lanczos = degeneracy.hessian_spectrum(
        model, x, method="lanczos", k=3, block_size=2, num_rank_probes=2, num_rank_steps=5, progress=True
    )
    text = terminal.getvalue()
    bound = krylov_max_vectors(n, 3, block_size=2)
    assert "Lanczos top-3" in text and f"/{bound}" in text and "vec/s" in text and "<" in text, text[-400:]
    assert "SLQ rank" in text and "10/10" in text, text[-400:]
    assert lanczos.matvecs >= 10
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    degeneracy.hessian_spectrum(model, x, method="lanczos", k=3, block_size=2, progress=True)
    assert quiet.getvalue() == ""


def test_ablation_bars_move_within_a_batch_with_the_same_accuracies(monkeypatch) -> None:
    """Evaluations run a batch in pieces of EVALUATION_STEP examples: the bar moves per piece, the
    accuracies are the same counts as in one batch-wide pass and the losses agree to float64 round-off."""
    import degeneracy.ablation.runner as runner

    _draw_every_update(monkeypatch)
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3])
    x = torch.randn(300, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(4))
    basis = degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], progress=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    pieces = node_ablation_curves(model, x, basis, labels=labels, num_points=3, batch_size=300, progress=True)
    text = terminal.getvalue()
    assert runner.EVALUATION_STEP == 128 and all(f"{n}/300" in text for n in (128, 256, 300)), text[-400:]
    monkeypatch.setattr(runner, "EVALUATION_STEP", None)  # one pass over the whole batch
    whole = node_ablation_curves(model, x, basis, labels=labels, num_points=3, batch_size=300)
    for name, curve in pieces.items():
        assert curve.accuracy == whole[name].accuracy and curve.num_kept == whole[name].num_kept
        loss, reference = torch.tensor(curve.loss), torch.tensor(whole[name].loss)
        torch.testing.assert_close(loss, reference, rtol=1e-13, atol=0)
