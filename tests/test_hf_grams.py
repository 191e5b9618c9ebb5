"""The structured closed-form Grams of Hugging Face BERT layers and GPT-2 blocks
(adapters/huggingface_grams.py) equal the autodiff Gram (torch.func through the hooked model) to 1e-10
relative in float64, centred and not, all output positions and one; bases built with them equal the
autodiff ones."""

from __future__ import annotations

import functools

import pytest
import torch

import degeneracy
from degeneracy.basis import NodeLayerRun
from degeneracy.capture import capture, section
from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.sections import bert_sections, gpt2_sections
from tests.conftest import assert_bases_agree

transformers = pytest.importorskip("transformers")

FINAL = {"name": "final", "module": "encoder.layer.1", "read": "output"}
NODES = {
    "all": ["encoder.layer.0", "encoder.layer.1", FINAL],
    "last": ["encoder.layer.0", "encoder.layer.1", {**FINAL, "positions": -1}],
}


@functools.cache
def bert(act: str = "gelu"):
    """A float64 two-layer BERT encoder (eager attention, activation ``act``), LayerNorm weights and all
    biases moved by 0.3 N(0, 1), and five token sequences of length 6; seeds 0 and 1."""
    cfg = transformers.BertConfig(
        vocab_size=10,
        hidden_size=12,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=20,
        hidden_act=act,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.randint(0, 10, (5, 6), generator=gen)


@functools.cache
def gpt2(act: str = "gelu_new"):
    """A float64 two-block GPT-2 (eager attention, activation ``act``), LayerNorm weights and all biases
    moved by 0.3 N(0, 1), and five token sequences of length 6; seeds 0 and 1."""
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=12, n_head=3, n_positions=8, vocab_size=10, activation_function=act
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.randint(0, 10, (5, 6), generator=gen)


GPT2_NODES = {
    "all": ["h.0", "h.1", "ln_f"],
    "last": ["h.0", "h.1", {"name": "final", "module": "ln_f", "positions": -1}],
}


def grams(model, x, nodes, center: bool, sections_of=bert_sections):
    """(structured Gram, autodiff Gram) for every adjacent pair, with random R₊ (its constant row only
    in column 0 when centred) and C_out (seed 2), at the gradient rule."""
    ctx = NodeLayerRun(model, x, nodes, dtype=torch.float64, batch_size=None)
    rule = homogeneous_rule(integration_rule("gradient")) if center else integration_rule("gradient")
    acts = capture(model, x, ctx.layers, constant=center)
    gen = torch.Generator().manual_seed(2)
    out = {}
    with torch.no_grad():
        for (src, dst), short in sections_of(model, ctx.layers).items():
            width = acts[src].shape[-1]
            r_in = torch.randn(width, width - 2, generator=gen, dtype=torch.float64)
            if center:
                r_in[-1, 1:] = 0.0
            c_out = torch.randn(width - 3, width, generator=gen, dtype=torch.float64)
            fn = section(model, x, ctx.layers, src, dst, constant=center)
            n_out = acts[dst].shape[1]
            want = jacobian_gram(fn, acts[src], r_in, c_out, rule, num_out_positions=n_out)
            got = short.gram(x, acts[src], r_in, c_out, rule, center, 2**12)
            out[(src, dst)] = (got, want)
    return out


@pytest.mark.parametrize("nodes", list(NODES))
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_bert_gram_equals_autodiff(nodes: str, center: bool, act: str) -> None:
    model, x = bert(act)
    found = grams(model, x, NODES[nodes], center)
    assert len(found) == 2
    for pair, (got, want) in found.items():
        assert got is not None, pair
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), pair


@pytest.mark.parametrize("nodes", list(GPT2_NODES))
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_gpt2_gram_equals_autodiff(nodes: str, center: bool, act: str) -> None:
    model, x = gpt2(act)
    found = grams(model, x, GPT2_NODES[nodes], center, gpt2_sections)
    assert len(found) == 2
    for pair, (got, want) in found.items():
        assert got is not None, pair
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), pair


def test_gpt2_basis_with_the_structured_gram_equals_autodiff() -> None:
    model, x = gpt2()
    layers = GPT2_NODES["last"]
    shortcuts = gpt2_sections(model, layers)
    fast = degeneracy.interaction_basis(model, x, layers, sections=shortcuts, progress=False)
    slow = degeneracy.interaction_basis(model, x, layers, sections=None, progress=False)
    assert set(fast.info["jacobians"].values()) == {"closed form"}
    assert_bases_agree(fast, slow)
    f = capture(model, x, fast.layers, constant=True)["h.0"]
    eye = torch.eye(f.shape[-1], dtype=torch.float64).roll(1, dims=1)
    padded = {"input_ids": x, "attention_mask": torch.ones_like(x).index_fill(1, torch.tensor([5]), 0)}
    rule = homogeneous_rule(integration_rule("gradient"))
    short = shortcuts[("h.0", "h.1")]
    assert short.gram(x, f, eye, eye, rule, True, 2**12) is not None
    assert short.gram(padded, f, eye, eye, rule, True, 2**12) is None


def test_bert_gram_scales_a_one_point_rule() -> None:
    """A one-point rule at α < 1 (not the gradient): J(α f) weighted, against autodiff."""
    model, x = bert()
    from degeneracy.linalg.integration import IntegrationRule

    B = degeneracy.interaction_basis(model, x, NODES["all"], center=False, sections=None, progress=False)
    ctx = NodeLayerRun(model, x, NODES["all"], dtype=torch.float64, batch_size=None)
    acts = capture(model, x, ctx.layers, constant=False)
    rule = IntegrationRule("one point", (0.6,), (0.7,))
    (src, dst), short = next(iter(bert_sections(model, ctx.layers).items()))
    with torch.no_grad():
        fn = section(model, x, ctx.layers, src, dst, constant=False)
        eye = torch.eye(acts[src].shape[-1], dtype=torch.float64)
        want = jacobian_gram(fn, acts[src], eye, B[dst].C, rule, num_out_positions=acts[dst].shape[1])
        got = short.gram(x, acts[src], eye, B[dst].C, rule, False, 2**12)
    assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


def test_bert_gram_declines_what_it_does_not_cover() -> None:
    """Padding, a constant direction mixed into other columns and a many-point rule off the centred
    case give None (the caller falls back to the kernel or autodiff)."""
    model, x = bert()
    ctx = NodeLayerRun(model, x, NODES["all"], dtype=torch.float64, batch_size=None)
    acts = capture(model, x, ctx.layers, constant=True)
    short = next(iter(bert_sections(model, ctx.layers).values()))
    f = acts["encoder.layer.0"]
    eye = torch.eye(f.shape[-1], dtype=torch.float64).roll(1, dims=1)  # column 0: the constant
    rule = homogeneous_rule(integration_rule("gradient"))
    assert short.gram(x, f, eye, eye, rule, True, 2**12) is not None
    padded = {"input_ids": x, "attention_mask": torch.ones_like(x).index_fill(1, torch.tensor([5]), 0)}
    assert short.gram(padded, f, eye, eye, rule, True, 2**12) is None
    mixed = eye.clone()
    mixed[-1, 2] = 0.5
    assert short.gram(x, f, mixed, eye, rule, True, 2**12) is None
    raw = acts["encoder.layer.0"][..., :-1]
    eye_raw = torch.eye(raw.shape[-1], dtype=torch.float64)
    assert short.gram(x, raw, eye_raw, eye_raw, integration_rule("trapezoid", 2), False, 2**12) is None


@pytest.mark.parametrize("nodes,center", [("last", False)])  # centred, all positions: test_hf_sections
def test_bert_basis_with_the_structured_gram_equals_autodiff(nodes: str, center: bool) -> None:
    model, x = bert()
    layers = NODES[nodes]
    fast = degeneracy.interaction_basis(
        model, x, layers, center=center, sections=bert_sections(model, layers), progress=False
    )
    slow = degeneracy.interaction_basis(model, x, layers, center=center, sections=None, progress=False)
    assert set(fast.info["jacobians"].values()) == {"closed form"}
    assert set(slow.info["jacobians"].values()) == {"autodiff"}
    assert_bases_agree(fast, slow)


def test_bert_gram_of_float32_activations_is_float32_accurate() -> None:
    """Float32 activations (a float32 model): the per-query maps run in float32, the Gram products in
    float64; the result is the float64 Gram to float32 accuracy."""
    model, x = bert()
    ctx = NodeLayerRun(model, x, NODES["all"], dtype=torch.float64, batch_size=None)
    acts = capture(model, x, ctx.layers, constant=True)
    short = next(iter(bert_sections(model, ctx.layers).values()))
    f = acts["encoder.layer.0"].detach()
    gen = torch.Generator().manual_seed(3)
    r_in = torch.randn(f.shape[-1], f.shape[-1], generator=gen, dtype=torch.float64)
    r_in[-1, 1:] = 0.0  # the constant only in column 0
    c_out = torch.randn(8, f.shape[-1], generator=gen, dtype=torch.float64)
    rule = homogeneous_rule(integration_rule("gradient"))
    want = short.gram(x, f, r_in, c_out, rule, True, 2**12)
    got = short.gram(x, f.float(), r_in, c_out, rule, True, 2**12)
    assert got.dtype == torch.float64
    err = float((got - want).abs().max() / want.abs().max())
    assert 1e-12 < err <= 1e-5  # float32 rounding, and no more
