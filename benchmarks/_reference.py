"""Load the companion paper's modular-addition checkpoint and its training split (benchmarks only)."""

from __future__ import annotations

from pathlib import Path

import torch

# The companion paper's basis settings: centred, absolute truncation 1e-15 (it keeps ~all directions),
# logits left unrotated. Its node layers are `degeneracy.commands.config.MODADD_NODE_LAYERS`.
PAPER_BASIS = dict(
    gram_threshold=1e-15, interaction_threshold=1e-15, relative=False, rotate_final=False
)
PAPER_DIMS = {"lib": [115, 110, 116], "pca": [115, 127, 129]}  # retained of 129 (METHOD §8)

DEFAULT_CHECKPOINT = (
    Path(__file__).resolve().parents[2] / "shared/reference-models/modadd-seed0/model_epoch_60000.pt"
)


def load_reference(path: str | Path = DEFAULT_CHECKPOINT, dtype: torch.dtype = torch.float64):
    """(model, train_inputs, train_labels, all_inputs, all_labels) of the reference checkpoint.

    Data as in its README: all 113² pairs shuffled with seed 0, the first 30 % for training.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    state = torch.load(path, weights_only=True, map_location="cpu")
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=128,
        n_heads=4,
        d_head=32,
        d_mlp=512,
        act_fn="relu",
        normalization_type=None,
        n_ctx=3,
        d_vocab=114,
        d_vocab_out=state["unembed.W_U"].shape[1],
        seed=0,
    )
    model = HookedTransformer(cfg, move_to_device=False)
    model.load_state_dict(state, strict=True)
    model = model.to(dtype).eval()
    p = 113
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    inputs = torch.stack([a, b, torch.full_like(a, p)], 1)
    labels = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(0))
    n_train = int(0.3 * p * p)
    return model, inputs[perm[:n_train]], labels[perm[:n_train]], inputs, labels
