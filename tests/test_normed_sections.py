"""Closed forms for TransformerLens sections with LayerNorm (and RMSNorm) and smooth MLP activations:
every Gram, JVP and edge kernel equals torch.func through the hooked model (float64, 1e-10 relative)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import degeneracy
from degeneracy.basis import NodeLayerRun, pca_step
from degeneracy.capture import capture, section
from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.sections import shortcut_gram, transformer_lens_sections
from tests.conftest import assert_bases_agree, assert_edges_agree, residual_nodes

tl = pytest.importorskip("transformer_lens")

ALL = residual_nodes(2)  # two blocks, all positions, every kind of section
LAST = [  # fewer target positions than source positions
    "blocks.1.hook_resid_pre",
    {"name": "mid", "module": "blocks.1.hook_resid_mid", "positions": -1},
    {"name": "post", "module": "blocks.1.hook_resid_post", "positions": -1},
    {"name": "logits", "module": "output", "positions": -1},
]


def normed_transformer(norm: str | None = "LN", act: str = "gelu", direction: str = "causal"):
    """A float64 two-layer model with perturbed LayerNorm weights and biases (γ ≠ 1, β ≠ 0)."""
    cfg = tl.HookedTransformerConfig(
        n_layers=2,
        d_model=12,
        n_heads=2,
        d_head=6,
        d_mlp=16,
        act_fn=act,
        normalization_type=norm,
        attention_dir=direction,
        n_ctx=4,
        d_vocab=8,
        seed=0,
        dtype=torch.float64,
    )
    model = tl.HookedTransformer(cfg, move_to_device=False).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("w", "b") or name.split(".")[-1].startswith("b_"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.randint(0, 8, (10, 4), generator=gen)


def _grams(model, x, nodes, center: bool, rule: str, norm: str | None = "LN") -> dict:
    B = degeneracy.interaction_basis(model, x, nodes, center=center, sections=None, progress=False)
    ctx = NodeLayerRun(model, x, nodes, dtype=B.config.dtype, batch_size=B.config.batch_size)
    shortcuts = transformer_lens_sections(model, ctx.layers)
    assert len(shortcuts) == len(nodes) - 1
    r = integration_rule(rule, 2 if rule == "trapezoid" else 1)
    r = homogeneous_rule(r) if center else r
    acts = capture(model, x, ctx.layers, constant=center)
    out = {}
    for (src, dst), short in shortcuts.items():
        assert short.kernel is not None and short.tangent is not None, (src, dst)
        moments = degeneracy.stats.MomentAccumulator(acts[src].shape[-1])
        moments.update(acts[src])
        white = pca_step(moments, B.config)
        fn = section(model, x, ctx.layers, src, dst, constant=center)
        want = jacobian_gram(fn, acts[src], white.R_pinv, B[dst].C, r, num_out_positions=acts[dst].shape[1])
        args = (x, acts[src], white.R_pinv, B[dst].C, r, center, 2**16)
        if norm is not None or "mid" not in dst:  # the structured Gram applies (attention: with a norm)
            assert short.gram(*args) is not None, (src, dst)
        got = shortcut_gram(short, *args)
        kernel = shortcut_gram(dataclasses.replace(short, gram=None), *args)  # the kernel's Jacobians
        out[(src, dst)] = (got, want)
        out[(src, dst, "kernel")] = (kernel, want)
    return out


@pytest.mark.parametrize(
    "norm,act,direction",
    [
        ("LN", "gelu", "causal"),
        pytest.param("LN", "relu", "bidirectional", marks=pytest.mark.slow),
        pytest.param("LNPre", "gelu_new", "causal", marks=pytest.mark.slow),
        pytest.param("RMS", "silu", "causal", marks=pytest.mark.slow),
        pytest.param(None, "gelu", "causal", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("center,rule", [(True, "gradient"), (False, "gradient"), (False, "trapezoid")])
def test_normed_grams_equal_autodiff(norm, act, direction, center: bool, rule: str) -> None:
    """Every adjacent pair of a two-block model (attention, MLP, identity, unembedding), all positions,
    the constant direction's row and column included."""
    model, x = normed_transformer(norm, act, direction)
    with torch.no_grad():
        grams = _grams(model, x, ALL, center, rule, norm)
    for pair, (got, want) in grams.items():
        assert got is not None, pair
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), pair


@pytest.mark.parametrize("center", [True, False])
def test_normed_grams_at_fewer_target_positions(center: bool) -> None:
    model, x = normed_transformer("LN", "gelu")
    with torch.no_grad():
        grams = _grams(model, x, LAST, center, "gradient")
    for pair, (got, want) in grams.items():
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), pair


def test_normed_tangents_and_kernels_equal_torch_func() -> None:
    """The closed-form JVP along a random tangent, and the edge kernel along rank-one tangents, against
    ``torch.func.jvp`` through the hooked model."""
    model, x = normed_transformer("LN", "gelu")
    ctx = NodeLayerRun(model, x, ALL, dtype=torch.float64, batch_size=None)
    acts = capture(model, x, ctx.layers, constant=False)
    gen = torch.Generator().manual_seed(2)
    for (src, dst), short in transformer_lens_sections(model, ctx.layers).items():
        f = acts[src]
        fn = section(model, x, ctx.layers, src, dst, constant=False)
        r = torch.randn(f.shape, generator=gen, dtype=torch.float64)
        want = torch.func.jvp(fn, (f,), (r,))[1]
        got = short.tangent(x, f, r)
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (src, dst)
        dirs = torch.randn(f.shape[-1], 3, generator=gen, dtype=torch.float64)
        c_out = torch.randn(4, want.shape[-1], generator=gen, dtype=torch.float64)
        scale = torch.randn(*f.shape[:2], 3, generator=gen, dtype=torch.float64)
        kern = short.kernel(x, f, scale, dirs, c_out)  # (b, P_out, m, k)
        for j in range(3):
            tangent = scale[..., j, None] * dirs[:, j]
            col = torch.func.jvp(fn, (f,), (tangent,))[1] @ c_out.T
            assert float((kern[..., j] - col).abs().max()) <= 1e-10 * float(col.abs().max()), (src, j)


@pytest.mark.parametrize("method", ["lib", pytest.param("global", marks=pytest.mark.slow)])
def test_normed_bases_with_and_without_shortcuts_agree(method: str) -> None:
    model, x = normed_transformer("LN", "gelu")
    fast = degeneracy.interaction_basis(model, x, ALL, method=method, progress=False)
    slow = degeneracy.interaction_basis(model, x, ALL, method=method, sections=None, progress=False)
    if method == "lib":
        assert set(fast.info["jacobians"].values()) == {"closed form"}
    assert "closed form" not in set(slow.info["jacobians"].values())
    assert_bases_agree(fast, slow)


def test_normed_edges_with_and_without_shortcuts_agree() -> None:
    model, x = normed_transformer("LN", "gelu")
    basis = degeneracy.interaction_basis(model, x, ALL, progress=False)
    fast = degeneracy.interaction_graph(model, x, basis, progress=False)
    slow = degeneracy.interaction_graph(model, x, basis, sections=None, progress=False)
    assert set(fast.info["modes"].values()) == {"analytic"}
    assert_edges_agree(fast, slow)


def test_normed_shortcut_that_differs_from_the_model_is_dropped() -> None:
    """A LayerNorm changed behind TransformerLens's back: the automatic closed forms of the sections it
    enters no longer match the model and are dropped; the basis is the autodiff one."""
    model, x = normed_transformer("LN", "gelu")
    model.blocks[1].ln2.hook_normalized.register_forward_hook(lambda m, i, o: 0.5 * o)
    fast = degeneracy.interaction_basis(model, x, ALL, progress=False)
    slow = degeneracy.interaction_basis(model, x, ALL, sections=None, progress=False)
    kinds = fast.info["jacobians"]
    assert kinds["blocks.1.hook_resid_mid->blocks.1.hook_resid_post"] == "autodiff"
    assert kinds["blocks.0.hook_resid_pre->blocks.0.hook_resid_mid"] == "closed form"
    name = "blocks.1.hook_resid_mid"
    torch.testing.assert_close(fast[name].eigenvalues, slow[name].eigenvalues, rtol=1e-9, atol=0)
