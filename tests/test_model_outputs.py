"""Models that return a plain dict or a ``ModelOutput``-like object work everywhere a tensor output does,
with the same numbers (issue 11: "a model whose output is a plain dict: cannot find an output tensor")."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.data import model_output_tensor


class Wrapped(nn.Module):
    """``inner``'s logits as a plain dict (with another tensor first), or as attributes of an object."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        if self.kind == "dict":
            return {"aux": x.sum(-1), "logits": logits}
        return type("Output", (), {"logits": logits, "hidden": x})()


def _setup():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(24, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    return inner, x, labels


@pytest.mark.parametrize("kind", ["dict", "object"])
def test_dict_and_object_outputs_give_the_numbers_of_the_tensor_output(kind) -> None:
    inner, x, labels = _setup()
    model = Wrapped(inner, kind)
    assert torch.equal(model_output_tensor(model(x)), inner(x))
    data = [(x[:12], labels[:12]), (x[12:], labels[12:])]
    options = {"num_chains": 2, "num_draws": 4, "num_burnin": 0, "step_size": 1e-4, "warn": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains
        for engine in ("vmap", "batched"):
            got = degeneracy.estimate_llc(model, data, loss="cross_entropy", engine=engine, **options)
            want = degeneracy.estimate_llc(inner, data, loss="cross_entropy", engine=engine, **options)
            torch.testing.assert_close(got.loss_traces, want.loss_traces, rtol=1e-12, atol=0)
    if kind == "dict":  # node layers and the behavioral loss read a dict output too
        layers = [{"name": "hidden", "module": "inner.1"}, "output"]
        got = degeneracy.interaction_basis(model, x, layers, progress=False)
        plain = [{"name": "hidden", "module": "1"}, "output"]
        want = degeneracy.interaction_basis(inner, x, plain, progress=False)
        torch.testing.assert_close(got["hidden"].C, want["hidden"].C, rtol=1e-10, atol=1e-12)
        got = degeneracy.hessian_spectrum(model, x, method="exact").eigenvalues
        want = degeneracy.hessian_spectrum(inner, x, method="exact").eigenvalues
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
