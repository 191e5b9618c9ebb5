"""TransformerLens checkpoints (``.pt`` state dicts, the companion paper's format) through the public API,
and the graph command building bases on one split and ablating on another, with its ablation options.
Every checkpoint here is a tiny one made in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformer_lens")
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

import degeneracy  # noqa: E402
from degeneracy.ablation import node_ablation_curves  # noqa: E402
from degeneracy.commands import app  # noqa: E402
from degeneracy.commands.config import MODADD_NODE_LAYERS  # noqa: E402
from degeneracy.models import load_transformer_lens_checkpoint, modadd_dataset  # noqa: E402

FIELDS = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, act_fn="relu",
              normalization_type=None, n_ctx=3, d_vocab=114, d_vocab_out=113, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[HookedTransformer, Path]:
    """A tiny modular-addition-shaped transformer saved as the paper ships it: model.pt + config.yaml."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = HookedTransformer(HookedTransformerConfig(**FIELDS), move_to_device=False)
    path = folder / "model_epoch_1.pt"
    torch.save(model.state_dict(), path)
    model_yaml = "".join(f"  {k}: {'null' if v is None else v}\n" for k, v in FIELDS.items() if k != "seed")
    (folder / "config.yaml").write_text(
        "dataset: {frac_train: 0.3, seed: 0, modulus: 113}\nmodel:\n" + model_yaml + "seed: 0\n"
    )
    return model, path


def test_checkpoint_loads_with_the_config_beside_it(checkpoint) -> None:
    original, path = checkpoint
    model = load_transformer_lens_checkpoint(path)
    tokens = torch.tensor([[1, 2, 113], [5, 100, 113]])
    assert next(model.parameters()).dtype == torch.float64 and not model.training
    torch.testing.assert_close(model(tokens), original(tokens).double(), rtol=0, atol=1e-6)
    for name, p in original.state_dict().items():  # every tensor loaded exactly (float32 -> float64)
        expected = p.double() if p.is_floating_point() else p  # masks stay boolean
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=0)


def test_checkpoint_config_inferred_from_the_weights(checkpoint, tmp_path) -> None:
    original, path = checkpoint
    alone = tmp_path / "alone.pt"
    alone.write_bytes(path.read_bytes())  # no config.yaml beside it
    model = load_transformer_lens_checkpoint(alone, {"act_fn": "relu"}, dtype="float32")
    assert (model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head, model.cfg.d_mlp) == (8, 2, 4, 16)
    assert model.cfg.d_vocab_out == 113 and model.cfg.normalization_type is None
    tokens = torch.tensor([[3, 4, 113]])
    torch.testing.assert_close(model(tokens), original(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "cfg", "error", "pattern"),
    [
        (lambda p: None, {"act_fn": "relu"}, FileNotFoundError, r"no such checkpoint"),
        (lambda p: p.write_text("not torch"), {"act_fn": "relu"}, ValueError, r"not a readable checkpoint"),
        (lambda p: torch.save([torch.zeros(2)], p), {"act_fn": "relu"}, ValueError, r"not a state dict"),
        ("copy", None, ValueError, r"activation function is not in the weights"),
        ("copy", {"act_fn": "relu", "d_mlp": 32}, ValueError, r"d_mlp = 32 in the config, 16 in the weights"),
        ("copy", {"act_fn": "relu", "d_mlpp": 32}, ValueError, r"unknown HookedTransformerConfig fields"),
    ],
)
def test_checkpoint_errors(checkpoint, tmp_path, make, cfg, error, pattern) -> None:
    target = tmp_path / "bad.pt"
    if make == "copy":
        target.write_bytes(checkpoint[1].read_bytes())
    else:
        make(target)
    with pytest.raises(error, match=pattern):
        load_transformer_lens_checkpoint(target, cfg)


def test_a_run_config_beside_the_checkpoint_is_not_read_as_its_config(checkpoint, tmp_path) -> None:
    # a run config named config.yaml beside the weights was read as their TransformerLens config, then
    # the error asked for "a config.yaml beside the checkpoint", which is what the user had
    target = tmp_path / "model.pt"
    target.write_bytes(checkpoint[1].read_bytes())
    (tmp_path / "config.yaml").write_text("model: {name: modadd, checkpoint: model.pt}\nmethods: [pca]\n")
    with pytest.raises(ValueError, match=r"config.yaml is a degeneracy run config .*model.checkpoint_config"):
        load_transformer_lens_checkpoint(target)
    model = load_transformer_lens_checkpoint(target, {"act_fn": "relu"})  # given fields: no file read
    tokens = torch.tensor([[1, 2, 113]])
    torch.testing.assert_close(model(tokens), checkpoint[0](tokens).double(), rtol=0, atol=1e-6)


def test_graph_builds_on_train_and_ablates_on_test(checkpoint, tmp_path) -> None:
    _, path = checkpoint
    config = tmp_path / "graph.yaml"
    config.write_text(
        f"model: {{name: modadd, checkpoint: '{path}', limit: 48}}\n"
        "methods: [pca]\nedges: {batch_size: 48}\n"
        "ablation: {split: test, limit: 40, node_points: 3, scaling: linear, delta: 0.05, edges: false}\n"
        "modules: {methods: []}\nfourier: false\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["graph", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "graph_summary.json").read_text())
    assert summary["ablation_split"] == "test" and summary["ablation_examples"] == 40
    assert summary["n_examples"] == 48
    # independently: the checkpoint, the paper's split (config.yaml: 30 % train, seed 0), test examples
    model = load_transformer_lens_checkpoint(path)
    train, _, test, test_labels = modadd_dataset(frac_train=0.3, seed=0)
    basis = degeneracy.load_basis(out / "bases" / "pca.safetensors")
    assert basis.info["fingerprint"]["data"] == degeneracy.fingerprint.data_fingerprint(train[:48])
    expected = node_ablation_curves(model, test[:40], basis, labels=test_labels[:40], num_points=3)
    saved = json.loads((out / "ablation" / "pca_nodes.json").read_text())
    assert set(saved) == set(expected) == {layer if isinstance(layer, str) else layer["name"]
                                           for layer in MODADD_NODE_LAYERS[:-1]}
    for layer, curve in expected.items():
        assert saved[layer]["accuracy"] == pytest.approx(curve.accuracy, abs=1e-12)
        assert saved[layer]["loss"] == pytest.approx(curve.loss, abs=1e-12)
    stage = json.loads((out / "stages" / "node_ablation.pca.json").read_text())
    assert stage["config"]["split"] == "test"


def test_checkpoint_with_another_bundled_name_is_an_error(checkpoint, tmp_path) -> None:
    config = tmp_path / "basis.yaml"
    config.write_text(f"model: {{name: digits_mlp, checkpoint: '{checkpoint[1]}'}}\n")
    result = CliRunner().invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "checkpoint is for the modular-addition data" in result.output
