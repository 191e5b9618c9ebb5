"""TransformerLens checkpoints: a ``.pt`` state dict of a ``HookedTransformer`` (the format the companion
paper ships) loaded into a model, with its config given, read from a ``config.yaml`` beside it, or
inferred from the tensor shapes.

>>> sorted(infer_transformer_lens_config({"embed.W_E": torch.zeros(5, 8),
...                                       "pos_embed.W_pos": torch.zeros(3, 8)}).items())
[('d_model', 8), ('d_vocab', 5), ('n_ctx', 3), ('n_layers', 0)]
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["load_transformer_lens_checkpoint", "infer_transformer_lens_config", "read_checkpoint_config"]


def infer_transformer_lens_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` fields that a state dict's shapes determine: ``n_layers``,
    ``d_model``, ``d_vocab``, ``n_ctx``, ``n_heads``, ``d_head``, ``d_mlp``, ``d_vocab_out`` and
    ``normalization_type`` (``"LN"`` when LayerNorm weights are present, else ``None``). The activation
    function (``act_fn``) is not in the weights: give it.

    >>> state = {"embed.W_E": torch.zeros(7, 4), "blocks.0.attn.W_Q": torch.zeros(2, 4, 2),
    ...          "blocks.0.mlp.W_in": torch.zeros(4, 16), "unembed.W_U": torch.zeros(4, 7)}
    >>> cfg = infer_transformer_lens_config(state)
    >>> cfg["n_layers"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"], cfg["normalization_type"]
    (1, 2, 2, 16, None)
    """
    cfg: dict[str, Any] = {}
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    cfg["n_layers"] = max(blocks) + 1 if blocks else 0
    if "embed.W_E" in state:
        cfg["d_vocab"], cfg["d_model"] = (int(n) for n in state["embed.W_E"].shape)
    if "pos_embed.W_pos" in state:
        cfg["n_ctx"] = int(state["pos_embed.W_pos"].shape[0])
    if "blocks.0.attn.W_Q" in state:
        cfg["n_heads"], _, cfg["d_head"] = (int(n) for n in state["blocks.0.attn.W_Q"].shape)
    if "blocks.0.mlp.W_in" in state:
        cfg["d_mlp"] = int(state["blocks.0.mlp.W_in"].shape[1])
    if "unembed.W_U" in state:
        cfg["d_vocab_out"] = int(state["unembed.W_U"].shape[1])
    if blocks:
        cfg["normalization_type"] = "LN" if "blocks.0.ln1.w" in state else None
    return cfg


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The model fields of a checkpoint's YAML config (its ``model:`` section, or the whole file).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.yaml").write_text("model: {act_fn: relu, n_layers: 1}\\nseed: 0\\n")
    >>> read_checkpoint_config(folder / "config.yaml")
    {'act_fn': 'relu', 'n_layers': 1}
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the checkpoint config ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a checkpoint config is a mapping, not a {type(raw).__name__}")
    model = raw.get("model", raw)
    if not isinstance(model, dict):
        raise ValueError(f"{path}: its 'model' section is not a mapping")
    return dict(model)


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "a TransformerLens state dict saved with torch.save(model.state_dict(), path) is expected"
        ) from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def load_transformer_lens_checkpoint(
    path: str | Path,
    cfg: Any = None,
    *,
    dtype: str | torch.dtype = torch.float64,
    strict: bool = True,
) -> nn.Module:
    """A ``HookedTransformer`` (eval mode, on the CPU, in ``dtype``) from a TransformerLens state dict.

    Args:
        path: the ``.pt`` file (``torch.save(model.state_dict(), path)``; read with
            ``weights_only=True``, never unpickling code).
        cfg: a ``HookedTransformerConfig``, a dict of its fields, or the path of a YAML config (its
            ``model:`` section, as the companion paper ships); ``None``: ``config.yaml`` beside the
            checkpoint if there is one. Fields the weights determine (widths, layers, vocabulary,
            LayerNorm or not) are inferred and checked against the config; ``act_fn`` must be given.
        dtype: the model's dtype (default float64, the library's choice for analysis).
        strict: missing or unexpected keys are an error (default).

    >>> import tempfile
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> fields = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, act_fn="relu",
    ...               normalization_type=None, n_ctx=3, d_vocab=6, seed=0)
    >>> original = HookedTransformer(HookedTransformerConfig(**fields))
    >>> path = Path(tempfile.mkdtemp()) / "model.pt"
    >>> torch.save(original.state_dict(), path)
    >>> model = load_transformer_lens_checkpoint(path, {"act_fn": "relu"})
    >>> tokens = torch.tensor([[1, 2, 5]])
    >>> torch.allclose(model(tokens), original(tokens).double(), atol=1e-6), model.cfg.d_mlp
    (True, 16)
    """
    try:
        import transformer_lens as tl
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("loading a TransformerLens checkpoint needs `pip install degeneracy[tl]`") from err
    path = Path(path)
    state = _read_state(path)
    if cfg is None and (path.parent / "config.yaml").exists():
        cfg = path.parent / "config.yaml"
    if isinstance(cfg, str | Path):
        cfg_path, cfg = Path(cfg), read_checkpoint_config(cfg)
        if {"name", "checkpoint"} & set(cfg):  # the model: section of a degeneracy run config
            raise ValueError(
                f"{cfg_path} is a degeneracy run config (its model: has name/checkpoint), not the "
                "checkpoint's TransformerLens config: give the model fields as cfg= (the CLI's "
                "model.checkpoint_config), e.g. {act_fn: relu}, or name the run config otherwise"
            )
    if isinstance(cfg, tl.HookedTransformerConfig):
        fields = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        given = {k: fields[k] for k in infer_transformer_lens_config(state) if k in fields}
        config = cfg
    else:
        given = dict(cfg or {})
        inferred = infer_transformer_lens_config(state)
        if "act_fn" not in given:
            raise ValueError(
                f"{path}: the activation function is not in the weights: pass cfg={{'act_fn': 'relu'}} "
                "(or 'gelu', ...), a HookedTransformerConfig, or a config.yaml beside the checkpoint"
            )
        known = set(tl.HookedTransformerConfig.__dataclass_fields__)
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown HookedTransformerConfig fields {unknown}")
        merged = {**inferred, **given}
        merged.setdefault("seed", 0)
        if "d_head" not in merged and "n_heads" in merged:
            merged["d_head"] = merged["d_model"] // merged["n_heads"]
        try:
            config = tl.HookedTransformerConfig(**merged)
        except TypeError as err:  # fields neither given nor in the weights (another model's state dict?)
            raise ValueError(
                f"{path}: no TransformerLens config from these weights ({err}); they hold "
                f"{sorted(state)[:6]}: a HookedTransformer state dict (embed.W_E, blocks.0.attn.W_Q, ...) "
                "is expected, or give the missing fields in the config"
            ) from err
    inferred = infer_transformer_lens_config(state)
    clash = {
        k: (v, getattr(config, k)) for k, v in inferred.items() if k in given and given[k] != v
    }
    if clash:
        raise ValueError(
            f"{path}: the config does not match the weights: "
            + ", ".join(f"{k} = {c} in the config, {w} in the weights" for k, (w, c) in clash.items())
        )
    model = tl.HookedTransformer(config, move_to_device=False)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("IGNORE", ".mask"))]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"{path}: the checkpoint does not fit the config: missing {missing[:8]}, unexpected "
            f"{list(result.unexpected_keys)[:8]} (pass strict=False to load it anyway)"
        )
    resolved = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Changing model dtype"
        model = model.to(resolved)
    return model.eval()
