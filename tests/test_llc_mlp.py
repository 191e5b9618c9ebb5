"""The hand-written-backward engine for stacks of linear layers (degeneracy.llc.mlp, issue 13's speed).

Oracles: the engine's losses and gradients equal the vmap reference engine's (``torch.func.vmap`` of
``functional_call`` + autograd, an independent computation) to 1e-12 in float64 at random perturbed
parameters, for every activation, loss head and bias layout; whole runs give the same chains as the
vmap engine (float64, same seed); models and losses outside its scope are refused or fall back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from degeneracy.data import Batch
from degeneracy.llc import estimate_llc
from degeneracy.llc.batched import vmap_behavioral_chain_loss
from degeneracy.llc.mlp import MLPChainLoss, mlp_steps, recognise_loss
from degeneracy.llc.user_loss import builtin_as_user_loss, user_chain_loss
from degeneracy.models.digits import DigitsMLP
from degeneracy.run import ParamLayout

pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = [
    nn.ReLU(),
    nn.LeakyReLU(0.1),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.SiLU(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.Identity(),
]


def _data(n: int = 12, d_in: int = 5, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def _perturbed(model: nn.Module, chains: int = 3, scale: float = 0.3) -> tuple[ParamLayout, torch.Tensor]:
    layout = ParamLayout.of_model(model)
    center = layout.flatten(dict(model.named_parameters())).detach()
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(chains, center.numel(), generator=g, dtype=torch.float64)
    return layout, center + scale * noise


def _reference(
    chain_loss, layout: ParamLayout, theta: torch.Tensor, item
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = theta.clone().requires_grad_(True)
    losses = chain_loss(layout.unflatten(leaf), item)
    (grad,) = torch.autograd.grad(losses.sum(), leaf)
    return losses.detach(), grad


def _assert_engine_matches(engine: MLPChainLoss, reference, layout, theta, item) -> None:
    want_loss, want_grad = _reference(reference, layout, theta, item)
    grad = torch.full_like(theta, float("nan"))
    losses = engine.value_and_grad(theta, item, grad)
    torch.testing.assert_close(losses, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 * float(want_grad.abs().max()))


@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
def test_every_activation_matches_vmap_cross_entropy(act: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 4, bias=False), act, nn.Linear(4, 3)).double()
    x, y = _data()
    layout, theta = _perturbed(model)
    steps = mlp_steps(model, layout)
    assert steps is not None and len(steps) == 5
    reference = user_chain_loss(model, builtin_as_user_loss("cross_entropy", "tuple"), "tuple", "vmap")
    engine = MLPChainLoss(steps, "cross_entropy", reference, form="tuple")
    _assert_engine_matches(engine, reference, layout, theta, (Batch(x, (y,)), None))


def _user_ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _smoothed(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, label_smoothing=0.1)


def _user_mse(model: nn.Module, batch) -> torch.Tensor:
    x, t = batch
    return ((model(x) - t) ** 2).mean()


@pytest.mark.parametrize("head", ["cross_entropy", "mse", "user-ce", "user-smoothed", "user-mse"])
def test_every_loss_head_matches_vmap_on_the_digits_architecture(head: str) -> None:
    torch.manual_seed(0)
    model = DigitsMLP(d_in=5, d_hidden=6, n_classes=3).double()
    x, y = _data()
    if "mse" in head:
        y = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layout, theta = _perturbed(model)
    user = {"user-ce": _user_ce, "user-smoothed": _smoothed, "user-mse": _user_mse}.get(head)
    if user is None:
        user = builtin_as_user_loss(head, "tuple")
        engine_head = head
    else:
        engine_head = "user"
    reference = user_chain_loss(model, user, "tuple", "vmap")
    engine = MLPChainLoss(mlp_steps(model, layout, x), engine_head, reference, user, "tuple")
    _assert_engine_matches(engine, reference, layout, theta, (Batch(x, (y,)), None))


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_behavioral_heads_match_vmap(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, _ = _data()
    layout, theta = _perturbed(model)
    reference = vmap_behavioral_chain_loss(model, kind)
    engine = MLPChainLoss(mlp_steps(model, layout), f"behavioral-{kind}", reference)
    _assert_engine_matches(engine, reference, layout, theta, (Batch(x), model(x).detach()))


def test_recognises_the_users_cross_entropy_and_mse_only() -> None:
    x, y = _data()
    t = torch.randn(12, 3, dtype=torch.float64)
    items = [(Batch(x, (y,)), None)]
    nll = lambda m, b: F.nll_loss(F.log_softmax(m(b[0]), dim=-1), b[1])  # noqa: E731
    assert recognise_loss(_user_ce, "tuple", items, 3, torch.float64) == "cross_entropy"
    assert recognise_loss(nll, "tuple", items, 3, torch.float64) == "cross_entropy"
    assert recognise_loss(_smoothed, "tuple", items, 3, torch.float64) is None
    summed = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    assert recognise_loss(summed, "tuple", items, 3, torch.float64) is None
    assert recognise_loss(_user_mse, "tuple", [(Batch(x, (t,)), None)], 3, torch.float64) == "mse"
    assert recognise_loss(_user_ce, "tuple", [(Batch(x, (t,)), None)], 3, torch.float64) is None


def test_refuses_what_it_does_not_handle() -> None:
    layer_norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert mlp_steps(layer_norm, ParamLayout.of_model(layer_norm)) is None

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b(torch.relu(self.a(x)))

    residual = Residual()
    assert mlp_steps(residual, ParamLayout.of_model(residual)) is None
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    only_last = ParamLayout.of({n: p for n, p in mlp.named_parameters() if n.startswith("2.")})
    assert mlp_steps(mlp, only_last) is None  # a frozen linear layer: the general engine
    starts_with_act = nn.Sequential(nn.Tanh(), nn.Linear(3, 2))
    assert mlp_steps(starts_with_act, ParamLayout.of_model(starts_with_act)) is None


KW = dict(
    nbeta=50.0,
    localization=100.0,
    step_size=1e-4,
    num_chains=3,
    num_draws=20,
    num_burnin=2,
    warn=False,
    seed=3,
)


@pytest.mark.parametrize("loss", ["cross_entropy", "user", "smoothed", "behavioral"])
def test_estimate_llc_gives_the_vmap_engines_chains(loss: str) -> None:
    torch.manual_seed(0)
    model = DigitsMLP(d_in=5, d_hidden=6, n_classes=3).double()
    x, y = _data(n=40)
    spec = {
        "cross_entropy": "cross_entropy",
        "user": _user_ce,
        "smoothed": _smoothed,
        "behavioral": "behavioral",
    }
    fast = estimate_llc(model, (x, y), loss=spec[loss], batch_size=10, **KW)
    slow = estimate_llc(model, (x, y), loss=spec[loss], batch_size=10, engine="vmap", **KW)
    assert fast.config["engine"] == "batched" and fast.config["backward"] == "manual"
    assert slow.config["engine"] == "vmap" and "backward" not in slow.config
    assert fast.config.get("loss_formula") == ("cross_entropy" if loss == "user" else None)
    torch.testing.assert_close(fast.loss_traces, slow.loss_traces, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.burnin_traces, slow.burnin_traces, rtol=0, atol=1e-12)


def test_labels_outside_the_classes_fall_back_to_the_users_loss() -> None:
    torch.manual_seed(0)
    model = DigitsMLP(d_in=5, d_hidden=6, n_classes=3).double()
    x, y = _data(n=40)
    y[5] = -100  # cross-entropy's ignore_index: the closed form would not ignore it
    fast = estimate_llc(model, (x, y), loss=_user_ce, batch_size=10, **KW)
    slow = estimate_llc(model, (x, y), loss=_user_ce, batch_size=10, engine="vmap", **KW)
    assert fast.config["backward"] == "manual" and "loss_formula" not in fast.config
    torch.testing.assert_close(fast.loss_traces, slow.loss_traces, rtol=0, atol=1e-12)
