"""One behavioral loss for the Hessian accounting and the LLC (issue #8 item 2, METHOD §6).

On a sequence-output model (outputs (batch, P = 3, d_out)) the Hessian's quadratic form vᵀHv and the
second derivative of the LLC sampler's loss along v are the same number, for MSE and KL; the loss sums
over positions (checked by hand); both LLC engines give the same λ̂.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from degeneracy.accounting import hessian_spectrum
from degeneracy.behavioral import behavioral_loss_function
from degeneracy.llc import estimate_llc
from degeneracy.llc.model_loss import materialize, model_chain_loss, select_parameters
from degeneracy.run import ParamLayout

F64 = torch.float64
POSITIONS = 3


class SequenceModel(nn.Module):
    """(batch, pos, d_in) -> (batch, pos, d_out): a tanh MLP applied at every position."""

    def __init__(self, d_in: int = 2, hidden: int = 3, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _problem(seed: int = 0) -> tuple[SequenceModel, torch.Tensor]:
    torch.manual_seed(seed)
    model = SequenceModel().to(F64)
    x = torch.randn(10, POSITIONS, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return model, x


def _llc_loss_along(model: nn.Module, x: torch.Tensor, loss: str, engine: str):
    """t ↦ the LLC sampler's loss (the chain loss estimate_llc builds) at θ* + t v, one chain."""
    chosen = select_parameters(model, None)
    layout = ParamLayout.of(chosen)
    center = layout.flatten(chosen).detach()
    examples = materialize(x, torch.device("cpu"), F64)
    spec = model_chain_loss(model.eval(), examples, layout, center, loss=loss, engine=engine)
    assert spec.engine == engine
    item = next(spec.batches())

    def along(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return spec.chain_loss(layout.unflatten((center + t * v).unsqueeze(0)), item)[0]

    return layout, center, along


def _second_derivative(fn, v: torch.Tensor) -> float:
    t = torch.zeros((), dtype=F64, requires_grad=True)
    (d1,) = torch.autograd.grad(fn(v, t), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1, t)
    return float(d2)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_hessian_quadratic_form_is_the_llc_loss_curvature(kind: str) -> None:
    model, x = _problem()
    loss_name = "behavioral" if kind == "mse" else "kl"
    # the accounting's loss, θ ↦ L_B(θ | θ*), and its Hessian at θ*
    loss = behavioral_loss_function(model, x, kind)
    layout = ParamLayout.of_model(model)
    center = layout.flatten(dict(model.named_parameters())).detach()
    hessian = torch.func.hessian(lambda flat: loss(layout.unflatten(flat)))(center)
    # the accounting's exact spectrum is the spectrum of this very matrix
    eigenvalues = hessian_spectrum(model, x, kind=kind, method="exact").eigenvalues
    expected = torch.linalg.eigvalsh(hessian).flip(0)
    torch.testing.assert_close(eigenvalues, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))

    generator = torch.Generator().manual_seed(7)
    for engine in ("vmap", "batched"):
        _, _, along = _llc_loss_along(model, x, loss_name, engine)
        for _ in range(3):
            v = torch.randn(layout.numel, generator=generator, dtype=F64)
            quadratic = float(v @ hessian @ v)
            assert _second_derivative(along, v) == pytest.approx(quadratic, rel=1e-9, abs=1e-12)
            assert float(along(v, torch.zeros((), dtype=F64))) == 0.0  # L_B(θ*|θ*) = 0


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_llc_loss_sums_over_positions(kind: str) -> None:
    model, x = _problem(seed=3)
    layout, center, along = _llc_loss_along(model, x, "behavioral" if kind == "mse" else "kl", "vmap")
    v = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1), dtype=F64)
    theta = layout.unflatten(center + 0.3 * v)
    with torch.no_grad():
        out, ref = functional_call(model, theta, (x,)), model(x)
    # by hand: Σ over examples, positions and features, divided by the number of sequences
    total = 0.0
    for i in range(x.shape[0]):
        for p in range(POSITIONS):
            if kind == "mse":
                total += float(((out[i, p] - ref[i, p]) ** 2).sum())
            else:
                q = torch.softmax(ref[i, p], -1)
                total += float((q * (q.log() - torch.log_softmax(out[i, p], -1))).sum())
    expected = total / x.shape[0]
    assert float(along(v, torch.tensor(0.3, dtype=F64))) == pytest.approx(expected, rel=1e-12)


def test_engines_agree_on_a_sequence_model() -> None:
    model, x = _problem(seed=5)
    kw = dict(nbeta=50.0, localization=10.0, num_chains=2, num_draws=30, num_burnin=10, seed=2, warn=False)
    fast = estimate_llc(model, x, engine="batched", **kw)
    general = estimate_llc(model, x, engine="vmap", **kw)
    assert fast.config["engine"] == "batched" and general.config["engine"] == "vmap"
    torch.testing.assert_close(fast.loss_traces, general.loss_traces, rtol=1e-9, atol=1e-12)
    assert fast.mean == pytest.approx(general.mean, rel=1e-9)
