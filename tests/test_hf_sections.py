"""Closed-form sections of Hugging Face GPT-2 blocks (pre-LayerNorm, GELU, causal attention): Grams,
JVPs, bases and edges equal torch.func through the hooked model (float64, 1e-10 relative)."""

from __future__ import annotations

import pytest
import torch

import degeneracy
from degeneracy.basis import NodeLayerRun, pca_step
from degeneracy.capture import capture, section
from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.sections import bert_sections, gpt2_sections, shortcut_gram

transformers = pytest.importorskip("transformers")

NODES = ["transformer.h.0", "transformer.h.1", "transformer.ln_f"]
LAST = ["transformer.h.1", {"name": "final", "module": "transformer.ln_f", "positions": -1}]


def gpt2():
    """A float64 two-block GPT-2 (eager attention) with perturbed LayerNorm weights and biases."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=12, n_head=2, n_positions=8, vocab_size=10)
    cfg._attn_implementation = "eager"  # torch.func's forward mode does not go through CPU SDPA
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.randint(0, 10, (6, 5), generator=gen)


@pytest.mark.parametrize("nodes", [NODES, LAST], ids=["all", "last"])
@pytest.mark.parametrize("center,rule", [(True, "gradient"), (False, "trapezoid")])
def test_gpt2_block_grams_equal_autodiff(nodes, center: bool, rule: str) -> None:
    model, x = gpt2()
    B = degeneracy.interaction_basis(model, x, nodes, center=center, sections=None, progress=False)
    ctx = NodeLayerRun(model, x, nodes, dtype=torch.float64, batch_size=None)
    shortcuts = gpt2_sections(model, ctx.layers)
    assert len(shortcuts) == len(nodes) - 1
    r = integration_rule(rule, 2 if rule == "trapezoid" else 1)
    r = homogeneous_rule(r) if center else r
    acts = capture(model, x, ctx.layers, constant=center)
    with torch.no_grad():
        for (src, dst), short in shortcuts.items():
            moments = degeneracy.stats.MomentAccumulator(acts[src].shape[-1])
            moments.update(acts[src])
            white = pca_step(moments, B.config)
            fn = section(model, x, ctx.layers, src, dst, constant=center)
            n_out = acts[dst].shape[1]
            want = jacobian_gram(fn, acts[src], white.R_pinv, B[dst].C, r, num_out_positions=n_out)
            got = shortcut_gram(short, x, acts[src], white.R_pinv, B[dst].C, r, center, 2**16)
            assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (src, dst)


def test_gpt2_bases_and_edges_with_and_without_shortcuts_agree() -> None:
    model, x = gpt2()
    shortcuts = gpt2_sections(model, NODES)
    fast = degeneracy.interaction_basis(model, x, NODES, sections=shortcuts, progress=False)
    slow = degeneracy.interaction_basis(model, x, NODES, sections=None, progress=False)
    assert set(fast.info["jacobians"].values()) == {"closed form"}
    for name in fast:
        want = slow[name].eigenvalues
        torch.testing.assert_close(fast[name].eigenvalues, want, rtol=1e-9, atol=1e-12 * float(want[0]))
    g_fast = degeneracy.interaction_graph(model, x, fast, sections=shortcuts, progress=False)
    g_slow = degeneracy.interaction_graph(model, x, fast, sections=None, progress=False)
    assert set(g_fast.info["modes"].values()) == {"analytic"}
    for pair, want in g_slow.edges.items():
        torch.testing.assert_close(g_fast.edges[pair], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def test_gpt2_tangent_equals_torch_func() -> None:
    model, x = gpt2()
    ctx = NodeLayerRun(model, x, NODES, dtype=torch.float64, batch_size=None)
    acts = capture(model, x, ctx.layers, constant=False)
    for (src, dst), short in gpt2_sections(model, ctx.layers).items():
        f = acts[src]
        r = torch.randn(f.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        want = torch.func.jvp(section(model, x, ctx.layers, src, dst, constant=False), (f,), (r,))[1]
        got = short.tangent(x, f, r)
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (src, dst)


BERT_NODES = [
    "encoder.layer.0",
    "encoder.layer.1",
    {"name": "final", "module": "encoder.layer.1", "read": "output", "positions": 0},
]


def bert():
    """A float64 two-layer BERT encoder (eager attention) with perturbed LayerNorm weights and biases."""
    cfg = transformers.BertConfig(
        vocab_size=10, hidden_size=12, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.randint(0, 10, (6, 5), generator=gen)


@pytest.mark.parametrize("center,rule", [(True, "gradient"), (False, "trapezoid")])
def test_bert_layer_grams_equal_autodiff(center: bool, rule: str) -> None:
    model, x = bert()
    B = degeneracy.interaction_basis(model, x, BERT_NODES, center=center, sections=None, progress=False)
    ctx = NodeLayerRun(model, x, BERT_NODES, dtype=torch.float64, batch_size=None)
    shortcuts = bert_sections(model, ctx.layers)
    assert len(shortcuts) == 2
    r = integration_rule(rule, 2 if rule == "trapezoid" else 1)
    r = homogeneous_rule(r) if center else r
    acts = capture(model, x, ctx.layers, constant=center)
    with torch.no_grad():
        for (src, dst), short in shortcuts.items():
            moments = degeneracy.stats.MomentAccumulator(acts[src].shape[-1])
            moments.update(acts[src])
            white = pca_step(moments, B.config)
            fn = section(model, x, ctx.layers, src, dst, constant=center)
            n_out = acts[dst].shape[1]
            want = jacobian_gram(fn, acts[src], white.R_pinv, B[dst].C, r, num_out_positions=n_out)
            got = shortcut_gram(short, x, acts[src], white.R_pinv, B[dst].C, r, center, 2**16)
            assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (src, dst)


def test_bert_bases_and_edges_with_and_without_shortcuts_agree() -> None:
    model, x = bert()
    shortcuts = bert_sections(model, BERT_NODES)
    fast = degeneracy.interaction_basis(model, x, BERT_NODES, sections=shortcuts, progress=False)
    slow = degeneracy.interaction_basis(model, x, BERT_NODES, sections=None, progress=False)
    assert set(fast.info["jacobians"].values()) == {"closed form"}
    for name in fast:
        want = slow[name].eigenvalues
        torch.testing.assert_close(fast[name].eigenvalues, want, rtol=1e-9, atol=1e-12 * float(want[0]))
    g_fast = degeneracy.interaction_graph(model, x, fast, sections=shortcuts, progress=False)
    g_slow = degeneracy.interaction_graph(model, x, fast, sections=None, progress=False)
    assert set(g_fast.info["modes"].values()) == {"analytic"}
    for pair, want in g_slow.edges.items():
        torch.testing.assert_close(g_fast.edges[pair], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
