"""Hugging Face BERT / GPT-2 closed forms picked by ``sections="auto"``, and with padded batches: the basis
and graph equal the autodiff ones (float64, 1e-10 relative), and a padded batch through the closed forms
gives what the same sentences give one at a time, unpadded."""

from __future__ import annotations

import pytest
import torch

import degeneracy
from degeneracy.sections import auto_sections, bert_sections, gpt2_sections
from tests.test_hf_sections import BERT_NODES, NODES, bert, gpt2

transformers = pytest.importorskip("transformers")

CASES = {"bert": (bert, bert_sections, BERT_NODES), "gpt2": (gpt2, gpt2_sections, NODES)}


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-10) -> None:
    """|got − want| ≤ rel · max|want| entrywise."""
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= rel * float(want.abs().max())


def same_bases(a: degeneracy.Basis, b: degeneracy.Basis) -> None:
    for name in b:
        close(a[name].eigenvalues, b[name].eigenvalues)


def same_graphs(a, b, rel: float = 1e-10) -> None:
    assert set(a.edges) == set(b.edges)
    for pair, want in b.edges.items():
        close(a.edges[pair], want, rel)


@pytest.mark.parametrize("case", list(CASES))
def test_auto_picks_the_closed_forms_and_they_equal_autodiff(case: str, one_thread) -> None:
    build, sections_of, nodes = CASES[case]
    model, x = build()
    assert set(auto_sections(model, nodes)) == set(sections_of(model, nodes))
    fast = degeneracy.interaction_basis(model, x, nodes, progress=False)  # sections="auto"
    slow = degeneracy.interaction_basis(model, x, nodes, sections=None, progress=False)
    assert set(fast.info["jacobians"].values()) == {"closed form"}
    assert set(slow.info["jacobians"].values()) == {"autodiff"}
    same_bases(fast, slow)
    g_fast = degeneracy.interaction_graph(model, x, fast, progress=False)
    g_slow = degeneracy.interaction_graph(model, x, fast, sections=None, progress=False)
    assert set(g_fast.info["modes"].values()) == {"analytic"}
    assert "analytic" not in set(g_slow.info["modes"].values())
    same_graphs(g_fast, g_slow)


def test_with_sources_auto_leaves_the_closed_forms_out(one_thread) -> None:
    """``num_sources`` on a Hugging Face model: every pair takes the ±1 sources (an exact structured Gram
    would cost far more at real sizes), the same basis as with ``sections=None`` and the same signs."""
    model, x = bert()
    kw = dict(num_sources=3, seed=5, progress=False)
    auto = degeneracy.interaction_basis(model, x, BERT_NODES, **kw)
    hooks = degeneracy.interaction_basis(model, x, BERT_NODES, sections=None, **kw)
    assert set(auto.info["jacobians"].values()) == {"±1 sources"}
    same_bases(auto, hooks)


def padded_and_single(x: torch.Tensor) -> tuple[dict, list[dict]]:
    """Sentences of lengths 5, 3, 4, 2, 5, 3 cut from ``x``: one right-padded batch with its attention
    mask (pad token 0), and the same sentences as single unpadded batches."""
    lengths = [5, 3, 4, 2, 5, 3]
    mask = torch.tensor([[int(i < n) for i in range(x.shape[1])] for n in lengths])
    padded = {"input_ids": x * mask, "attention_mask": mask}
    single = [{"input_ids": x[i : i + 1, :n]} for i, n in enumerate(lengths)]
    return padded, single


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_through_closed_forms_equals_sentences_one_at_a_time(case: str, one_thread) -> None:
    build, sections_of, nodes = CASES[case]
    model, x = build()
    if case == "bert":  # every position: the closed forms at padded queries are excluded, not wrong
        nodes = [*nodes[:2], {"name": "final", "module": "encoder.layer.1", "read": "output"}]
    padded, single = padded_and_single(x)
    shortcuts = sections_of(model, nodes)
    B_pad = degeneracy.interaction_basis(model, padded, nodes, sections=shortcuts, progress=False)
    B_one = degeneracy.interaction_basis(model, single, nodes, sections=shortcuts, progress=False)
    assert set(B_one.info["jacobians"].values()) == {"closed form"}
    same_bases(B_pad, B_one)
    G_pad = degeneracy.interaction_graph(model, padded, B_one, sections=shortcuts, progress=False)
    G_one = degeneracy.interaction_graph(model, single, B_one, sections=shortcuts, progress=False)
    assert set(G_one.info["modes"].values()) == set(G_pad.info["modes"].values()) == {"analytic"}
    same_graphs(G_pad, G_one)
    G_auto = degeneracy.interaction_graph(model, padded, B_one, progress=False)  # auto with padding
    same_graphs(G_auto, G_one)


def test_padded_keys_are_masked_in_the_closed_form_section(one_thread) -> None:
    model, x = bert()
    padded, single = padded_and_single(x)
    nodes = ["encoder.layer.0", {"name": "out", "module": "encoder.layer.0", "read": "output"}]
    short = bert_sections(model, nodes)[("encoder.layer.0", "out")]
    with torch.no_grad():
        h = model.embeddings(input_ids=padded["input_ids"])
        got = short(padded, h)
        for i, one in enumerate(single):
            n = one["input_ids"].shape[1]
            close(got[i : i + 1, :n], short(one, h[i : i + 1, :n]))
            want = model(**one, output_hidden_states=True).hidden_states[1]
            close(got[i : i + 1, :n], want)


def test_float32_closed_form_edges_within_the_float32_tolerance(one_thread) -> None:
    model, x = bert()
    model = model.float()
    B = degeneracy.interaction_basis(model, x, BERT_NODES, dtype="float32", sections=None, progress=False)
    fast = degeneracy.interaction_graph(model, x, B, progress=False)
    slow = degeneracy.interaction_graph(model, x, B, sections=None, progress=False)
    assert set(fast.info["modes"].values()) == {"analytic"}
    same_graphs(fast, slow, rel=1e-4)  # check_shortcut's tolerance for float32 shortcuts


def test_edge_ablation_of_a_default_sdpa_bert_through_the_closed_forms(one_thread) -> None:
    """The shortcut check runs forward mode, which SDPA lacks: it must switch to eager attention. The
    bisection through the closed-form sections evaluates exactly what it evaluates through the model."""
    from degeneracy.ablation import edge_ablation
    from tests.test_huggingface import sentences, tiny

    model = tiny("bert")
    assert model.config._attn_implementation == "sdpa"
    padded, _ = sentences()
    out = {"name": "out", "module": "encoder.layer.1", "read": "output"}
    nodes = ["encoder.layer.0", "encoder.layer.1", out]
    B = degeneracy.interaction_basis(model, padded, nodes, progress=False)
    G = degeneracy.interaction_graph(model, padded, B, progress=False)
    assert set(G.info["sections"].values()) == {"closed form"}
    pairs = [("encoder.layer.1", "out")]
    runs = {
        name: edge_ablation(
            model, padded, B, G, metrics="embedding", delta=0.02, sections=sections, pairs=pairs
        )
        for name, sections in (("auto", "auto"), ("hooks", None))
    }
    for pair, want in runs["hooks"].items():
        got = runs["auto"][pair]
        assert got.num_needed == want.num_needed and set(got.evaluations) == set(want.evaluations)
        for n, acc in want.evaluations.items():
            assert abs(got.evaluations[n] - acc) <= 1e-10
