"""The chain-batched TransformerLens forward of the LLC (degeneracy.llc.transformer, issue 13's speed).

Oracle: the vmap reference engine (``torch.func.vmap`` of ``functional_call`` of TransformerLens' own
forward): the same per-chain losses and gradients to 1e-12 in float64 at random perturbed parameters,
for short (element-wise) and long (einsum) contexts, ReLU and GELU, two layers, a subset of sampled
parameters; whole runs give the vmap engine's chains (user cross-entropy, behavioral MSE and KL);
unsupported configs are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from degeneracy.data import Batch
from degeneracy.llc import estimate_llc
from degeneracy.llc.transformer import SHORT_CONTEXT, transformer_chain_forward
from degeneracy.llc.user_loss import batched_user_chain_loss, user_chain_loss
from degeneracy.run import ParamLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(n_ctx: int, act_fn: str = "relu", n_layers: int = 2, **extra):
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=n_layers,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_mlp=12,
        act_fn=act_fn,
        normalization_type=None,
        n_ctx=n_ctx,
        d_vocab=7,
        d_vocab_out=5,
        seed=0,
        **extra,
    )
    model = tl.HookedTransformer(cfg, move_to_device=False).double().eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 7, (10, n_ctx), generator=g)
    labels = torch.randint(0, 5, (10,), generator=g)
    return model, tokens, labels


def _last_ce(model, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x)[:, -1], y)


@pytest.mark.parametrize(
    ("n_ctx", "act_fn", "subset"),
    [(3, "relu", False), (SHORT_CONTEXT + 2, "relu", False), (4, "gelu", False), (3, "relu", True)],
)
def test_losses_and_gradients_match_vmap(n_ctx: int, act_fn: str, subset: bool) -> None:
    model, tokens, labels = _model(n_ctx, act_fn)
    named = dict(model.named_parameters())
    if subset:  # the attention of the first block only: the rest keeps the model's values
        named = {n: p for n, p in named.items() if n.startswith("blocks.0.attn.")}
    layout = ParamLayout.of(named)
    center = layout.flatten(named).detach()
    theta = center + 0.3 * torch.randn(3, center.numel(), generator=torch.Generator().manual_seed(5))
    forward = transformer_chain_forward(model, list(layout.names))
    assert forward is not None
    fast = batched_user_chain_loss(forward, _last_ce, "tuple", "loop")
    reference = user_chain_loss(model, _last_ce, "tuple", "vmap")
    item = (Batch(tokens, (labels,)), None)
    results = []
    for chain_loss in (fast, reference):
        leaf = theta.clone().requires_grad_(True)
        losses = chain_loss(layout.unflatten(leaf), item)
        (grad,) = torch.autograd.grad(losses.sum(), leaf)
        results.append((losses.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    scale = float(results[1][1].abs().max())
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12 * scale)


def test_estimate_llc_runs_it_with_the_vmap_engines_chains() -> None:
    model, tokens, labels = _model(3, n_layers=1)
    kw = dict(
        loss=_last_ce, nbeta=20.0, localization=100.0, step_size=1e-4, num_chains=2, num_draws=15, warn=False
    )
    fast = estimate_llc(model, (tokens, labels), batch_size=5, **kw)
    slow = estimate_llc(model, (tokens, labels), batch_size=5, engine="vmap", **kw)
    assert fast.config["engine"] == "batched" and slow.config["engine"] == "vmap"
    torch.testing.assert_close(fast.loss_traces, slow.loss_traces, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["behavioral", "kl"])
def test_behavioral_loss_runs_on_it_with_the_vmap_engines_chains(kind: str) -> None:
    """The behavioral losses (MSE and KL of the logits against θ*'s) take the same forward."""
    model, tokens, _ = _model(3, n_layers=1)
    kw = dict(
        loss=kind, nbeta=20.0, localization=100.0, step_size=1e-4, num_chains=2, num_draws=15, warn=False
    )
    fast = estimate_llc(model, tokens, batch_size=5, **kw)
    slow = estimate_llc(model, tokens, batch_size=5, engine="vmap", **kw)
    assert fast.config["engine"] == "batched" and slow.config["engine"] == "vmap"
    assert float(fast.loss_traces.abs().max()) > 0  # the chains moved off θ*
    torch.testing.assert_close(fast.loss_traces, slow.loss_traces, rtol=0, atol=1e-12)
    tl = pytest.importorskip("transformer_lens")
    cfg = model.cfg.to_dict() | {"normalization_type": "LN"}
    with_ln = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg), move_to_device=False).double().eval()
    assert estimate_llc(with_ln, tokens, batch_size=5, **kw).config["engine"] == "vmap"


def test_refuses_what_it_does_not_implement() -> None:
    base, _, _ = _model(3)
    tl = pytest.importorskip("transformer_lens")
    cfg = base.cfg.to_dict()
    cfg.update(normalization_type="LN")
    with_ln = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg), move_to_device=False)
    assert transformer_chain_forward(with_ln, [n for n, _ in with_ln.named_parameters()]) is None
    cfg.update(normalization_type=None, act_fn="silu")
    silu = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg), move_to_device=False)
    assert transformer_chain_forward(silu, [n for n, _ in silu.named_parameters()]) is None
    assert transformer_chain_forward(torch.nn.Linear(2, 2), ["weight", "bias"]) is None
