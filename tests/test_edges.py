"""Interaction edges (METHOD §4): a per-example jacrev oracle, linear sections, completeness, ±1 sources,
sparsity measures and save/load."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import jacrev

import degeneracy
from degeneracy.capture import capture, section
from degeneracy.edges import gini, sparsity
from degeneracy.io import ResultFileError
from degeneracy.linalg import integration_rule
from degeneracy.probes import example_seed
from tests.conftest import mlp, tiny_relu_transformer

LAYERS = ["fc1", "fc2", "fc3", "output"]


class SeqModel(nn.Module):
    """(batch, pos, 4) -> (batch, pos, 3); the "mix" section mixes positions through a tanh."""

    def __init__(self, positions: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mix = nn.Linear(6, 6)
        self.pos = nn.Parameter(torch.randn(positions, positions) / positions**0.5)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        mixed = torch.tanh(torch.einsum("ts,bsd->btd", self.pos, self.mix(h)))
        return self.out(mixed)


SEQ_LAYERS = ["mix", "out", "output"]


def direct_edges(model, x, basis, src, dst, rule) -> torch.Tensor:
    """E from per-example torch.func.jacrev Jacobians, A = Σ_s J f̂ and E = Σ_x Σ_t A² / (n P_in)."""
    constant = basis[src].has_constant
    acts = capture(model, x, basis.layers, [src], constant=constant)[src]
    c_in, cp_in, c_out = basis[src].C, basis[src].C_pinv, basis[dst].C
    total = torch.zeros(c_out.shape[0], c_in.shape[0], dtype=torch.float64)
    for b in range(x.shape[0]):
        fn = section(model, x[b : b + 1], basis.layers, src, dst, constant=constant)
        xb = acts[b : b + 1]
        jint = 0
        for alpha, w in zip(rule.points, rule.weights, strict=True):
            jint = jint + w * jacrev(fn)(alpha * xb)[0, :, :, 0]  # (P_out, d_out, P_in, d_in)
        jac = torch.einsum("io,tosd,dj->tisj", c_out, jint, cp_in)
        feats = xb[0] @ c_in.T  # (P_in, k)
        a = torch.einsum("tisj,sj->tij", jac, feats)
        total += (a**2).sum(0)
    return total.detach() / (x.shape[0] * acts.shape[1])


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("method", ["lib", "pca", "neuron"])
def test_edges_match_per_example_jacobians(tanh_mlp, inputs, mode: str, center: bool, method: str) -> None:
    x = inputs[:40]
    B = degeneracy.interaction_basis(tanh_mlp, x, LAYERS, method=method, center=center, progress=False)
    rule = integration_rule("gauss-legendre", 3)
    G = degeneracy.interaction_graph(
        tanh_mlp,
        x,
        B,
        integration_rule="gauss-legendre",
        integration_steps=3,
        jacobian_mode=mode,
        batch_size=16,
        max_elements=500,
        progress=False,
    )
    assert G.pairs == [("fc1", "fc2"), ("fc2", "fc3"), ("fc3", "output")]
    for src, dst in G.pairs:
        want = direct_edges(tanh_mlp, x, B, src, dst, rule)
        got = G.edges[(src, dst)]
        assert got.dtype == torch.float64 and got.shape == (B[dst].dim, B[src].dim)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.max()))


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_sequence_edges_match_per_example_jacobians(mode: str) -> None:
    model = SeqModel().double()
    x = torch.randn(12, 4, 4, dtype=torch.float64)
    B = degeneracy.interaction_basis(model, x, SEQ_LAYERS, progress=False)
    G = degeneracy.interaction_graph(model, x, B, jacobian_mode=mode, progress=False, max_elements=2000)
    rule = integration_rule("gradient")
    for src, dst in G.pairs:
        want = direct_edges(model, x, B, src, dst, rule)
        torch.testing.assert_close(G.edges[(src, dst)], want, rtol=1e-10, atol=1e-12 * float(want.max()))
    assert max(G.completeness.values()) < 1e-10  # homogeneous extension: exact with the gradient rule


def _linear(bias: bool) -> nn.Sequential:
    model = mlp([6, 5, 7, 4], act=nn.Identity, bias=bias)
    return nn.Sequential(OrderedDict((k, v) for k, v in model.named_children() if k.startswith("fc")))


@pytest.mark.parametrize("bias,center", [(False, False), (True, True)])
def test_linear_sections_give_diagonal_lib_edges(bias: bool, center: bool) -> None:
    """METHOD §4: with LIB on linear sections E is diagonal with E_jj = Λ_j (here to 1e-8 relative)."""
    model = _linear(bias)
    x = torch.randn(300, 6, dtype=torch.float64)
    layers = ["fc1", "fc2", "output"]
    B = degeneracy.interaction_basis(model, x, layers, center=center, progress=False)
    G = degeneracy.interaction_graph(model, x, B, progress=False)
    for src, dst in G.pairs:
        e = G.edges[(src, dst)]
        lam = B[src].eigenvalues
        assert e.shape[0] == e.shape[1] == lam.numel()
        scale = float(lam.max())
        off = e - torch.diag(torch.diagonal(e))
        assert float(off.abs().max()) <= 1e-8 * scale
        torch.testing.assert_close(torch.diagonal(e), lam, rtol=1e-8, atol=0)


def test_gauss_legendre_completeness_on_tanh_sections(tanh_mlp, inputs) -> None:
    """No constant coordinate: Σ_j A = f̂(x) − f̂(0) only up to the integration error."""
    B = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, center=False, progress=False)
    gl = degeneracy.interaction_graph(
        tanh_mlp, inputs, B, integration_rule="gauss-legendre", integration_steps=5, progress=False
    )
    assert max(gl.completeness.values()) <= 1e-6
    grad = degeneracy.interaction_graph(tanh_mlp, inputs, B, progress=False)
    nonlinear = [pair for pair in grad.pairs if pair[1] != "output"]
    assert min(grad.completeness[pair] for pair in nonlinear) > 1e-3  # the plain gradient is not complete
    assert grad.completeness[("fc3", "output")] < 1e-12  # the last section is affine


def test_constant_coordinate_makes_every_rule_agree(tanh_mlp, inputs) -> None:
    """The homogeneous extension has a Jacobian constant along α·f: all rules give the same edges."""
    B = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, progress=False)
    a = degeneracy.interaction_graph(tanh_mlp, inputs, B, progress=False)
    b = degeneracy.interaction_graph(
        tanh_mlp, inputs, B, integration_rule="trapezoid", integration_steps=3, progress=False
    )
    for pair in a.pairs:
        torch.testing.assert_close(a.edges[pair], b.edges[pair], rtol=1e-10, atol=1e-14)
    assert max(a.completeness.values()) < 1e-10


def test_one_source_is_exact_for_one_output_position() -> None:
    model = SeqModel().double()
    x = torch.randn(10, 4, 4, dtype=torch.float64)
    layers = ["mix", {"name": "out_last", "module": "out", "positions": -1}]
    B = degeneracy.interaction_basis(model, x, layers, progress=False)
    exact = degeneracy.interaction_graph(model, x, B, jacobian_mode="vjp", progress=False)
    one = degeneracy.interaction_graph(model, x, B, num_sources=1, jacobian_mode="vjp", progress=False)
    pair = exact.pairs[0]
    torch.testing.assert_close(one.edges[pair], exact.edges[pair], rtol=1e-12, atol=0)


def test_stochastic_sources_are_unbiased() -> None:
    """E_r[(Σ_t r_t A_t)²] = Σ_t A_t² (Rademacher r): the library's estimate is exactly the ±1-source
    estimator of per-example jacrev attributions, and that estimator averaged over every sign pattern
    is the exact edge."""
    import itertools

    model = SeqModel(positions=5).double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    B = degeneracy.interaction_basis(model, x, SEQ_LAYERS, progress=False)
    src, dst = "mix", "out"
    acts = capture(model, x, B.layers, [src], constant=True)[src]
    attributions = []
    for b in range(x.shape[0]):
        fn = section(model, x[b : b + 1], B.layers, src, dst, constant=True)
        jac = jacrev(fn)(acts[b : b + 1])[0, :, :, 0].detach()
        jac = torch.einsum("io,tosd,dj->tisj", B[dst].C, jac, B[src].C_pinv)
        attributions.append(torch.einsum("tisj,sj->tij", jac, acts[b] @ B[src].C.T).detach())
    a = torch.stack(attributions)  # (b, t, i, j)
    n = x.shape[0] * x.shape[1]
    exact = (a**2).sum(dim=(0, 1)) / n
    graph = degeneracy.interaction_graph(model, x, B, jacobian_mode="vjp", progress=False)
    torch.testing.assert_close(graph.edges[(src, dst)], exact, rtol=1e-10, atol=0)
    # the library's draw: per example b, torch.randint(0, 2, (R, P_out)) from a generator seeded by
    # example_seed(seed, "edges src->dst", b)
    gens = [torch.Generator().manual_seed(example_seed(11, f"edges {src}->{dst}", b)) for b in range(6)]
    signs = (2 * torch.stack([torch.randint(0, 2, (3, 5), generator=g) for g in gens]) - 1).double()
    estimate = (torch.einsum("brt,btij->brij", signs, a) ** 2).sum(dim=(0, 1)) / (n * 3)
    got = degeneracy.interaction_graph(
        model, x, B, num_sources=3, seed=11, jacobian_mode="vjp", progress=False
    )
    torch.testing.assert_close(got.edges[(src, dst)], estimate, rtol=1e-10, atol=0)
    assert float((estimate - exact).norm() / exact.norm()) > 1e-3  # a genuine estimate...
    patterns = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=5)), dtype=torch.float64)
    mean = (torch.einsum("rt,btij->brij", patterns, a) ** 2).mean(1).sum(0) / n
    torch.testing.assert_close(mean, exact, rtol=1e-12, atol=0)  # ...whose expectation is exact
    assert max(got.completeness.values()) < 1e-10  # Σ_j A^r = Σ_t r_t (f̂(x) − f̂(0))


def test_sparsity_measures_on_known_weights() -> None:
    assert gini(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.75)
    assert gini(torch.ones(10)) == pytest.approx(0.0)
    edges = torch.tensor([[0.5, 0.3], [0.15, 0.05]], dtype=torch.float64)
    graph = degeneracy.edges.InteractionGraph(
        layers=tuple(degeneracy.capture.as_node_layers(mlp([2, 2, 2]), ["fc0", "fc1"])),
        edges={("fc0", "fc1"): edges},
        basis_method="lib",
        has_constant=False,
        eigenvalues={"fc0": torch.ones(2), "fc1": torch.ones(2)},
        completeness={("fc0", "fc1"): 0.0},
        config=degeneracy.edges.EdgeConfig(),
    )
    row = sparsity(graph)[("fc0", "fc1")]
    assert (row["num_90"], row["num_99"], row["num_99.9"], row["num_edges"]) == (3, 4, 4, 4)
    with pytest.warns(DeprecationWarning, match="num_99"):  # the former keys still read
        assert (row["n_99"], row.get("n_edges")) == (4, 4)


def test_save_and_load_round_trip(tmp_path, tanh_mlp, inputs) -> None:
    B = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, progress=False)
    G = degeneracy.interaction_graph(tanh_mlp, inputs, B, progress=False)
    path = tmp_path / "graph.safetensors"
    G.save(path)
    H = degeneracy.load_graph(path)
    assert H.pairs == G.pairs and H.basis_method == "lib" and H.has_constant
    assert H.completeness == G.completeness and H.config == G.config
    for pair in G.pairs:
        assert torch.equal(H.edges[pair], G.edges[pair])
    sub = H.subgraph("fc2", "output")
    assert sub.pairs == [("fc2", "fc3"), ("fc3", "output")] and sub.names == ["fc2", "fc3", "output"]
    assert torch.equal(sub.edges[("fc2", "fc3")], G.edges[("fc2", "fc3")]) and "fc1" not in sub.dims
    with pytest.raises(ValueError, match="not a range"):
        H.subgraph("fc3", "fc1")
    # partial and foreign files give clear errors
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ResultFileError, match="not a readable"):
        degeneracy.load_graph(broken)
    B.save(tmp_path / "basis.safetensors")
    with pytest.raises(ResultFileError, match="expected 'graph'"):
        degeneracy.load_graph(tmp_path / "basis.safetensors")
    with pytest.raises(ResultFileError, match="no such file"):
        degeneracy.load_graph(tmp_path / "missing.safetensors")


def test_bad_options_raise(tanh_mlp, inputs, unchecked) -> None:
    B = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, progress=False)
    with pytest.raises(ValueError, match="integration rule"):
        degeneracy.interaction_graph(tanh_mlp, inputs, B, integration_rule="simpson", progress=False)
    with pytest.raises(ValueError, match="num_sources"):
        degeneracy.interaction_graph(tanh_mlp, inputs, B, num_sources=0, progress=False)
    with unchecked(), pytest.raises(ValueError, match="jacobian_mode"):
        degeneracy.interaction_graph(tanh_mlp, inputs, B, jacobian_mode="reverse", progress=False)


def _tiny_transformer():
    return tiny_relu_transformer()


TL_LAYERS = [
    "blocks.0.hook_resid_pre",
    {"name": "resid_mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
    {"name": "resid_post", "module": "blocks.0.hook_resid_post", "positions": -1},
    {"name": "logits", "module": "output", "positions": -1},
]


@pytest.mark.parametrize(
    "mode,center,rule",
    [("vjp", True, "gradient"), ("jvp", True, "gradient"), ("auto", True, "gradient"), ("auto", False, "gl")],
)
def test_transformer_lens_shortcuts_give_the_same_edges(mode: str, center: bool, rule: str) -> None:
    """Shortcut sections (autodiff) and their closed-form kernels ("auto") against the hooked model."""
    from degeneracy.edges import transformer_lens_sections

    model, x = _tiny_transformer()
    with torch.no_grad():  # non-zero biases, so that the no-constant case is not homogeneous
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.copy_(0.3 * torch.randn_like(p))
    B = degeneracy.interaction_basis(model, x, TL_LAYERS, center=center, progress=False)
    sections = transformer_lens_sections(model, B.layers)
    assert set(sections) == set(zip(B.names[:-1], B.names[1:], strict=True))
    kw = dict(integration_rule="gauss-legendre", integration_steps=3) if rule == "gl" else {}
    hooks = degeneracy.interaction_graph(
        model, x, B, jacobian_mode="vjp", sections=None, progress=False, **kw
    )
    short = degeneracy.interaction_graph(
        model, x, B, jacobian_mode=mode, sections=sections, progress=False, **kw
    )
    if mode == "auto":
        assert set(short.info["modes"].values()) == {"analytic"}
        acts = capture(model, x, B.layers)
        for (src, _), fn in sections.items():  # closed-form JVPs against torch.func.jvp
            f = acts[src]
            r = torch.randn_like(f)
            want = torch.func.jvp(lambda z, fn=fn: fn(x, z), (f,), (r,))[1]
            torch.testing.assert_close(fn.tangent(x, f, r), want, rtol=1e-10, atol=1e-12)
    for pair in hooks.pairs:
        torch.testing.assert_close(short.edges[pair], hooks.edges[pair], rtol=1e-10, atol=1e-14)
        assert short.completeness[pair] == pytest.approx(hooks.completeness[pair], rel=1e-6, abs=1e-12)


def test_a_wrong_section_shortcut_is_refused() -> None:
    from degeneracy.edges import transformer_lens_sections

    model, x = _tiny_transformer()
    B = degeneracy.interaction_basis(model, x, TL_LAYERS, progress=False)
    sections = transformer_lens_sections(model, B.layers)
    pair = ("resid_mid", "resid_post")
    right = sections[pair]
    sections[pair] = lambda inputs, f: right(inputs, f) + 1e-3 * f**2  # agrees nowhere
    with pytest.raises(ValueError, match="differs from the model"):
        degeneracy.interaction_graph(model, x, B, sections=sections, progress=False)
    with pytest.raises(ValueError, match="not adjacent"):
        degeneracy.interaction_graph(model, x, B, sections={("logits", "resid_mid"): right}, progress=False)
