"""Stochastic ±1 sources (degeneracy.probes): unbiased over every sign pattern, standard errors that
match the spread over seeds, reproducible seeds, and clear errors for bad options."""

from __future__ import annotations

import logging

import pytest
import torch

import degeneracy
from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import integration_rule
from degeneracy.probes import (
    eigenvalue_se,
    every_sign_pattern,
    example_seed,
    pattern_sources,
    rademacher_sources,
    source_gram,
)
from tests.test_edges import SeqModel
from tests.test_jacobian import _direct, _section

LAYERS = ["mix", "out", "output"]


@pytest.mark.parametrize("rule_name,n", [("gradient", 1), ("gauss-legendre", 2)])
def test_source_gram_over_every_pattern_is_the_exact_gram(rule_name: str, n: int) -> None:
    """Σ_s g_sᵀ g_s with g = Σ_(t,i) r_(t,i) J[(t,i), s], averaged over all 2^(P_out·m) patterns = M."""
    fn = _section(torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    in_map, out_map = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    rule = integration_rule(rule_name, n)
    want = _direct(fn, x, in_map, out_map, rule)  # per-example jacrev
    signs = every_sign_pattern(6).reshape(1, 64, 2, 3).expand(5, 64, 2, 3)
    per = source_gram(fn, x, in_map, out_map, rule, signs, max_elements=300)  # several chunks
    torch.testing.assert_close(per.mean(0), want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    assert float((per[5] - want).norm() / want.norm()) > 1e-2  # one pattern alone is a genuine estimate
    exact = jacobian_gram(fn, x, in_map, out_map, rule, num_out_positions=2)
    torch.testing.assert_close(exact, want, rtol=1e-12, atol=1e-12)


def _model(positions: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return SeqModel(positions=positions).double(), torch.randn(12, positions, 4, dtype=torch.float64)


@pytest.mark.parametrize("method", ["lib", "global"])
def test_basis_over_every_pattern_equals_the_exact_basis(method: str) -> None:
    model, x = _model()
    exact = degeneracy.interaction_basis(model, x, LAYERS, method=method, progress=False)
    rows = 2 * exact["out"].dim if method == "lib" else 2 * exact["output"].dim
    every = degeneracy.interaction_basis(
        model, x, LAYERS, method=method, num_sources=2**rows, sources=pattern_sources(), progress=False
    )
    assert "±1 sources" in every.info["jacobians"]["mix->" + ("out" if method == "lib" else "output")]
    for name in LAYERS:
        a, b = exact[name], every[name]
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-10, atol=0)
        signs = torch.sign((a.C * b.C).sum(1))
        torch.testing.assert_close(signs[:, None] * b.C, a.C, rtol=1e-8, atol=1e-10 * float(a.C.abs().max()))
    assert exact["mix"].eigenvalue_se is None
    assert float(every["mix"].eigenvalue_se.max()) > 0  # patterns differ: a spread, yet a mean that is exact


def test_source_gram_standard_errors_match_the_spread_over_seeds() -> None:
    """Eigenvalues of M from R = 4 sources, 200 seeds: their spread against the delta-method SE of each
    draw (std of v_jᵀ M_r v_j over the sources / √R), and their mean against the exact eigenvalues."""
    fn = _section(torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    x = torch.randn(20, 3, 4, dtype=torch.float64)
    in_map, out_map = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    rule = integration_rule("gradient")
    exact = torch.linalg.eigvalsh(jacobian_gram(fn, x, in_map, out_map, rule, num_out_positions=2))
    signs = rademacher_sources(0)((20, 200 * 4, 2, 3))  # 200 independent draws of 4 sources
    draws = source_gram(fn, x, in_map, out_map, rule, signs).reshape(200, 4, 3, 3)
    values, reported = [], []
    for per in draws:
        eig = torch.linalg.eigh(per.mean(0))
        values.append(eig.eigenvalues)
        reported.append(eigenvalue_se(per, eig.eigenvectors))
    values_t, spread = torch.stack(values), torch.stack(values).std(0)
    ratio = torch.stack(reported).mean(0) / spread
    assert bool(((ratio > 0.75) & (ratio < 1.33)).all()), ratio
    bias = (values_t.mean(0) - exact).abs() / (spread / 200**0.5)
    assert bool((bias[1:] < 5).all()), bias  # the top ones: no bias visible at 200 seeds
    assert float(spread.min()) > 1e-3 * float(exact.max())  # a genuine spread


@pytest.mark.slow
def test_eigenvalue_standard_errors_match_the_spread_over_seeds() -> None:
    """Through interaction_basis: the reported SE (std over R sources / √R, delta method) against the
    std of the eigenvalues over independent seeds; and the same seed gives the same basis."""
    model, x = _model(positions=4)
    options = dict(num_sources=4, sections=None, progress=False)
    runs = [degeneracy.interaction_basis(model, x, LAYERS, seed=s, **options) for s in range(40)]
    values = torch.stack([b["mix"].eigenvalues[1:4] for b in runs])  # top three after the constant
    spread = values.std(0)
    reported = torch.stack([b["mix"].eigenvalue_se[1:4] for b in runs]).mean(0)
    ratio = reported / spread
    assert bool(((ratio > 0.6) & (ratio < 1.6)).all()), ratio
    exact = degeneracy.interaction_basis(model, x, LAYERS, progress=False)["mix"].eigenvalues[1:4]
    bias = (values.mean(0) - exact).abs() / (spread / 40**0.5)
    assert bool((bias < 5).all()), bias  # within 5 standard errors of the mean over seeds
    again = degeneracy.interaction_basis(model, x, LAYERS, seed=3, **options)
    torch.testing.assert_close(again["mix"].C, runs[3]["mix"].C, rtol=0, atol=0)


def test_eigenvalue_se_is_the_delta_method() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, 3, generator=gen, dtype=torch.float64)
    per = a @ a.transpose(1, 2) + torch.diag(torch.tensor([30.0, 10.0, 1.0], dtype=torch.float64))
    vectors = torch.linalg.eigh(per.mean(0)).eigenvectors
    quad = torch.stack([vectors.T @ m @ vectors for m in per]).diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(eigenvalue_se(per, vectors), quad.std(0) / 6**0.5, rtol=1e-12, atol=0)


def test_rademacher_sources_are_seeded_signs() -> None:
    a, b = rademacher_sources(5)((3, 4, 6)), rademacher_sources(5)((3, 4, 6))
    assert torch.equal(a, b) and not torch.equal(a, rademacher_sources(6)((3, 4, 6)))
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    # the documented draw: example b of plain call c from a generator seeded by (seed, "call c", b)
    for b in range(3):
        gen = torch.Generator().manual_seed(example_seed(5, "call 0", b))
        assert torch.equal(a[b], (2 * torch.randint(0, 2, (4, 6), generator=gen) - 1).double())
    draw = rademacher_sources(5)
    assert not torch.equal(draw((3, 4, 6)), draw((3, 4, 6)))  # successive calls: new signs
    keyed = draw.keyed((3, 4, 6), torch.tensor([10, 0, 7]), "M[mix]")
    for b, g in enumerate([10, 0, 7]):  # keyed by (seed, stream, example): batches do not matter
        assert torch.equal(keyed[b : b + 1], draw.keyed((1, 4, 6), torch.tensor([g]), "M[mix]"))
    assert not torch.equal(keyed, draw.keyed((3, 4, 6), torch.tensor([10, 0, 7]), "M[out]"))


def test_exact_builds_log_their_cost(caplog, monkeypatch) -> None:
    """The cost of an exact build and its stochastic alternative, logged before the passes: a warning
    above LONG_BUILD_PRODUCTS, else INFO; the counts are in ``info["cost"]``."""
    import degeneracy.probes

    model, x = _model()
    with caplog.at_level(logging.INFO, logger="degeneracy"):
        B = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    records = [r for r in caplog.records if r.name == "degeneracy"]
    assert any("exact LIB M" in r.getMessage() and r.levelno == logging.INFO for r in records), records
    # (mix -> out): 12 examples × 2 positions × the whitened rows of "out", then (out -> output)
    assert B.info["cost"]["products_per_source"] == 2 * 12  # one VJP per source, example and pair
    assert B.info["cost"]["exact_products"] >= 12 * 2 * (B["out"].dim + B["output"].dim)
    caplog.clear()
    monkeypatch.setattr(degeneracy.probes, "LONG_BUILD_PRODUCTS", 100)
    with caplog.at_level(logging.INFO, logger="degeneracy"):
        G = degeneracy.interaction_graph(model, x, B, jacobian_mode="vjp", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("exact edges") and "num_sources=R" in m for m in warned), warned
    # VJP path: one per output row (2 positions × d̂_out) and example; a source costs d̂_out per example
    want = sum(12 * 2 * B[dst].dim for _, dst in G.pairs)
    assert G.info["cost"] == {"exact_products": want, "products_per_source": want // 2}


def test_edges_of_an_iterable_of_batches_with_sources() -> None:
    """Data of unknown length (a list of batches): the cost is logged per example, and the same seed
    gives the same edges as the whole tensor in the same batches."""
    model, x = _model(positions=5)
    B = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    options = dict(num_sources=4, seed=7, jacobian_mode="vjp", progress=False, batch_size=6)
    whole = degeneracy.interaction_graph(model, x, B, **options)
    batches = degeneracy.interaction_graph(model, [x[:6], x[6:]], B, **options)
    assert batches.info["cost"]["products_per_source"] == sum(B[dst].dim for _, dst in _pairs(B))
    for pair in whole.pairs:
        torch.testing.assert_close(batches[pair], whole[pair], rtol=1e-12, atol=0)
        torch.testing.assert_close(batches.edge_se[pair], whole.edge_se[pair], rtol=1e-10, atol=0)


def _pairs(basis: degeneracy.Basis) -> list[tuple[str, str]]:
    return list(zip(basis.names[:-1], basis.names[1:], strict=True))


def test_bad_source_options(unchecked) -> None:
    model, x = _model()
    with pytest.raises(ValueError, match="num_sources"):
        degeneracy.interaction_basis(model, x, LAYERS, num_sources=0, progress=False)
    with pytest.raises(ValueError, match="jacobian_mode='vjp'"):
        degeneracy.interaction_basis(model, x, LAYERS, num_sources=2, jacobian_mode="jvp", progress=False)
    with unchecked(), pytest.raises(ValueError, match="rademacher"):
        degeneracy.interaction_basis(model, x, LAYERS, num_sources=2, sources="gauss", progress=False)
    with pytest.raises(ValueError, match="num_sources=256"):
        degeneracy.interaction_basis(
            model, x, LAYERS, num_sources=3, sources=pattern_sources(), progress=False
        )


# ---------------------------------------------------------------------------------------------------
# Edges: sources over output positions (each output feature i is an edge of its own)


def test_edges_over_every_pattern_equal_the_exact_edges(tmp_path) -> None:
    model, x = _model(positions=5)
    B = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    exact = degeneracy.interaction_graph(model, x, B, jacobian_mode="vjp", progress=False)
    every = degeneracy.interaction_graph(
        model, x, B, num_sources=32, sources=pattern_sources(), jacobian_mode="vjp", progress=False
    )
    for pair in exact.pairs:
        torch.testing.assert_close(
            every[pair], exact[pair], rtol=1e-10, atol=1e-14 * float(exact[pair].max())
        )
        assert float(every.edge_se[pair].max()) > 0  # the patterns disagree, their mean is exact
    assert exact.edge_se == {}
    path = every.save(tmp_path / "graph.safetensors")
    again = degeneracy.load_graph(path)
    for pair in exact.pairs:
        assert torch.equal(again.edge_se[pair], every.edge_se[pair])
    basis = degeneracy.interaction_basis(model, x, LAYERS, num_sources=3, progress=False)
    loaded = degeneracy.load_basis(basis.save(tmp_path / "basis.safetensors"))
    assert torch.equal(loaded["mix"].eigenvalue_se, basis["mix"].eigenvalue_se)


def test_edge_standard_errors_match_the_spread_over_seeds() -> None:
    """E from R = 4 sources, 200 independent draws: the spread of each edge against its reported SE."""
    from degeneracy.attributions import squared_attributions

    fn = _section(torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    in_map, out_map = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    rule = integration_rule("gradient")
    kw = dict(num_out_positions=2, mode="vjp")
    exact, _ = squared_attributions(fn, x, in_map, out_map, rule, **kw)
    signs = rademacher_sources(0)((10, 800, 2))
    per, _ = squared_attributions(fn, x, in_map, out_map, rule, signs=signs, per_source=True, **kw)
    draws = per.reshape(200, 4, 2, 3)
    estimates = draws.mean(1)
    spread = estimates.std(0)
    reported = (draws.std(1) / 2).mean(0)  # std over the 4 sources / √4, averaged over the draws
    ratio = reported / spread
    assert bool(((ratio > 0.75) & (ratio < 1.33)).all()), ratio
    bias = (estimates.mean(0) - exact).abs() / (spread / 200**0.5)
    assert bool((bias < 5).all()), bias  # unbiased
    assert float((spread / exact).min()) > 1e-3  # a genuine spread


def test_sources_where_the_exact_path_is_cheaper_give_exact_edges() -> None:
    """With "auto", R sources × d̂_out rows costlier than d̂_in JVPs: the exact JVP path (was a crash)."""
    model, x = _model(positions=5)
    B = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    exact = degeneracy.interaction_graph(model, x, B, progress=False)
    got = degeneracy.interaction_graph(model, x, B, num_sources=3, progress=False)
    assert set(got.info["modes"].values()) == {"jvp"}
    for pair in exact.pairs:
        torch.testing.assert_close(got[pair], exact[pair], rtol=1e-12, atol=0)
        assert float(got.edge_se[pair].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        ("basis", "options: {num_sources: 0}\n", "basis option num_sources must be a positive number"),
        ("basis", "options: {num_sources: 4, sources: gauss}\n", "sources must be 'rademacher'"),
        ("basis", "options: {num_sources: 4, jacobian_mode: jvp}\n", "exclude each other"),
        ("graph", "edges: {num_sources: 2.5}\n", "edges option num_sources must be a positive number"),
        ("graph", "basis: {num_sources: 4, seed: one}\n", "basis option seed must be an integer"),
    ],
)
def test_source_options_fail_before_any_work(tmp_path, command: str, text: str, message: str) -> None:
    from typer.testing import CliRunner

    from degeneracy.commands import app

    config = tmp_path / "run.yaml"
    config.write_text(text + "model: {name: no.such.module:factory}\n")
    result = CliRunner().invoke(app, [command, str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_basis_command_with_sources(tmp_path) -> None:
    """``degeneracy basis`` with ``num_sources``: the saved LIB basis carries eigenvalue standard errors,
    and the seed reproduces it."""
    from typer.testing import CliRunner

    from degeneracy.commands import app

    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {name: digits_mlp, limit: 64}\nmethods: [lib]\noptions: {num_sources: 4, seed: 2}\n"
    )
    runs = []
    for out in ("a", "b"):
        result = CliRunner().invoke(app, ["basis", str(config), "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        runs.append(degeneracy.load_basis(tmp_path / out / "bases" / "lib.safetensors"))
    a, b = runs
    assert a.config.num_sources == 4 and a.config.seed == 2
    se = a["fc1"].eigenvalue_se
    assert se is not None and se.shape == a["fc1"].eigenvalues.shape and float(se[1:].max()) > 0
    assert torch.equal(a["fc1"].C, b["fc1"].C) and torch.equal(se, b["fc1"].eigenvalue_se)
