"""Closed-form sections of Hugging Face GPT-2 blocks (pre-LayerNorm, GELU, causal attention) and BERT
layers (post-LayerNorm, bidirectional): Grams, JVPs, bases and edges equal torch.func through the hooked
model (float64, 1e-10 relative)."""

from __future__ import annotations

import pytest
import torch

import degeneracy
from degeneracy.basis import NodeLayerRun, pca_step
from degeneracy.capture import capture, section
from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.sections import bert_sections, gpt2_sections, shortcut_gram
from tests.conftest import assert_bases_agree, assert_edges_agree

transformers = pytest.importorskip("transformers")

NODES = ["transformer.h.0", "transformer.h.1", "transformer.ln_f"]
LAST = ["transformer.h.1", {"name": "final", "module": "transformer.ln_f", "positions": -1}]


def perturbed(model: torch.nn.Module, norm: str):
    """``model`` in float64 eval mode with its LayerNorm (names containing ``norm``) weights and all biases
    moved by 0.3 N(0, 1), and six token sequences of length 5, both from one generator seeded 1."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.randint(0, 10, (6, 5), generator=gen)


def gpt2():
    """A float64 two-block GPT-2 (eager attention) with perturbed LayerNorm weights and biases."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=12, n_head=2, n_positions=8, vocab_size=10)
    cfg._attn_implementation = "eager"  # torch.func's forward mode does not go through CPU SDPA
    torch.manual_seed(0)
    return perturbed(transformers.GPT2LMHeadModel(cfg), ".ln_")


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
    return perturbed(transformers.BertModel(cfg, add_pooling_layer=False), "LayerNorm")


CASES = {
    "gpt2-all": (gpt2, gpt2_sections, NODES),
    "gpt2-last": (gpt2, gpt2_sections, LAST),
    "bert": (bert, bert_sections, BERT_NODES),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("center,rule", [(True, "gradient"), (False, "trapezoid")])
def test_block_grams_equal_autodiff(case: str, center: bool, rule: str) -> None:
    build, sections_of, nodes = CASES[case]
    model, x = build()
    B = degeneracy.interaction_basis(model, x, nodes, center=center, sections=None, progress=False)
    ctx = NodeLayerRun(model, x, nodes, dtype=torch.float64, batch_size=None)
    shortcuts = sections_of(model, ctx.layers)
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


@pytest.mark.parametrize("case", ["gpt2-all", "bert"])
def test_bases_and_edges_with_and_without_shortcuts_agree(case: str) -> None:
    build, sections_of, nodes = CASES[case]
    model, x = build()
    shortcuts = sections_of(model, nodes)
    fast = degeneracy.interaction_basis(model, x, nodes, sections=shortcuts, progress=False)
    slow = degeneracy.interaction_basis(model, x, nodes, sections=None, progress=False)
    assert set(fast.info["jacobians"].values()) == {"closed form"}
    assert_bases_agree(fast, slow)
    g_fast = degeneracy.interaction_graph(model, x, fast, sections=shortcuts, progress=False)
    g_slow = degeneracy.interaction_graph(model, x, fast, sections=None, progress=False)
    assert set(g_fast.info["modes"].values()) == {"analytic"}
    assert_edges_agree(g_fast, g_slow)
