"""Losses of labelled data for the LLC: ``loss(model, batch)`` as users write it, and the built-in
``"cross_entropy"`` and ``"mse"`` (labels taken from the batch).

``batch`` is exactly what the data yield (see :func:`degeneracy.llc.model_loss.materialize`): a tensor,
a tuple/list such as ``(X, y)``, or a dict. Three ways to evaluate every chain at once
(:func:`user_chain_loss`):

* ``"batched"``: the model's output for all chains in plain batched ops
  (:func:`~degeneracy.llc.batched.chain_batched_forward`, models whose sampled parameters sit in
  ``nn.Linear`` layers), then the loss per chain on those outputs: batched formulas for the built-in
  losses, the user's loss with the model replaced by its precomputed output (allowed only when the loss
  calls the model once, on the batch's inputs, and is vmappable; checked), called once per chain;
* ``"vmap"``: ``torch.func.vmap`` over chains of ``functional_call`` (any model, any vmappable loss);
* ``"sequential"``: a Python loop over chains (any loss, e.g. one that calls ``.item()``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from degeneracy.adapters.huggingface import is_hugging_face
from degeneracy.data import Batch, call_model, model_output_tensor
from degeneracy.llc.batched import ChainForward
from degeneracy.llc.diagnostics import LLCWarning
from degeneracy.llc.sgld import ChainLoss

__all__ = [
    "Form",
    "SUPERVISED",
    "UserLoss",
    "user_item",
    "loss_name",
    "labels_of",
    "supervised_loss",
    "per_chain_supervised",
    "user_chain_loss",
    "batched_user_chain_loss",
    "builtin_as_user_loss",
    "ModelCallMismatch",
    "LABEL_KEYS",
    "warn_unshifted_labels",
]

Form = Literal["tensor", "mapping", "tuple", "list", "batch"]
"""How the user's data yield a batch: a tensor, a dict, a tuple or list ``(inputs, labels, ...)``, or
(deprecated, for losses written against it) a :class:`~degeneracy.data.Batch`."""

SUPERVISED = ("cross_entropy", "mse")
LABEL_KEYS = ("labels", "label")
"""Keys of a dict batch that hold the labels of the built-in losses (not passed to the model)."""

UserLoss = Callable[[nn.Module, Any], Tensor]


def loss_name(loss: Callable[..., Any]) -> str:
    """The name a result records for a loss function (``"lambda"`` for a lambda).

    >>> loss_name(lambda m, b: 0), loss_name(torch.nn.functional.mse_loss)
    ('lambda', 'mse_loss')
    """
    name = getattr(loss, "__name__", type(loss).__name__)
    return "lambda" if name == "<lambda>" else name


def user_item(batch: Batch, form: Form) -> Any:
    """The batch as the user's data yield it.

    >>> b = Batch(torch.zeros(2, 3), (torch.arange(2),))
    >>> type(user_item(b, "tuple")).__name__, user_item(b, "tuple")[0] is b.inputs
    ('tuple', True)
    """
    if form in ("tensor", "mapping"):
        return batch.inputs
    if form == "tuple":
        return (batch.inputs, *batch.extras)
    if form == "list":
        return [batch.inputs, *batch.extras]
    return batch


def _split_labels(batch: Batch, form: Form) -> tuple[Any, Tensor]:
    """(model inputs, labels) of a batch for the built-in losses."""
    if form == "mapping":
        inputs = batch.inputs
        assert isinstance(inputs, Mapping)
        key = next((k for k in LABEL_KEYS if k in inputs), None)
        if key is None:
            raise ValueError(
                f"the built-in losses take the labels from the batch, but the dict batches have no "
                f"{' or '.join(repr(k) for k in LABEL_KEYS)} key (keys: {sorted(inputs)}); add one, or pass "
                "loss=callable(model, batch)"
            )
        return {k: v for k, v in inputs.items() if k != key}, inputs[key]
    if batch.extras and isinstance(batch.extras[0], Tensor):
        return batch.inputs, batch.extras[0]
    raise ValueError(
        "the built-in losses 'cross_entropy' and 'mse' take the labels from the batch, but the data carry "
        "none: pass data=(inputs, labels) (one dataset) or batches (inputs, labels), or use "
        "loss='behavioral'"
    )


def warn_unshifted_labels(model: nn.Module, loss: Any, form: Form) -> None:
    """An :class:`LLCWarning` when ``loss="cross_entropy"`` takes a dict's ``labels`` for a Hugging Face
    causal language model: the built-in loss compares the logits at each position with the label at that
    position, while these models shift their ``labels`` by one inside (``labels = input_ids``), so it
    would not be their next-token training loss.

    >>> warn_unshifted_labels(nn.Linear(2, 2), "cross_entropy", "mapping")  # not a Hugging Face model
    """
    causal = type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))
    if loss == "cross_entropy" and form == "mapping" and causal and is_hugging_face(model):
        warnings.warn(
            "loss='cross_entropy' compares the logits at each position with the batch's labels at the same "
            f"position, but {type(model).__name__} shifts its labels inside (labels = input_ids): for its "
            "next-token loss pass loss=lambda model, batch: model(**batch).loss",
            LLCWarning,
            stacklevel=3,
        )


def labels_of(batch: Batch, form: Form) -> Tensor:
    """The labels of a batch: the second element of a tuple/list batch, or a dict's ``"labels"``.

    >>> labels_of(Batch(torch.zeros(2, 3), (torch.tensor([1, 0]),)), "tuple").tolist()
    [1, 0]
    """
    return _split_labels(batch, form)[1]


def _check_shapes(name: str, output: Tensor, labels: Tensor) -> None:
    if name == "cross_entropy":
        if labels.is_floating_point() and labels.shape == output.shape:
            return  # class probabilities
        if output.dim() != labels.dim() + 1 or output.shape[:-1] != labels.shape:
            raise ValueError(
                f"loss='cross_entropy' needs logits (..., classes) and integer labels (...), got logits "
                f"{tuple(output.shape)} and labels {tuple(labels.shape)}; for a sequence model keep one "
                "position (positions / a wrapper) or pass loss=callable(model, batch)"
            )
    elif output.shape != labels.shape and output.shape != (*labels.shape, 1):
        raise ValueError(
            f"loss='mse' needs outputs and targets of one shape, got {tuple(output.shape)} and "
            f"{tuple(labels.shape)}"
        )


def supervised_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(output, labels) -> scalar``: ``"cross_entropy"`` is ``F.cross_entropy`` (mean over every
    label), ``"mse"`` is ``F.mse_loss`` (mean over every element), as users write them.

    >>> round(supervised_loss("mse")(torch.zeros(2, 1), torch.ones(2)).item(), 6)
    1.0
    """
    if name not in SUPERVISED:
        raise ValueError(f"unknown supervised loss {name!r}: use {SUPERVISED}")

    def loss(output: Tensor, labels: Tensor) -> Tensor:
        _check_shapes(name, output, labels)
        if name == "cross_entropy":
            if labels.is_floating_point() and labels.shape == output.shape:
                return F.cross_entropy(
                    output.reshape(-1, output.shape[-1]), labels.reshape(-1, output.shape[-1])
                )
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1))
        return F.mse_loss(output.reshape(labels.shape), labels.to(output.dtype))

    loss.__name__ = name
    return loss


def per_chain_supervised(name: str, outputs: Tensor, labels: Tensor) -> Tensor:
    """The built-in loss of every chain from outputs ``(C, batch, ...)``: the same numbers as
    :func:`supervised_loss` chain by chain, in one batched op.

    >>> out = torch.zeros(2, 3, 4)
    >>> torch.allclose(per_chain_supervised("cross_entropy", out, torch.tensor([0, 1, 2])),
    ...                torch.full((2,), torch.log(torch.tensor(4.0)).item()))
    True
    """
    chains = outputs.shape[0]
    _check_shapes(name, outputs[0], labels)
    if name == "cross_entropy":
        classes = outputs.shape[-1]
        flat = outputs.reshape(-1, classes)
        if labels.is_floating_point() and labels.shape == outputs.shape[1:]:
            target = labels.reshape(-1, classes).repeat(chains, 1)
        else:
            target = labels.reshape(-1).repeat(chains)
        return F.cross_entropy(flat, target, reduction="none").reshape(chains, -1).mean(dim=1)
    diff = outputs.reshape(chains, *labels.shape) - labels.to(outputs.dtype)
    return diff.square().reshape(chains, -1).mean(dim=1)


def builtin_as_user_loss(name: str, form: Form) -> UserLoss:
    """A built-in loss as ``loss(model, batch)`` on the user's batches (``batch`` as the data yield it).

    >>> fn = builtin_as_user_loss("mse", "tuple")
    >>> round(fn(nn.Identity(), (torch.zeros(2), torch.ones(2))).item(), 6)
    1.0
    """
    fn = supervised_loss(name)

    def loss(model: nn.Module, item: Any) -> Tensor:
        batch = item if isinstance(item, Batch) else _as_internal(item, form)
        inputs, labels = _split_labels(batch, form)
        return fn(model_output_tensor(call_model(model, inputs)), labels)

    loss.__name__ = name
    return loss


def _as_internal(item: Any, form: Form) -> Batch:
    if form in ("tensor", "mapping"):
        return Batch(item)
    return Batch(item[0], tuple(item[1:]))


class _LossModule(nn.Module):
    """Holds ``model`` so that ``functional_call`` can swap its parameters inside a user loss."""

    def __init__(self, model: nn.Module, loss: UserLoss) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, item: Any) -> Tensor:
        return self._loss(self.model, item)


def user_chain_loss(
    model: nn.Module, loss: UserLoss, form: Form, how: Literal["vmap", "sequential"]
) -> ChainLoss:
    """Every chain's ``loss(model, batch)`` by ``vmap`` over chains of ``functional_call``, or one chain
    after another (``"sequential"``: any loss, also one that is not vmappable). Items are ``(Batch, None)``.

    >>> model = nn.Linear(2, 1).double()
    >>> fn = user_chain_loss(model, lambda m, x: m(x).square().mean(), "tensor", "sequential")
    >>> views = {n: p.detach().expand(3, *p.shape) for n, p in model.named_parameters()}
    >>> fn(views, (Batch(torch.zeros(4, 2, dtype=torch.float64)), None)).shape
    torch.Size([3])
    """
    wrapper = _LossModule(model, loss)

    def one_chain(params: dict[str, Tensor], item: Any) -> Tensor:
        return functional_call(wrapper, {f"model.{k}": v for k, v in params.items()}, args=(item,))

    def chain_loss(views: dict[str, Tensor], item: tuple[Batch, None]) -> Tensor:
        user = user_item(item[0], form)
        if how == "vmap":
            return vmap(lambda p: one_chain(p, user))(views)
        chains = next(iter(views.values())).shape[0]
        return torch.stack([one_chain({k: v[c] for k, v in views.items()}, user) for c in range(chains)])

    return chain_loss


class ModelCallMismatch(RuntimeError):
    """The loss called the model otherwise than once on the batch's inputs (the batched engine cannot
    stand in for it).

    >>> isinstance(ModelCallMismatch("called on other inputs"), RuntimeError)
    True
    """


class _OutputProxy(nn.Module):
    """Stands in for the model inside a user loss: returns the precomputed output of the chain, and
    refuses any call on other inputs than the batch's own."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["slot"] = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        inputs, output = self.__dict__["slot"]
        if kwargs or len(args) != 1 or args[0] is not inputs:
            raise ModelCallMismatch("the loss called the model on other inputs than the batch's")
        return output


def batched_user_chain_loss(
    forward: ChainForward, loss: UserLoss | str, form: Form, how: Literal["vmap", "loop"] = "vmap"
) -> ChainLoss:
    """Every chain's loss from the outputs of ``forward`` (all chains at once): a built-in loss
    (``"cross_entropy"``/``"mse"``) by its batched formula, a user loss with the model replaced by the
    chain's output (:class:`ModelCallMismatch` when the loss calls the model otherwise), under ``vmap``
    (``how="vmap"``) or called once per chain on its slice of the outputs (``how="loop"``: the same
    numbers for a vmappable loss, and faster than vmap's batching rules: cross-entropy forward + backward
    on 4 × 256 × 10 outputs took 0.35 vs 0.53 ms, on 16 × 256 × 113 1.2 vs 2.4 ms, one thread).

    >>> from degeneracy.llc.batched import chain_batched_forward
    >>> model = nn.Sequential(nn.Linear(2, 3)).double()
    >>> views = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}
    >>> fn = batched_user_chain_loss(chain_batched_forward(model, list(views)), "cross_entropy", "tuple")
    >>> x, y = torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    >>> fn(views, (Batch(x, (y,)), None)).shape
    torch.Size([2])
    """
    proxy = _OutputProxy()

    def chain_loss(views: dict[str, Tensor], item: tuple[Batch, None]) -> Tensor:
        batch = item[0]
        if isinstance(loss, str):
            inputs, labels = _split_labels(batch, form)
            return per_chain_supervised(loss, forward(views, inputs), labels)
        outputs = forward(views, batch.inputs)  # type: ignore[arg-type]
        user = user_item(batch, form)

        def one(output: Tensor) -> Tensor:
            proxy.__dict__["slot"] = (batch.inputs, output)
            return loss(proxy, user)

        if how == "loop":
            return torch.stack([one(output) for output in outputs.unbind(0)])
        return vmap(one)(outputs)

    return chain_loss
