"""Section shortcuts (closed-form Jacobians) for bases: every number equals the hook-based autodiff one."""

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
from tests.conftest import assert_bases_agree, tiny_relu_transformer

LAST = [  # the modular-addition node layers: every pair has one input position except the first
    "blocks.0.hook_resid_pre",
    {"name": "resid_mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
    {"name": "resid_post", "module": "blocks.0.hook_resid_post", "positions": -1},
    {"name": "logits", "module": "output", "positions": -1},
]
ALL = [  # two blocks, all positions: several input positions everywhere, and the identity section
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
]


def _model(n_layers: int):
    model, x = tiny_relu_transformer(n_layers)
    with torch.no_grad():  # non-zero biases: the uncentred sections are not homogeneous
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.copy_(0.3 * torch.randn_like(p))
    return model, x


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("center,rule", [(True, "gradient"), (False, "gradient"), (False, "trapezoid")])
def test_closed_form_gram_equals_autodiff(layers: str, center: bool, rule: str) -> None:
    """M's un-normalised sum for every adjacent pair, by each closed form, against torch.func through
    the hooked model (float64, 1e-10 relative), including the constant direction's row and column."""
    model, x = _model(1 if layers == "last" else 2)
    nodes = LAST if layers == "last" else ALL
    B = degeneracy.interaction_basis(model, x, nodes, center=center, sections=None, progress=False)
    cfg = B.config
    ctx = NodeLayerRun(model, x, nodes, dtype=cfg.dtype, batch_size=cfg.batch_size)
    shortcuts = transformer_lens_sections(model, ctx.layers)
    assert len(shortcuts) == len(nodes) - 1
    steps = 2 if rule == "trapezoid" else 1
    r = integration_rule(rule, steps)
    r = homogeneous_rule(r) if center else r
    with torch.no_grad():
        _compare_grams(model, x, ctx, shortcuts, r, B)


def _compare_grams(model, x, ctx, shortcuts, r, B) -> None:
    cfg = B.config
    acts = capture(model, x, ctx.layers, constant=cfg.has_constant)
    for (src, dst), short in shortcuts.items():
        moments = degeneracy.stats.MomentAccumulator(acts[src].shape[-1])
        moments.update(acts[src])
        white = pca_step(moments, cfg)
        c_out = B[dst].C
        fn = section(model, x, ctx.layers, src, dst, constant=cfg.has_constant)
        want = jacobian_gram(fn, acts[src], white.R_pinv, c_out, r, num_out_positions=acts[dst].shape[1])
        variants = {"kernel": dataclasses.replace(short, gram=None)}
        gram = short.gram
        args = (x, acts[src], white.R_pinv, c_out, r, cfg.has_constant, 2**16)
        if gram is not None and gram(*args) is not None:
            variants["gram"] = short
        if acts[src].shape[1] == 1 or "mid" in dst or not cfg.has_constant:
            assert "gram" in variants, (src, dst)  # where the structured closed forms apply
        for kind, variant in variants.items():
            got = shortcut_gram(variant, x, acts[src], white.R_pinv, c_out, r, cfg.has_constant, 2**16)
            assert got is not None, (src, kind)
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) <= 1e-10 * scale, (src, dst, kind)


@pytest.mark.parametrize("layers", ["last", "all"])
@pytest.mark.parametrize("method", ["lib", "global"])
def test_bases_with_and_without_shortcuts_agree(layers: str, method: str) -> None:
    model, x = _model(1 if layers == "last" else 2)
    nodes = LAST if layers == "last" else ALL
    fast = degeneracy.interaction_basis(model, x, nodes, method=method, progress=False)
    slow = degeneracy.interaction_basis(model, x, nodes, method=method, sections=None, progress=False)
    if method == "lib":
        assert set(fast.info["jacobians"].values()) == {"closed form"}
    assert "closed form" not in set(slow.info["jacobians"].values())
    assert_bases_agree(fast, slow, directions=True)


def test_automatic_shortcuts_that_differ_from_the_model_are_dropped() -> None:
    """A HookedTransformer whose MLP is changed behind TransformerLens's back: the automatic closed
    form no longer matches the model, is dropped, and the basis is the autodiff one."""
    model, x = _model(1)
    model.blocks[0].mlp.hook_post.register_forward_hook(lambda m, i, o: 0.5 * o)
    fast = degeneracy.interaction_basis(model, x, LAST, progress=False)
    slow = degeneracy.interaction_basis(model, x, LAST, sections=None, progress=False)
    assert fast.info["jacobians"]["resid_mid->resid_post"] == "autodiff"
    assert fast.info["jacobians"]["blocks.0.hook_resid_pre->resid_mid"] == "closed form"
    want = slow["resid_mid"].eigenvalues
    torch.testing.assert_close(fast["resid_mid"].eigenvalues, want, rtol=1e-9, atol=0)
