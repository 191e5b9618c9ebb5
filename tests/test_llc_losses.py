"""The LLC on the user's own loss: every accepted data form and loss form (issue 13).

Oracles: the same loss written in two ways (built-in name vs the user's callable, tuple vs list vs
DataLoader, batched vs vmap vs sequential engine) gives the same chains to 1e-12 (float64, same seed);
L(θ*) equals a direct evaluation of the loss on all the data.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from degeneracy.data import Batch
from degeneracy.llc import LLCWarning, estimate_llc, load_llc

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(
    nbeta=50.0, localization=100.0, step_size=1e-4, num_chains=2, num_draws=15, num_burnin=3, warn=False
)


def _setup(n: int = 40) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _same(a, b, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a.loss_traces, b.loss_traces, rtol=0, atol=atol)
    assert a.init_loss == pytest.approx(b.init_loss, rel=1e-12)


def test_tuple_list_and_dataloader_are_the_same_dataset() -> None:
    model, x, y = _setup()
    as_tuple = estimate_llc(model, (x, y), loss=cross_entropy, batch_size=10, **KW)
    assert as_tuple.init_loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-12)
    _same(as_tuple, estimate_llc(model, [x, y], loss=cross_entropy, batch_size=10, **KW))
    # a DataLoader is batches: pooled and re-split to batch_size, the same minibatches as the dataset
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    _same(as_tuple, estimate_llc(model, loader, loss=cross_entropy, batch_size=10, **KW))
    # with batch_size=None the loader's own batches are used, one per step
    per_step = estimate_llc(model, loader, loss=cross_entropy, **KW)
    assert per_step.config["num_batches"] == 5 and per_step.init_loss == pytest.approx(as_tuple.init_loss)


def test_builtin_cross_entropy_equals_the_users_callable_on_every_engine() -> None:
    model, x, y = _setup()
    reference = estimate_llc(model, (x, y), loss=cross_entropy, engine="vmap", batch_size=10, **KW)
    assert reference.config["engine"] == "vmap" and reference.config["loss"] == "cross_entropy"
    for engine in ("auto", "batched", "vmap", "sequential"):
        r = estimate_llc(model, (x, y), loss="cross_entropy", engine=engine, batch_size=10, **KW)
        assert r.config["engine"] == ("batched" if engine == "auto" else engine)
        _same(reference, r)
        user = estimate_llc(model, (x, y), loss=cross_entropy, engine=engine, batch_size=10, **KW)
        _same(reference, user)


def test_builtin_mse_and_a_tensor_batch() -> None:
    model, x, _ = _setup()
    target = torch.sin(x[:, :3])

    def mse(m: nn.Module, batch) -> torch.Tensor:
        inputs, labels = batch
        return F.mse_loss(m(inputs), labels)

    ours = estimate_llc(model, (x, target), loss="mse", batch_size=10, **KW)
    _same(ours, estimate_llc(model, (x, target), loss=mse, engine="vmap", batch_size=10, **KW))
    assert ours.init_loss == pytest.approx(float(F.mse_loss(model(x), target).detach()), rel=1e-12)
    # a tensor dataset: the loss gets the tensor itself
    r = estimate_llc(model, x, loss=lambda m, b: m(b).square().mean(), **KW)
    assert r.init_loss == pytest.approx(float(model(x).square().mean().detach()), rel=1e-12)


def test_dict_batches_for_user_and_builtin_losses() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features)

    torch.manual_seed(0)
    model = Keyword().double()
    _, x, y = _setup()
    data = {"features": x, "labels": y}
    builtin = estimate_llc(model, data, loss="cross_entropy", batch_size=10, **KW)
    user = estimate_llc(
        model,
        data,
        loss=lambda m, b: F.cross_entropy(m(features=b["features"]), b["labels"]),
        batch_size=10,
        **KW,
    )
    _same(builtin, user)
    assert builtin.init_loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-12)


def test_a_loss_that_cannot_be_vmapped_falls_back_with_a_warning() -> None:
    model, x, y = _setup()

    def with_item(m: nn.Module, batch) -> torch.Tensor:
        loss = cross_entropy(m, batch)
        return loss * 2 if loss.item() > 1e6 else loss  # a Python branch on a value

    with pytest.warns(LLCWarning, match="cannot be vectorised"):
        r = estimate_llc(model, (x, y), loss=with_item, batch_size=10, **KW)
    assert r.config["engine"] == "sequential"
    _same(r, estimate_llc(model, (x, y), loss=cross_entropy, batch_size=10, **KW))


def test_batched_engine_refuses_a_loss_that_calls_the_model_otherwise(unchecked) -> None:
    model, x, y = _setup()

    def twice(m: nn.Module, batch) -> torch.Tensor:  # calls the model on a part of the batch
        inputs, labels = batch
        return F.cross_entropy(m(inputs[:5]), labels[:5])

    r = estimate_llc(model, (x, y), loss=twice, batch_size=10, **KW)
    assert r.config["engine"] == "vmap"
    _same(r, estimate_llc(model, (x, y), loss=twice, engine="sequential", batch_size=10, **KW))
    with pytest.raises(ValueError, match="engine='batched' needs"):
        estimate_llc(model, (x, y), loss=twice, engine="batched", batch_size=10, **KW)


def test_default_loss_on_labelled_data_warns_and_stays_behavioral() -> None:
    model, x, y = _setup()
    with pytest.warns(LLCWarning, match="no loss= given and the data carry labels"):
        r = estimate_llc(model, (x, y), **KW)
    assert r.config["loss"] == "behavioral-mse" and "loss=behavioral-mse" in repr(r)
    _same(r, estimate_llc(model, x, loss="behavioral", **KW))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_llc(model, x, **KW)  # inputs only: the behavioral loss is the only one, no warning
        estimate_llc(model, (x, y), loss="behavioral", **KW)


def test_mse_on_unlabelled_data_is_the_deprecated_behavioral_alias() -> None:
    model, x, _ = _setup()
    with pytest.warns(DeprecationWarning, match="loss='behavioral'"):
        r = estimate_llc(model, x, loss="mse", **KW)
    _same(r, estimate_llc(model, x, loss="behavioral", **KW))


def test_legacy_batch_losses_still_work_with_a_deprecation_warning() -> None:
    model, x, y = _setup()

    def annotated(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(batch.inputs), batch.extras[0])

    new = estimate_llc(model, (x, y), loss=cross_entropy, batch_size=10, **KW)
    for legacy in (annotated, lambda m, b: F.cross_entropy(m(b.inputs), b.extras[0])):
        with pytest.warns(DeprecationWarning, match="batch.inputs"):
            _same(new, estimate_llc(model, (x, y), loss=legacy, batch_size=10, **KW))


def test_saved_config_and_repr_name_the_loss(tmp_path) -> None:
    model, x, y = _setup()
    r = estimate_llc(model, (x, y), loss="cross_entropy", **KW)
    assert repr(r).startswith("LLCResult(loss=cross_entropy,")
    assert load_llc(r.save(tmp_path / "r.safetensors")).config["loss"] == "cross_entropy"


def test_bad_data_and_losses_get_clear_errors(unchecked) -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match=r"lengths are \[40, 39\]"):
        estimate_llc(model, (x, y[:-1]), loss=cross_entropy, **KW)
    with pytest.raises(ValueError, match="the data carry none"):
        estimate_llc(model, x, loss="cross_entropy", **KW)
    with pytest.raises(TypeError, match="must return a scalar tensor"):
        estimate_llc(model, (x, y), loss=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), **KW)
    with pytest.raises(ValueError, match="loss='cross_entropy' needs logits"):
        estimate_llc(model, (x, y[:, None].expand(-1, 2)), loss="cross_entropy", **KW)
    with unchecked(), pytest.raises(ValueError, match="unknown loss 'hinge'"):
        estimate_llc(model, (x, y), loss="hinge", **KW)  # type: ignore[arg-type]
