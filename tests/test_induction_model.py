"""The bundled LayerNorm language model (`load_induction`): loader, data, recorded accuracy, and its
structured Jacobian Grams against torch.func through the hooked model (float64, 1e-10 relative)."""

from __future__ import annotations

import pytest
import torch

import degeneracy
from degeneracy.basis import NodeLayerRun, pca_step
from degeneracy.capture import capture, section
from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.models import (
    induction_accuracy,
    induction_config_dict,
    induction_dataset,
    induction_targets,
    load_induction,
    load_induction_metadata,
)
from degeneracy.sections import shortcut_gram, transformer_lens_sections
from tests.conftest import residual_nodes

pytest.importorskip("transformer_lens")

NODES = residual_nodes(2)


@pytest.fixture(scope="module")
def model64():
    return load_induction(dtype=torch.float64)


def test_induction_dataset_structure_and_determinism() -> None:
    tokens = induction_dataset(64, seed=3)
    assert tokens.shape == (64, 17) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == 24).all() and torch.equal(tokens[:, 1:9], tokens[:, 9:])
    first = tokens[:, 1:9]
    assert all(len(set(row.tolist())) == 8 for row in first)  # distinct tokens in each half
    assert torch.equal(induction_dataset(64, seed=3), tokens)
    assert not torch.equal(induction_dataset(64, seed=4), tokens)
    sl, target = induction_targets(tokens)
    assert torch.equal(target, tokens[:, sl.start + 1 : sl.stop + 1])


def test_load_induction_matches_its_sidecar(model64) -> None:
    meta = load_induction_metadata()
    assert meta["config"] == induction_config_dict()
    assert model64.cfg.normalization_type == "LN" and model64.cfg.act_fn == "gelu"
    assert sum(p.numel() for p in model64.parameters()) == meta["n_params"]
    test = induction_dataset(meta["data"]["n_test"], seed=meta["data"]["test_seed"])
    with torch.no_grad():
        acc = induction_accuracy(model64(test), test)
    assert acc >= 0.99
    assert acc == pytest.approx(meta["accuracy"]["test_acc"], abs=2.0 / test.numel())


@pytest.mark.parametrize("n", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_induction_model_structured_grams_equal_autodiff(model64, n: int) -> None:
    """Every adjacent pair of residual-stream node layers, all 17 positions, centred: the closed-form
    Gram against torch.func through the hooked model."""
    x = induction_dataset(n, seed=11)
    B = degeneracy.interaction_basis(model64, x, NODES, progress=False)
    assert set(B.info["jacobians"].values()) == {"closed form"}
    ctx = NodeLayerRun(model64, x, NODES, dtype=torch.float64, batch_size=None)
    acts = capture(model64, x, ctx.layers, constant=True)
    rule = homogeneous_rule(integration_rule("gradient", 1))
    with torch.no_grad():
        for (src, dst), short in transformer_lens_sections(model64, ctx.layers).items():
            moments = degeneracy.stats.MomentAccumulator(acts[src].shape[-1])
            moments.update(acts[src])
            white = pca_step(moments, B.config)
            args = (x, acts[src], white.R_pinv, B[dst].C, rule, True, 2**20)
            assert short.gram(*args) is not None, (src, dst)
            got = shortcut_gram(short, *args)
            fn = section(model64, x, ctx.layers, src, dst, constant=True)
            want = jacobian_gram(fn, acts[src], white.R_pinv, B[dst].C, rule, num_out_positions=17)
            assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), (src, dst)
