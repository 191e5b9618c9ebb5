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

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from degeneracy.behavioral import LossKind
from degeneracy.checks import check_model_accepts
from degeneracy.data import Batch, iter_batches, pool_batches
from degeneracy.llc.batched import (
    ChainForward,
    batched_behavioral_chain_loss,
    chain_batched_forward,
    chain_losses_agree,
    sequential_behavioral_chain_loss,
    vmap_behavioral_chain_loss,
)
from degeneracy.llc.diagnostics import LLCWarning
from degeneracy.llc.mlp import mlp_chain_loss
from degeneracy.llc.sgld import ChainLoss, cycle_batches, seed_from
from degeneracy.llc.transformer import transformer_chain_forward
from degeneracy.llc.user_loss import (
    LABEL_KEYS,
    SUPERVISED,
    Form,
    UserLoss,
    batched_user_chain_loss,
    builtin_as_user_loss,
    labels_of,
    loss_name,
    user_chain_loss,
    user_item,
)
from degeneracy.run import ParamLayout, cast_inputs, run_model

__all__ = [
    "LossSpec",
    "Engine",
    "ENGINES",
    "resolve_loss",
    "Examples",
    "ModelLoss",
    "loss_kind",
    "select_parameters",
    "materialize",
    "minibatches",
    "reference_outputs",
    "model_chain_loss",
]

LossSpec = Literal["behavioral", "mse", "kl", "cross_entropy"] | Callable[[nn.Module, Any], Tensor]
Engine = Literal["auto", "vmap", "batched", "sequential"]
ENGINES = ("auto", "vmap", "batched", "sequential")


def loss_kind(loss: str) -> LossKind:
    """The behavioral loss kind a ``loss=`` name selects (``"behavioral"`` is ``"mse"``).

    >>> loss_kind("behavioral"), loss_kind("kl")
    ('mse', 'kl')
    """
    if loss in ("behavioral", "mse"):
        return "mse"
    if loss == "kl":
        return "kl"
    if loss in SUPERVISED:
        raise ValueError(
            f"loss={loss!r} needs labels and SGLD (estimate_llc, llc_curve, effective_parameter_count with "
            "method='sgld'); this path takes the behavioral loss only: 'behavioral' or 'kl'"
        )
    raise ValueError(
        f"unknown loss {loss!r}: use 'behavioral', 'kl', 'cross_entropy', 'mse' or a callable "
        "loss(model, batch)"
    )


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

    ``form`` is how the data yield a batch (:data:`~degeneracy.llc.user_loss.Form`, what a user loss
    receives) and ``per_step`` whether the data were batches (an iterable: with ``batch_size=None`` every
    step takes the next one) rather than one dataset (tensor, dict, tuple/list of tensors: the full batch).

    >>> Examples(Batch(torch.zeros(4, 2)), []).num_examples
    4
    """

    pooled: Batch | None
    batches: list[Batch]
    form: Form = "tensor"
    per_step: bool = False

    @property
    def num_examples(self) -> int:
        """n, the number of examples."""
        if self.pooled is not None:
            return self.pooled.size
        return sum(b.size for b in self.batches)

    @property
    def has_labels(self) -> bool:
        """Whether the batches carry labels (a tuple/list batch beyond its inputs, a dict's ``"labels"``).

        >>> Examples(Batch(torch.zeros(4, 2), (torch.zeros(4),)), [], "tuple").has_labels
        True
        """
        first = self.pooled if self.pooled is not None else self.batches[0]
        if self.form == "mapping":
            return any(k in first.inputs for k in LABEL_KEYS)
        return len(first.extras) > 0

    def num_batches(self, batch_size: int | None) -> int:
        """How many distinct minibatches a pass over the data gives.

        >>> Examples(Batch(torch.zeros(10, 2)), []).num_batches(3)
        3
        """
        if self.per_step and batch_size is None:
            return len(self.batches)
        if self.pooled is not None:
            n = self.pooled.size
            return 1 if batch_size is None or batch_size >= n else n // batch_size
        return sum(1 for b in self.batches for _ in b.split(batch_size))


def _form_of(item: Any) -> Form:
    if isinstance(item, Batch):
        return "batch"
    if isinstance(item, Tensor):
        return "tensor"
    if isinstance(item, Mapping):
        return "mapping"
    if isinstance(item, list):
        return "list"
    return "tuple"


def _read(data: Any) -> tuple[list[Batch], Form, bool]:
    """(batches, form, per_step) of the user's ``data`` (see :func:`materialize`)."""
    if isinstance(data, Tensor | Mapping):
        return list(iter_batches(data)), _form_of(data), False
    if isinstance(data, tuple | list) and data and all(isinstance(t, Tensor) for t in data):
        lengths = [int(t.shape[0]) if t.dim() > 0 else None for t in data]
        if None in lengths or len(set(lengths)) != 1:
            raise ValueError(
                f"data is a {type(data).__name__} of tensors, read as one dataset (inputs, labels, ...) "
                f"whose tensors need one entry per example, but their lengths are {lengths}; to pass "
                "batches give an iterable of them (a DataLoader, or iter(list_of_batches))"
            )
        if lengths[0] == 0:
            raise ValueError("data is empty: it holds 0 examples")
        return [Batch(data[0], tuple(data[1:]))], _form_of(data), False
    if isinstance(data, Tensor | Mapping | Iterable) and not isinstance(data, str):
        batches, forms = [], set()
        for item in data:
            forms.add(_form_of(item))
            batches.extend(iter_batches([item]))
        if not batches:
            raise ValueError("data is empty: the iterable yielded no examples")
        if len(forms) > 1:
            raise ValueError(f"the data's batches come in several forms {sorted(forms)}: give them all alike")
        return batches, forms.pop(), True
    raise TypeError(
        f"data of type {type(data).__name__} is neither a tensor, a dict, a tuple/list of tensors nor an "
        "iterable of batches"
    )


def materialize(data: Any, device: torch.device, dtype: torch.dtype, *, explicit: bool = False) -> Examples:
    """Read ``data`` into memory on ``device``, with inputs under the run layer's dtype rule
    (:func:`degeneracy.run.cast_inputs`: floating inputs are cast to ``dtype`` when ``explicit``, else a
    floating input of another dtype is a ``ValueError``; integer inputs are left alone).

    ``data`` is one dataset — a tensor of inputs, a dict of tensors, or a tuple/list of equal-length
    tensors ``(inputs, labels, ...)`` — or batches: any other iterable (a ``DataLoader``, a generator, a
    list of tuples ``(inputs, labels)``), each batch a tensor, a dict or a tuple/list.

    >>> materialize(torch.ones(3, 2), torch.device("cpu"), torch.float32).num_examples
    3
    >>> both = materialize((torch.ones(3, 2), torch.arange(3)), torch.device("cpu"), torch.float32)
    >>> both.form, both.num_examples, both.per_step
    ('tuple', 3, False)
    """
    raw, form, per_step = _read(data)
    batches = []
    for b in raw:
        inputs = cast_inputs(b.inputs, dtype, explicit=explicit, device=device)
        extras = tuple(e.to(device) if isinstance(e, Tensor) else e for e in b.extras)
        batches.append(Batch(inputs, extras))
    return Examples(pool_batches(batches), batches, form, per_step)


def minibatches(examples: Examples, batch_size: int | None, seed: int) -> Callable[[], Iterator[Batch]]:
    """A factory of fresh, endless minibatch streams (the same order every time: it depends on
    ``seed`` only). Batches given as an iterable with ``batch_size=None``: those batches, cycled in a
    fresh order per pass. Pooled data: the full batch (``batch_size=None``), else a permutation per pass
    and minibatches of ``batch_size`` (the last partial one dropped), indexed on the data's device;
    otherwise the batches split to ``batch_size`` and cycled in a fresh order per pass.

    >>> stream = minibatches(Examples(Batch(torch.arange(4.0)), []), 2, seed=0)()
    >>> [next(stream).size for _ in range(3)]
    [2, 2, 2]
    """
    pooled = examples.pooled
    if examples.per_step and batch_size is None:
        listed = list(examples.batches)
        return lambda: cycle_batches(listed, seed)
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


def _behavioral_batches(
    model: nn.Module, examples: Examples, batch_size: int | None, seed: int, chunk: int
) -> Callable[[], Iterator[tuple[Batch, Tensor]]]:
    """Stream factory of ``(batch, f_θ*(batch inputs))``; the reference outputs are computed once.
    Batches given as an iterable are used one per step with ``batch_size=None``, as for every loss."""
    if examples.pooled is not None and not (examples.per_step and batch_size is None):
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


def _mean_loss(model: nn.Module, loss: UserLoss, examples: Examples, form: Form, chunk: int) -> float:
    """L(θ*): the example-weighted mean of ``loss`` over all the data (a clear error when the loss fails
    or does not return a scalar tensor)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for whole in [examples.pooled] if examples.pooled is not None else examples.batches:
            for part in whole.split(chunk):
                value = loss(model, user_item(part, form))
                if not isinstance(value, Tensor) or value.numel() != 1:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise TypeError(
                        f"loss(model, batch) must return a scalar tensor (the mean loss of the batch), got "
                        f"{got}"
                    )
                total += float(value) * part.size
                count += part.size
    return total / count


def _is_legacy(loss: UserLoss) -> bool:
    """A loss annotated to take a :class:`~degeneracy.data.Batch` (the former signature)."""
    try:
        hints = [p.annotation for p in inspect.signature(loss).parameters.values()]
    except (TypeError, ValueError):
        return False
    return len(hints) >= 2 and (hints[1] is Batch or hints[1] == "Batch")


def _user_init_loss(model: nn.Module, loss: UserLoss, examples: Examples, chunk: int) -> tuple[float, Form]:
    """L(θ*) and the form the loss takes its batches in: the data's own, or (deprecated) a ``Batch`` for
    losses written against ``batch.inputs`` / ``batch.extras``."""
    if not _is_legacy(loss):
        try:
            return _mean_loss(model, loss, examples, examples.form, chunk), examples.form
        except AttributeError as error:
            if not any(word in str(error) for word in ("inputs", "extras")):
                raise
    warnings.warn(
        "the LLC loss takes the batch as the data yield it, e.g. (X, y): write loss(model, batch) with "
        "x, y = batch; a loss reading batch.inputs / batch.extras (a degeneracy.data.Batch) is deprecated",
        DeprecationWarning,
        stacklevel=5,
    )
    return _mean_loss(model, loss, examples, "batch", chunk), "batch"


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
    details: Mapping[str, Any] = field(default_factory=dict)
    """What the engine records besides its name (``{"backward": "manual"}``: :mod:`degeneracy.llc.mlp`)."""


def resolve_loss(loss: LossSpec | None, examples: Examples) -> LossSpec:
    """What ``loss=`` means on these data: ``None`` is the behavioral loss (with an
    :class:`~degeneracy.llc.diagnostics.LLCWarning` when the data carry labels, whose training loss is
    another number), ``"mse"`` on data without labels is the behavioral loss (deprecated alias).

    >>> resolve_loss(None, Examples(Batch(torch.zeros(3, 2)), []))
    'behavioral'
    """
    if loss is None:
        if examples.has_labels:
            warnings.warn(
                "estimate_llc: no loss= given and the data carry labels: estimating the behavioral loss "
                "E‖f_θ(x) − f_θ*(x)‖² (the LLC of the model's function, which can be far from that of its "
                "training loss); pass loss='behavioral' to keep it, or loss='cross_entropy', 'mse' or "
                "loss(model, batch) for the training loss (what devinterp estimates)",
                LLCWarning,
                stacklevel=4,
            )
        return "behavioral"
    if loss == "mse" and not examples.has_labels:
        warnings.warn(
            "loss='mse' on data without labels is the behavioral loss, a deprecated alias: write "
            "loss='behavioral' ('mse' is the mean squared error against the labels of (inputs, labels) data)",
            DeprecationWarning,
            stacklevel=4,
        )
        return "behavioral"
    return loss


def _all_labels(examples: Examples) -> list[Tensor]:
    """The labels of every example (empty when the data carry none that are tensors)."""
    found = []
    for batch in [examples.pooled] if examples.pooled is not None else examples.batches:
        try:
            labels = labels_of(batch, examples.form)
        except ValueError:
            return []
        found.append(labels)
    return found


def _stream_items(make: Callable[[], Iterator[Batch]]) -> Callable[[], Iterator[tuple[Batch, None]]]:
    return lambda: ((b, None) for b in make())


def _vmap_failure(chain_loss: ChainLoss, layout: ParamLayout, center: Tensor, item: Any) -> str | None:
    """Why ``chain_loss`` fails on two chains at θ* (its loss and gradient), or ``None``."""
    theta = center.detach().unsqueeze(0).expand(2, -1).clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            torch.autograd.grad(chain_loss(layout.unflatten(theta), item).sum(), theta, allow_unused=True)
    except Exception as error:  # noqa: BLE001 - any failure means: not vmappable
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def _vmappable_or_sequential(
    result: ModelLoss, sequential: ModelLoss, layout: ParamLayout, center: Tensor
) -> ModelLoss:
    """``result`` (the vmap path of the behavioral loss) when ``vmap`` runs the model, else ``sequential``
    with a warning (a model with operations that have no batching rule: ``nn.GRU``, ``nn.LSTM``, ...)."""
    failure = _vmap_failure(result.chain_loss, layout, center, next(result.batches()))
    if failure is None:
        return result
    warnings.warn(
        f"the model cannot be vectorised over chains with torch.func.vmap ({failure}); the chains' "
        "behavioral losses are evaluated one after another (engine='sequential', slower)",
        LLCWarning,
        stacklevel=5,
    )
    return sequential


def _chain_forward(model: nn.Module, layout: ParamLayout, inputs: Any) -> ChainForward | None:
    """All chains' outputs in plain batched ops: the copy with chain-batched ``nn.Linear`` layers, else
    the TransformerLens forward of :mod:`degeneracy.llc.transformer`, else (or non-tensor inputs) ``None``."""
    if not isinstance(inputs, Tensor):
        return None
    sampled = list(layout.names)
    return chain_batched_forward(model, sampled) or transformer_chain_forward(model, sampled)


def _labelled_chain_loss(
    model: nn.Module,
    examples: Examples,
    layout: ParamLayout,
    center: Tensor,
    loss: str | UserLoss,
    engine: Engine,
    batch_size: int | None,
    seed: int,
    chunk: int,
) -> ModelLoss:
    """A built-in supervised loss or a user ``loss(model, batch)``: the batched engine when it applies
    and reproduces the loss chain by chain, else vmap, else (not vmappable) one chain after another."""
    batches = _stream_items(minibatches(examples, batch_size, seed))
    if isinstance(loss, str):
        form, user, name = examples.form, builtin_as_user_loss(loss, examples.form), loss
        init_loss = _mean_loss(model, user, examples, form, chunk)
    else:
        user, name = loss, loss_name(loss)
        init_loss, form = _user_init_loss(model, loss, examples, chunk)
    first = next(batches())
    sequential = user_chain_loss(model, user, form, "sequential")
    if engine in ("auto", "batched"):
        forward = _chain_forward(model, layout, first[0].inputs)
        if forward is not None:
            fast = batched_user_chain_loss(forward, loss if isinstance(loss, str) else user, form)
            if chain_losses_agree(fast, sequential, layout, center, first, seed):
                if not isinstance(loss, str):  # vmappable (checked above): run it chain by chain, faster
                    fast = batched_user_chain_loss(forward, user, form, "loop")
                stream = batches()
                items = [first, *(next(stream) for _ in range(min(2, examples.num_batches(batch_size) - 1)))]
                manual = mlp_chain_loss(
                    model, layout, center, fast, loss, form, items, _all_labels(examples), seed
                )
                if manual is not None:
                    return ModelLoss(manual[0], batches, init_loss, name, "batched", manual[1])
                return ModelLoss(fast, batches, init_loss, name, "batched")
        if engine == "batched":
            raise ValueError(
                "engine='batched' needs every sampled parameter to be the weight or bias of an nn.Linear, "
                "tensor inputs, a forward that treats leading dimensions as batch dimensions and a loss that "
                "calls the model once on the batch's inputs; use engine='vmap' or 'auto'"
            )
    if engine in ("auto", "vmap"):
        general = user_chain_loss(model, user, form, "vmap")
        failure = _vmap_failure(general, layout, center, first)
        if failure is None:
            return ModelLoss(general, batches, init_loss, name, "vmap")
        warnings.warn(
            f"the loss cannot be vectorised over chains with torch.func.vmap ({failure}); the chains' "
            "losses are evaluated one after another (engine='sequential', slower). To vectorise, keep the "
            "loss free of .item(), Python branches on tensor values and in-place changes of its inputs",
            LLCWarning,
            stacklevel=4,
        )
    return ModelLoss(sequential, batches, init_loss, name, "sequential")


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
    after checking that it reproduces the vmap path at perturbed parameters. ``"cross_entropy"``,
    ``"mse"`` (labels from the batch) and a callable ``loss(model, batch)`` (``batch`` as the data yield
    it) take items ``(batch, None)``: batched engine when it applies and agrees, else vmap, else
    ``"sequential"`` (:mod:`degeneracy.llc.user_loss`). ``model`` should be in eval mode.
    See the module docstring for an example.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1)).double()
    >>> chosen = select_parameters(model, None)
    >>> layout, center = ParamLayout.of(chosen), ParamLayout.of(chosen).flatten(chosen)
    >>> data = materialize(torch.ones(4, 2, dtype=torch.float64), torch.device("cpu"), torch.float64)
    >>> model_chain_loss(model, data, layout, center, loss="kl").engine
    'batched'
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {ENGINES}")
    first = examples.pooled if examples.pooled is not None else examples.batches[0]
    if isinstance(loss, str) and (loss not in SUPERVISED or isinstance(first.inputs, Tensor)):
        check_model_accepts(model, first.inputs)  # a clear error now (a user's loss calls the model itself)
    chunk = max(batch_size or 0, 4096)  # evaluation chunk (reference outputs, L(θ*))
    if not isinstance(loss, str) or loss in SUPERVISED:
        return _labelled_chain_loss(model, examples, layout, center, loss, engine, batch_size, seed, chunk)
    kind = loss_kind(loss)
    stream = _behavioral_batches(model, examples, batch_size, seed, chunk)
    sequential = ModelLoss(
        sequential_behavioral_chain_loss(model, kind), stream, 0.0, f"behavioral-{kind}", "sequential"
    )
    if engine == "sequential":
        return sequential
    general = vmap_behavioral_chain_loss(model, kind)
    result = ModelLoss(general, stream, 0.0, f"behavioral-{kind}", "vmap")  # L_B(θ*|θ*) = 0 exactly
    if engine == "vmap":
        return _vmappable_or_sequential(result, sequential, layout, center)
    forward = _chain_forward(model, layout, first.inputs)
    sampled = list(layout.names)
    fast = None if forward is None else batched_behavioral_chain_loss(model, sampled, kind, forward)
    if fast is None:
        if engine == "batched":
            raise ValueError(
                "engine='batched' needs every sampled parameter to be the weight or bias of an nn.Linear "
                "(or a plain TransformerLens model, degeneracy.llc.transformer); use engine='vmap' or 'auto'"
            )
        return _vmappable_or_sequential(result, sequential, layout, center)
    if not chain_losses_agree(fast, general, layout, center, next(stream()), seed):
        if engine == "batched":
            raise ValueError(
                "engine='batched' does not reproduce the vmap path on this model (its forward does "
                "not treat leading dimensions as batch dimensions); use engine='vmap' or 'auto'"
            )
        return result
    first_item = next(stream())
    manual = mlp_chain_loss(
        model, layout, center, fast, f"behavioral-{kind}", examples.form, [first_item], [], seed
    )
    if manual is not None:
        return ModelLoss(manual[0], stream, 0.0, f"behavioral-{kind}", "batched", manual[1])
    return ModelLoss(fast, stream, 0.0, f"behavioral-{kind}", "batched")
