"""The bundled demo models: loaders, datasets, and the accuracies recorded beside the weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from degeneracy.models import (
    DigitsMLP,
    digits_all_inputs,
    digits_dataset,
    load_digits_mlp,
    load_digits_mlp_metadata,
    load_modadd,
    load_modadd_metadata,
    modadd_accuracy,
    modadd_all_inputs,
    modadd_config,
    modadd_config_dict,
    modadd_dataset,
    modadd_last_logits,
    modadd_split_indices,
)

needs_tl = pytest.mark.skipif(
    importlib.util.find_spec("transformer_lens") is None, reason="needs degeneracy[tl]"
)
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="needs degeneracy[digits]"
)

P = 113


@pytest.fixture(scope="module")
def modadd():
    torch.manual_seed(0)
    return load_modadd()


@pytest.fixture(scope="module")
def modadd_logits(modadd):
    inputs, _ = modadd_all_inputs(P)
    with torch.no_grad():
        return modadd(inputs)


# ---------------------------------------------------------------- modular addition: data


def test_modadd_all_inputs_row_major():
    inputs, labels = modadd_all_inputs(P)
    assert inputs.shape == (P * P, 3) and inputs.dtype == torch.int64
    assert labels.shape == (P * P,) and labels.dtype == torch.int64
    a, b = 17, 101
    assert inputs[a * P + b].tolist() == [a, b, P]
    assert labels[a * P + b].item() == (a + b) % P
    assert torch.equal(labels, (inputs[:, 0] + inputs[:, 1]) % P)
    assert (inputs[:, 2] == P).all()


def test_modadd_dataset_split_is_deterministic_and_partitions_pairs():
    first = modadd_dataset(P, frac_train=0.3, seed=0)
    second = modadd_dataset(P, frac_train=0.3, seed=0)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    train_x, train_y, test_x, test_y = first
    assert train_x.shape == (int(0.3 * P * P), 3) and test_x.shape[0] == P * P - train_x.shape[0]
    assert torch.equal(train_y, (train_x[:, 0] + train_x[:, 1]) % P)
    assert torch.equal(test_y, (test_x[:, 0] + test_x[:, 1]) % P)
    codes = torch.cat([train_x[:, 0] * P + train_x[:, 1], test_x[:, 0] * P + test_x[:, 1]])
    assert torch.equal(codes.sort().values, torch.arange(P * P))
    other = modadd_dataset(P, frac_train=0.3, seed=1)
    assert not torch.equal(other[0], train_x)


def test_modadd_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="frac_train"):
        modadd_split_indices(P, frac_train=1.5)


# ---------------------------------------------------------------- modular addition: model


@needs_tl
def test_modadd_config_matches_paper_architecture():
    cfg = modadd_config()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (1, 128, 4, 32, 512)
    assert cfg.act_fn == "relu" and cfg.normalization_type is None
    assert (cfg.n_ctx, cfg.d_vocab, cfg.d_vocab_out) == (3, 114, 114)


@needs_tl
def test_load_modadd_shapes_and_mode(modadd, modadd_logits):
    assert not modadd.training
    assert next(modadd.parameters()).dtype == torch.float32
    assert modadd.embed.W_E.shape == (P + 1, 128)
    assert modadd_logits.shape == (P * P, 3, P + 1)


def test_modadd_sidecar_describes_the_weights():
    meta = load_modadd_metadata()
    assert meta["config"] == modadd_config_dict(P)
    for key in ("recipe", "seed", "wall_time_s", "accuracy", "torch_version"):
        assert key in meta
    assert meta["recipe"]["weight_decay"] > 0


@needs_tl
def test_modadd_recorded_accuracy_reproduces(modadd_logits):
    meta = load_modadd_metadata()
    _, labels = modadd_all_inputs(P)
    train_idx, test_idx = modadd_split_indices(P, meta["data"]["frac_train"], meta["data"]["seed"])
    test_acc = modadd_accuracy(modadd_logits[test_idx], labels[test_idx])
    train_acc = modadd_accuracy(modadd_logits[train_idx], labels[train_idx])
    assert test_acc >= 0.995
    assert train_acc >= 0.999
    tolerance = 2.0 / test_idx.numel()  # a float-rounding tie may flip an example on another machine
    assert test_acc == pytest.approx(meta["accuracy"]["test_acc"], abs=tolerance)
    assert train_acc == pytest.approx(meta["accuracy"]["train_acc"], abs=tolerance)


@needs_tl
def test_modadd_last_logits_equals_full_forward(modadd, modadd_logits):
    inputs, _ = modadd_all_inputs(P)
    with torch.no_grad():
        fast = modadd_last_logits(modadd, inputs)
    torch.testing.assert_close(fast, modadd_logits[:, -1], atol=1e-4, rtol=1e-4)


@needs_tl
def test_load_modadd_float64_agrees():
    model64 = load_modadd(dtype=torch.float64)
    assert next(model64.parameters()).dtype == torch.float64
    inputs, labels = modadd_all_inputs(P)
    idx = torch.arange(0, P * P, 7)
    with torch.no_grad():
        logits = model64(inputs[idx])
    assert logits.dtype == torch.float64
    assert modadd_accuracy(logits, labels[idx]) >= 0.995


# ---------------------------------------------------------------- digits MLP


@needs_sklearn
def test_digits_dataset_is_deterministic_and_scaled():
    first = digits_dataset(seed=0)
    second = digits_dataset(seed=0)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    train_x, train_y, test_x, test_y = first
    assert train_x.shape == (int(0.8 * 1797), 64) and test_x.shape == (1797 - int(0.8 * 1797), 64)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert float(train_x.min()) >= 0.0 and float(train_x.max()) <= 1.0
    assert not torch.equal(digits_dataset(seed=1)[0], train_x)
    inputs, labels = digits_all_inputs()
    assert inputs.shape == (1797, 64) and set(labels.tolist()) == set(range(10))


@needs_sklearn
def test_load_digits_mlp_structure_and_accuracy():
    model = load_digits_mlp()
    assert isinstance(model, DigitsMLP) and not model.training
    names = [name for name, _ in model.named_children()]
    assert names == ["fc1", "act1", "fc2", "act2", "out"]
    assert sum(p.numel() for p in model.parameters()) == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    meta = load_digits_mlp_metadata()
    _, _, test_x, test_y = digits_dataset(seed=meta["data"]["seed"], frac_train=meta["data"]["frac_train"])
    with torch.no_grad():
        logits = model(test_x)
    assert logits.shape == (test_x.shape[0], 10)
    test_acc = float((logits.argmax(-1) == test_y).float().mean())
    assert test_acc >= 0.95
    assert test_acc == pytest.approx(meta["accuracy"]["test_acc"], abs=1.0 / test_x.shape[0])
    model64 = load_digits_mlp(dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model64(test_x.double()).argmax(-1), logits.argmax(-1))
