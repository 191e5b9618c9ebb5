"""The loss of a model's sampled parameters, as the LLC samplers see it (METHOD §6–7).

What :func:`~degeneracy.llc.estimate.estimate_llc`, :func:`~degeneracy.llc.curve.behavioral_loss_fn`
and N_eff(ε) share for an ``nn.Module``:

* which parameters are sampled (:func:`select_parameters`) and the loss they choose
  (:func:`loss_kind`: ``"behavioral"``/``"mse"`` or ``"kl"``, else a callable);
* the data held in memory (:func:`materialize`, cast by the run layer's dtype rule: floating inputs in
  another dtype than the model's are an error unless the caller passed ``dtype=``), the reference
  outputs f_θ*(x) (:func:`reference_outputs`) and the minibatch streams (:func:`minibatches`);
* the chain loss (:func:`model_chain_loss`): the behavioral loss of
  :mod:`degeneracy.behavioral` (summed over positions and features, averaged over examples) of every
  chain at once, by ``vmap`` or by the batched ``nn.Linear`` engine, or a user loss under ``vmap``.

>>> import torch
>>> model = torch.nn.Linear(2, 1).double()
>>> data = materialize(torch.ones(4, 2, dtype=torch.float64), torch.device("cpu"), torch.float64)
>>> layout = ParamLayout.of(select_parameters(model, None))
>>> center = layout.flatten(select_parameters(model, None))
>>> spec = model_chain_loss(model, data, layout, center, loss="behavioral", engine="vmap")
>>> spec.chain_loss(layout.unflatten(center.unsqueeze(0)), next(spec.batches())).tolist()  # L_B(θ*|θ*)
[0.0]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from degeneracy.behavioral import LossKind
from degeneracy.data import Batch, iter_batches, pool_batches
from degeneracy.llc.batched import (
    batched_behavioral_chain_loss,
    chain_losses_agree,
    vmap_behavioral_chain_loss,
)
from degeneracy.llc.sgld import ChainLoss, cycle_batches, seed_from
from degeneracy.run import ParamLayout, cast_inputs, run_model

__all__ = [
    "LossSpec",
    "Engine",
    "Examples",
    "ModelLoss",
    "loss_kind",
    "select_parameters",
    "materialize",
    "minibatches",
    "reference_outputs",
    "model_chain_loss",
]

LossSpec = Literal["behavioral", "mse", "kl"] | Callable[[nn.Module, Batch], Tensor]
Engine = Literal["auto", "vmap", "batched"]


def loss_kind(loss: str) -> LossKind:
    """The behavioral loss kind a ``loss=`` name selects (``"behavioral"`` is ``"mse"``).

    >>> loss_kind("behavioral"), loss_kind("kl")
    ('mse', 'kl')
    """
    if loss in ("behavioral", "mse"):
        return "mse"
    if loss == "kl":
        return "kl"
    raise ValueError(f"unknown loss {loss!r}: use 'behavioral', 'kl' or a callable loss(model, batch)")


def select_parameters(
    model: nn.Module, params: Sequence[str] | Callable[[str], bool] | None
) -> dict[str, Tensor]:
    """The sampled parameters (detached): those named in ``params``, or passing the predicate
    ``params``, or (``None``) all that require grad.

    >>> sorted(select_parameters(torch.nn.Linear(2, 1), ["bias"]))
    ['bias']
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif callable(params):
        chosen = {n: p for n, p in named.items() if params(n)}
    else:
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(named)}")
        chosen = {n: named[n] for n in params}
    if not chosen:
        raise ValueError("no parameters selected to sample")
    return {n: p.detach() for n, p in chosen.items()}


@dataclass(frozen=True)
class Examples:
    """Data held in memory: one pooled batch of every example (indexable, see
    :func:`degeneracy.data.pool_batches`) when the batches line up, and the batches themselves.

    >>> Examples(Batch(torch.zeros(4, 2)), []).num_examples
    4
    """

    pooled: Batch | None
    batches: list[Batch]

    @property
    def num_examples(self) -> int:
        """n, the number of examples."""
        if self.pooled is not None:
            return self.pooled.size
        return sum(b.size for b in self.batches)

    def num_batches(self, batch_size: int | None) -> int:
        """How many distinct minibatches a pass over the data gives.

        >>> Examples(Batch(torch.zeros(10, 2)), []).num_batches(3)
        3
        """
        if self.pooled is not None:
            n = self.pooled.size
            return 1 if batch_size is None or batch_size >= n else n // batch_size
        return sum(1 for b in self.batches for _ in b.split(batch_size))


def materialize(data: Any, device: torch.device, dtype: torch.dtype, *, explicit: bool = False) -> Examples:
    """Read ``data`` into memory on ``device``, with inputs under the run layer's dtype rule
    (:func:`degeneracy.run.cast_inputs`: floating inputs are cast to ``dtype`` when ``explicit``, else a
    floating input of another dtype is a ``ValueError``; integer inputs are left alone).

    >>> materialize(torch.ones(3, 2), torch.device("cpu"), torch.float32).num_examples
    3
    """
    batches = []
    for b in iter_batches(data):
        inputs = cast_inputs(b.inputs, dtype, explicit=explicit, device=device)
        extras = tuple(e.to(device) if isinstance(e, Tensor) else e for e in b.extras)
        batches.append(Batch(inputs, extras))
    return Examples(pool_batches(batches), batches)


def minibatches(examples: Examples, batch_size: int | None, seed: int) -> Callable[[], Iterator[Batch]]:
    """A factory of fresh, endless minibatch streams (the same order every time: it depends on
    ``seed`` only). Pooled data: a permutation per pass, minibatches of ``batch_size`` (the last partial
    one dropped); otherwise the batches (split to ``batch_size``) cycled in a fresh order per pass.

    >>> stream = minibatches(Examples(Batch(torch.arange(4.0)), []), 2, seed=0)()
    >>> [next(stream).size for _ in range(3)]
    [2, 2, 2]
    """
    pooled = examples.pooled
    if pooled is not None:
        n = pooled.size
        if batch_size is None or batch_size >= n:
            return lambda: itertools.repeat(pooled)
        size = batch_size

        def stream() -> Iterator[Batch]:
            generator = torch.Generator().manual_seed(seed_from(seed, 0xDA7A))
            while True:
                # one gather per pass, then every minibatch is a slice (a view)
                shuffled = pooled.index(torch.randperm(n, generator=generator).to(pooled.device))
                for start in range(0, n - size + 1, size):  # drop the last partial batch
                    yield shuffled.index(slice(start, start + size))

        return stream
    split = [part for b in examples.batches for part in b.split(batch_size)]
    return lambda: cycle_batches(split, seed)


def reference_outputs(model: nn.Module, batch: Batch, chunk: int = 4096) -> Tensor:
    """f_θ*(x) of every example of ``batch`` (detached), evaluated ``chunk`` examples at a time.

    >>> reference_outputs(torch.nn.Linear(2, 3), Batch(torch.ones(5, 2)), chunk=2).shape
    torch.Size([5, 3])
    """
    outs = []
    with torch.no_grad():
        for part in batch.split(chunk) if batch.indexable else [batch]:
            outs.append(run_model(model, part.inputs).detach())
    return torch.cat(outs)


class _LossModule(nn.Module):
    """Holds ``model`` so that ``functional_call`` can swap its parameters inside a user loss."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Batch], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: Batch) -> Tensor:
        return self._loss(self.model, batch)


def _custom_chain_loss(model: nn.Module, loss: Callable[[nn.Module, Batch], Tensor]) -> ChainLoss:
    wrapper = _LossModule(model, loss)

    def chain_loss(views: dict[str, Tensor], item: tuple[Batch, None]) -> Tensor:
        batch = item[0]

        def one_chain(params: dict[str, Tensor]) -> Tensor:
            return functional_call(wrapper, {f"model.{k}": v for k, v in params.items()}, args=(batch,))

        return vmap(one_chain)(views)

    return chain_loss


def _behavioral_batches(
    model: nn.Module, examples: Examples, batch_size: int | None, seed: int, chunk: int
) -> Callable[[], Iterator[tuple[Batch, Tensor]]]:
    """Stream factory of ``(batch, f_θ*(batch inputs))``; the reference outputs are computed once."""
    if examples.pooled is not None:
        pooled = examples.pooled
        indexed = Batch(pooled.inputs, (*pooled.extras, reference_outputs(model, pooled, chunk)))
        inner = minibatches(Examples(indexed, []), batch_size, seed)

        def pooled_stream() -> Iterator[tuple[Batch, Tensor]]:
            for b in inner():
                yield Batch(b.inputs, b.extras[:-1]), b.extras[-1]

        return pooled_stream
    make_batches = minibatches(examples, batch_size, seed)
    cache: dict[int, tuple[Batch, Tensor]] = {}

    def listed_stream() -> Iterator[tuple[Batch, Tensor]]:
        for b in make_batches():
            if id(b) not in cache:
                cache[id(b)] = (b, reference_outputs(model, b, chunk))
            yield cache[id(b)]

    return listed_stream


def _mean_loss(
    model: nn.Module, loss: Callable[[nn.Module, Batch], Tensor], examples: Examples, chunk: int
) -> float:
    """L(θ*): the example-weighted mean of ``loss`` over all the data."""
    total, count = 0.0, 0
    with torch.no_grad():
        for whole in [examples.pooled] if examples.pooled is not None else examples.batches:
            for part in whole.split(chunk):
                total += float(loss(model, part)) * part.size
                count += part.size
    return total / count


@dataclass(frozen=True)
class ModelLoss:
    """What the sampler needs about the loss of a model: the chain loss, a factory of batch streams
    (items as the chain loss takes them), L(θ*), the loss's name and the engine used.

    >>> spec = ModelLoss(lambda views, item: torch.zeros(1), lambda: iter([None]), 0.0, "zero", "vmap")
    >>> spec.name, spec.init_loss
    ('zero', 0.0)
    """

    chain_loss: ChainLoss
    batches: Callable[[], Iterator[Any]]
    init_loss: float
    name: str
    engine: str


def model_chain_loss(
    model: nn.Module,
    examples: Examples,
    layout: ParamLayout,
    center: Tensor,
    *,
    loss: LossSpec = "behavioral",
    engine: Engine = "auto",
    batch_size: int | None = None,
    seed: int = 0,
) -> ModelLoss:
    """The chain loss of ``model``'s parameters ``layout`` (θ* = ``center``) on ``examples``.

    For the behavioral loss the items are ``(batch, f_θ*(batch))`` and the loss of each chain is
    :func:`degeneracy.behavioral.behavioral_loss_from_outputs` of its outputs; ``engine="batched"``
    (or ``"auto"`` when it applies) uses :func:`~degeneracy.llc.batched.batched_behavioral_chain_loss`
    after checking that it reproduces the vmap path at perturbed parameters. A callable ``loss(model,
    batch)`` is vectorised with ``vmap`` (items ``(batch, None)``). ``model`` should be in eval mode.
    See the module docstring for an example.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1)).double()
    >>> chosen = select_parameters(model, None)
    >>> layout, center = ParamLayout.of(chosen), ParamLayout.of(chosen).flatten(chosen)
    >>> data = materialize(torch.ones(4, 2, dtype=torch.float64), torch.device("cpu"), torch.float64)
    >>> model_chain_loss(model, data, layout, center, loss="kl").engine
    'batched'
    """
    if engine not in ("auto", "vmap", "batched"):
        raise ValueError(f"unknown engine {engine!r}: use 'auto', 'vmap' or 'batched'")
    chunk = max(batch_size or 0, 4096)  # evaluation chunk (reference outputs, L(θ*))
    if not isinstance(loss, str):
        if engine == "batched":
            raise ValueError("engine='batched' needs the behavioral loss; use engine='vmap' or 'auto'")
        make_batches = minibatches(examples, batch_size, seed)

        def batches() -> Iterator[tuple[Batch, None]]:
            return ((b, None) for b in make_batches())

        name = getattr(loss, "__name__", "callable")
        init_loss = _mean_loss(model, loss, examples, chunk)
        return ModelLoss(_custom_chain_loss(model, loss), batches, init_loss, name, "vmap")
    kind = loss_kind(loss)
    stream = _behavioral_batches(model, examples, batch_size, seed, chunk)
    general = vmap_behavioral_chain_loss(model, kind)
    result = ModelLoss(general, stream, 0.0, f"behavioral-{kind}", "vmap")  # L_B(θ*|θ*) = 0 exactly
    if engine == "vmap":
        return result
    fast = batched_behavioral_chain_loss(model, list(layout.names), kind)
    if fast is None:
        if engine == "batched":
            raise ValueError(
                "engine='batched' needs every sampled parameter to be the weight or bias of an nn.Linear; "
                "use engine='vmap' or 'auto'"
            )
        return result
    if not chain_losses_agree(fast, general, layout, center, next(stream()), seed):
        if engine == "batched":
            raise ValueError(
                "engine='batched' does not reproduce the vmap path on this model (its forward does "
                "not treat leading dimensions as batch dimensions); use engine='vmap' or 'auto'"
            )
        return result
    return ModelLoss(fast, stream, 0.0, f"behavioral-{kind}", "batched")
