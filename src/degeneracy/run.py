"""The run layer: how every method runs a model on data.

One place for what bases, edges, ablations, the accounting and the LLC all need:

* **dtype and device policy** (one rule): computations run in the model's floating dtype on the
  model's device. Passing ``dtype=`` to a method casts a copy of the model *and* the floating inputs to
  that dtype. Without it, a floating input whose dtype differs from the model's is an error that says
  what to pass; integer inputs (token ids, masks) are never cast. Inputs are moved to the model's
  device; ``device=`` (:func:`resolve_device`) runs a copy of the model there (the caller's model is
  never moved).
* **sharding** under ``torch.distributed``: :func:`shard` gives this rank its share of the data.
* **running**: :func:`run_model` (a batch's inputs → the output tensor, optionally at one position),
  :func:`functional_output` (the same with parameters swapped in, for ``torch.func``), and
  :class:`ModelRun`, a model on a dataset with batches cast by the policy above and an activation cache
  shared by the passes of one computation.
* **flat parameters**: :class:`ParamLayout`, the order and shapes of the parameters in a flat vector
  θ ∈ R^P (``named_parameters`` order), with or without a leading chain dimension.

>>> import torch
>>> model = torch.nn.Linear(3, 2)
>>> run_model(model, torch.ones(4, 3)).shape
torch.Size([4, 2])
>>> ParamLayout.of_model(model).numel
8
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from degeneracy.checks import check_batches_alike, check_model_accepts, check_module, head
from degeneracy.data import Batch, call_model, iter_batches, num_examples
from degeneracy.distributed import is_distributed, world_size
from degeneracy.distributed import rank as this_rank
from degeneracy.progress import ExampleBar

__all__ = [
    "DTYPES",
    "ForwardFn",
    "resolve_dtype",
    "model_dtype",
    "model_device",
    "available_devices",
    "resolve_device",
    "cast_inputs",
    "shard",
    "DEFAULT_OUTPUTS",
    "OutputKey",
    "output_names",
    "full_precision",
    "select_output",
    "run_model",
    "functional_output",
    "ParamLayout",
    "parameters_and_buffers",
    "reference_parameters",
    "ModelRun",
]

ForwardFn = Callable[[nn.Module, Any], Any]
"""``forward(model, inputs)`` replacing ``model(inputs)``; it must read the parameters from ``model``."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name (``"float64"``) or itself; ``None`` stays ``None``.

    >>> resolve_dtype("float64")
    torch.float64
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")
    return DTYPES[dtype]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (torch's default dtype if it has none).

    >>> model_dtype(torch.nn.Linear(2, 2).double())
    torch.float64
    """
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU if it has none).

    >>> model_device(torch.nn.Linear(2, 2))
    device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def available_devices() -> list[str]:
    """The device names :func:`resolve_device` accepts here: ``"cpu"``, and ``"cuda"``,
    ``"cuda:0"`` … when CUDA is available (``"mps"`` on Apple GPUs).

    >>> available_devices()[0]
    'cpu'
    """
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """A device from its name (``"cpu"``, ``"cuda:1"``) or itself, checked to exist here; ``None``
    (the model's device) stays ``None``. ``"cuda"`` is the current CUDA device.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'tpu': use one of ['cpu'...] (or none: the model's device)
    """
    if device is None:
        return None
    valid = available_devices()
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        found = None
    if found is not None and found.type == "cpu":
        found = torch.device("cpu")  # "cpu:0" is the CPU too
    if found is None or str(found) not in valid:
        name = str(device)
        no_cuda = name.startswith("cuda") and not torch.cuda.is_available()
        why = "; CUDA is not available here" if no_cuda else ""
        raise ValueError(f"unknown device {name!r}: use one of {valid} (or none: the model's device){why}")
    if found.type == "cuda" and found.index is None:
        found = torch.device("cuda", torch.cuda.current_device())
    return found


def cast_inputs(
    inputs: Tensor | Mapping[str, Tensor],
    dtype: torch.dtype,
    *,
    explicit: bool,
    device: torch.device | None = None,
) -> Tensor | Mapping[str, Tensor]:
    """Apply the dtype policy to a batch's inputs and move them to ``device``.

    Floating inputs are cast to ``dtype`` when ``explicit`` (the caller asked for that dtype); otherwise
    a floating input in another dtype is a ``ValueError`` saying what to pass. Integer inputs (token ids,
    attention masks) are left alone.

    >>> cast_inputs(torch.ones(2, dtype=torch.float32), torch.float64, explicit=True).dtype
    torch.float64
    """

    def cast(x: Tensor, key: str) -> Tensor:
        if x.is_floating_point() and x.dtype != dtype:
            if not explicit:
                raise ValueError(
                    f"input {key} has dtype {x.dtype} but the model computes in {dtype}: pass inputs "
                    f"in {dtype}, or pass dtype={str(dtype).removeprefix('torch.')!r} to cast both"
                )
            x = x.to(dtype)
        return x if device is None else x.to(device)

    if isinstance(inputs, Mapping):
        return {k: cast(v, repr(k)) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return cast(inputs, "tensor")


def shard(data: Any) -> Any:
    """This process's share of ``data`` under ``torch.distributed`` (examples rank, rank + world, ...).

    Tensors and dicts of tensors are split here; any other iterable (a ``DataLoader``) is assumed to
    be sharded by the caller already (e.g. with a ``DistributedSampler``). Without an initialised
    process group, ``data`` is returned unchanged.

    >>> shard(torch.arange(4)).tolist()  # one process: everything
    [0, 1, 2, 3]
    """
    if not is_distributed():
        return data
    rank, world = this_rank(), world_size()
    if isinstance(data, Tensor | Mapping) and num_examples(data) < world:
        raise ValueError(
            f"{num_examples(data)} examples cannot be split over {world} processes: give every rank at "
            "least one example (more data, or fewer processes)"
        )
    if isinstance(data, Tensor):
        return data[rank::world]
    if isinstance(data, Mapping):
        return {k: v[rank::world] for k, v in data.items()}
    return data


@contextmanager
def full_precision() -> Iterator[None]:
    """No TF32 inside the block: float32 matrix products and convolutions on CUDA stay float32.

    On Ampere and later GPUs torch may run float32 matmuls in TF32 (inputs rounded to a 10-bit
    mantissa), which changes float32 results and the float64 statistics accumulated from them; every
    heavy stage runs inside this block, which restores the previous settings on exit. It changes
    nothing on a CPU or in float64.

    >>> with full_precision():
    ...     torch.backends.cuda.matmul.allow_tf32
    False
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# --------------------------------------------------------------------------------------------------
# running a model


DEFAULT_OUTPUTS = ("logits", "last_hidden_state")
"""The named model outputs :func:`select_output` prefers, in order (then the first tensor)."""

OutputKey = str | int | None


def output_names(output: Any) -> list[str | int]:
    """The names (dict / ``ModelOutput`` keys) or indices (tuple) of the tensors in a model output.

    >>> output_names({"pooled": torch.ones(2), "hidden": torch.ones(2, 3), "extra": None})
    ['pooled', 'hidden']
    >>> output_names((torch.ones(2), "cache", torch.ones(1)))
    [0, 2]
    """
    if isinstance(output, Tensor):
        return [0]
    if isinstance(output, Mapping):
        return [k for k, v in output.items() if isinstance(v, Tensor)]
    if isinstance(output, tuple | list):
        return [i for i, v in enumerate(output) if isinstance(v, Tensor)]
    return [k for k in DEFAULT_OUTPUTS if isinstance(getattr(output, k, None), Tensor)]


def _output_tensor(output: Any, key: OutputKey) -> Tensor:
    names = output_names(output)
    if key is None:
        preferred = [k for k in DEFAULT_OUTPUTS if k in names] if not isinstance(output, Tensor) else []
        key = preferred[0] if preferred else (names[0] if names else None)
        if key is None:
            raise TypeError(f"cannot find an output tensor in a model output of type {type(output).__name__}")
    names_from_end = [i - len(output) for i in names] if isinstance(output, tuple | list) else []
    if isinstance(output, Tensor):
        if key in (0, -1):
            return output
    elif key in names or key in names_from_end:
        indexable = isinstance(output, Mapping | tuple | list)
        value = output[key] if indexable else getattr(output, key)  # type: ignore[index,arg-type]
        if isinstance(value, Tensor):
            return value
    raise ValueError(
        f"the model output ({type(output).__name__}) has no tensor {key!r}: choose output= from {names}"
    )


def select_output(output: Any, positions: int | None = None, *, key: OutputKey = None) -> Tensor:
    """The output tensor of a model call, restricted to one position when ``positions`` is an int.

    ``key`` names the output to analyse: a key of a dict or Hugging Face ``ModelOutput``, or an index
    of a tuple. By default: ``logits`` if present, else ``last_hidden_state`` (:data:`DEFAULT_OUTPUTS`),
    else the first tensor. An unknown ``key`` is a ``ValueError`` listing the available ones.
    ``positions`` applies to outputs of shape ``(batch, pos, d)`` (the position axis is dropped);
    ``None`` keeps every position.

    >>> select_output(torch.zeros(2, 5, 3), positions=-1).shape
    torch.Size([2, 3])
    >>> out = {"last_hidden_state": torch.zeros(2, 5, 3), "pooler_output": torch.ones(2, 3)}
    >>> select_output(out).shape, select_output(out, key="pooler_output").shape
    (torch.Size([2, 5, 3]), torch.Size([2, 3]))
    """
    out = _output_tensor(output, key)
    if positions is not None:
        if out.dim() < 3:
            raise ValueError(
                f"positions={positions} needs a (batch, pos, d) output, but the model output has shape "
                f"{tuple(out.shape)}; leave positions=None"
            )
        out = out[:, positions]
    return out


def run_model(
    model: nn.Module,
    inputs: Any,
    *,
    forward: ForwardFn | None = None,
    positions: int | None = None,
    output: OutputKey = None,
) -> Tensor:
    """``f(x)`` for a batch of inputs, as ``(batch, ...)`` (every position unless ``positions`` is set;
    ``output`` names the model output as in :func:`select_output`).

    >>> run_model(torch.nn.Linear(3, 2), torch.ones(4, 3)).shape
    torch.Size([4, 2])
    """
    result = forward(model, inputs) if forward is not None else call_model(model, inputs)
    return select_output(result, positions, key=output)


class _Caller(nn.Module):
    """Wraps ``model`` so that :func:`torch.func.functional_call` can run a user ``forward`` on it."""

    def __init__(self, inner: nn.Module, forward: ForwardFn | None) -> None:
        super().__init__()
        self.inner = inner
        self._forward_fn = forward

    def forward(self, inputs: Any) -> Any:
        if self._forward_fn is not None:
            return self._forward_fn(self.inner, inputs)
        return call_model(self.inner, inputs)


def functional_output(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    inputs: Any,
    *,
    forward: ForwardFn | None = None,
    positions: int | None = None,
    output: OutputKey = None,
) -> Tensor:
    """f(x) with ``model``'s parameters/buffers replaced by ``tensors`` (a name → tensor map).

    Tensors not named keep the model's own values; dict inputs are passed as keywords. Works under
    ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``).

    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> functional_output(model, {"weight": torch.ones(1, 2)}, torch.ones(3, 2)).flatten().tolist()
    [2.0, 2.0, 2.0]
    """
    caller = _Caller(model, forward)
    prefixed = {f"inner.{k}": v for k, v in tensors.items()}
    result = torch.func.functional_call(caller, prefixed, (inputs,), strict=False)
    return select_output(result, positions, key=output)


# --------------------------------------------------------------------------------------------------
# flat parameters


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of parameters, and their order in a flat vector θ ∈ R^P.

    >>> layout = ParamLayout.of_model(torch.nn.Linear(3, 2))
    >>> layout.names, layout.numel, layout.slice("bias")
    (('weight', 'bias'), 8, slice(6, 8, None))
    >>> layout.unflatten(torch.arange(8.0))["bias"].tolist()
    [6.0, 7.0]
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> ParamLayout:
        """The layout of a name → tensor mapping, in its order."""
        if not params:
            raise ValueError("no parameters to lay out: the model has no (selected) parameters")
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @classmethod
    def of_model(cls, model: nn.Module) -> ParamLayout:
        """The layout of ``model.named_parameters()`` (all of them, in that order)."""
        return cls.of(dict(model.named_parameters()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in θ, then P."""
        out = [0]
        for size in self.sizes:
            out.append(out[-1] + size)
        return tuple(out)

    @property
    def numel(self) -> int:
        """P, the number of parameters."""
        return sum(self.sizes)

    def slice(self, name: str) -> slice:
        """The entries of parameter ``name`` in θ."""
        i = self.names.index(name)
        offsets = self.offsets
        return slice(offsets[i], offsets[i + 1])

    def flatten(self, params: Mapping[str, Tensor]) -> Float[Tensor, " P"]:
        """Concatenate ``params`` (in layout order) into one vector (autograd graph kept)."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Float[Tensor, "*chain P"]) -> dict[str, Tensor]:
        """Views ``(*chain, *shape)`` of each parameter into ``flat`` (sharing its storage).

        ``flat`` is ``(P,)`` or has leading dimensions (e.g. chains: ``(C, P)``)."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.sizes, dim=-1)
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}


def parameters_and_buffers(
    model: nn.Module, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached copies of the parameters (cast to ``dtype``) and the buffers (floating ones cast too).

    >>> params, buffers = parameters_and_buffers(torch.nn.Linear(2, 2), torch.float64)
    >>> params["weight"].dtype, buffers
    (torch.float64, {})
    """
    params = {
        n: p.detach().to(dtype) if dtype is not None else p.detach() for n, p in model.named_parameters()
    }
    buffers = {
        n: b.to(dtype) if (dtype is not None and b.is_floating_point()) else b
        for n, b in model.named_buffers()
    }
    return params, buffers


def reference_parameters(model: nn.Module, reference: Any) -> dict[str, Tensor]:
    """θ* as a dict from a model, a ``state_dict``-like mapping or ``named_parameters`` pairs.

    >>> model = torch.nn.Linear(2, 1)
    >>> sorted(reference_parameters(model, model.state_dict()))
    ['bias', 'weight']
    """
    if isinstance(reference, nn.Module):
        ref = dict(reference.named_parameters())
    elif isinstance(reference, Mapping):
        ref = dict(reference)
    elif isinstance(reference, Sequence):
        ref = dict(reference)
    else:
        raise TypeError(
            "reference must be a model, a dict of parameters or (name, tensor) pairs, "
            f"not {type(reference).__name__}"
        )
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in ref]
    if missing:
        raise KeyError(f"reference lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {n: ref[n] for n in names}


# --------------------------------------------------------------------------------------------------
# a model on a dataset


CACHE_BYTES = 256 * 2**20
"""Activations a :class:`ModelRun` keeps between the passes of one computation."""


class ModelRun:
    """A model on a dataset, with the dtype/device policy applied and the data sharded by rank.

    Args:
        model: the network. With ``dtype`` given and different from the model's, a cast copy is used
            (the caller's model is never modified).
        data: any data :func:`degeneracy.data.iter_batches` reads; tensors and dicts are sharded
            under ``torch.distributed``.
        dtype: compute dtype (name or ``torch.dtype``); ``None``: the model's (floating inputs must
            match it).
        device: where to compute (:func:`resolve_device`): a copy of the model is moved there when
            the model is elsewhere; ``None``: the model's device.
        batch_size: split the data into batches of at most this many examples.
        cache: keep activations between passes (see :meth:`keep`), only for data that batches the same
            way every time (a tensor or a dict of tensors), up to ``CACHE_BYTES``.

    >>> run = ModelRun(torch.nn.Linear(3, 2), torch.ones(5, 3), batch_size=2)
    >>> [x.shape[0] for x in run.inputs()]
    [2, 2, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
        cache: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        check_module(model)
        wanted = resolve_dtype(dtype)
        self.explicit = wanted is not None
        self.dtype = wanted if wanted is not None else model_dtype(model)
        target = resolve_device(device) or model_device(model)
        if (self.explicit and model_dtype(model) != self.dtype) or target != model_device(model):
            model = copy.deepcopy(model)  # (one argument per .to: HookedTransformer.to takes no dtype=)
            model = model.to(self.dtype) if self.explicit else model
            model = model.to(target) if target != model_device(model) else model
        self.model = model
        self.device = model_device(model)
        self.data = shard(data)
        self.batch_size = batch_size
        self.n = num_examples(self.data)
        deterministic = isinstance(self.data, Tensor | Mapping)
        self.probe: Tensor | Mapping[str, Tensor] | None = None  # the first examples, cast, when known
        if deterministic and self.n:
            self.probe = cast_inputs(head(self.data), self.dtype, explicit=self.explicit, device=self.device)
            check_model_accepts(self.model, self.probe, full=self.data)  # a clear error now, not deep inside
        elif isinstance(self.data, list | tuple) and self.data:  # batches that can be read again
            check_batches_alike(iter_batches(self.data))
            first = next(iter_batches(self.data)).inputs
            probe = cast_inputs(head(first), self.dtype, explicit=self.explicit, device=self.device)
            check_model_accepts(self.model, probe, full=first)
        self._cache: dict[str, list[Tensor]] | None = {} if (cache and deterministic) else None
        self._bar: ExampleBar | None = None  # the bar of the batch last yielded (moved by within)

    def batches(self, desc: str = "", progress: bool = False, *, step: int | None = None) -> Iterator[Batch]:
        """The data as :class:`~degeneracy.data.Batch` es with cast inputs (extras moved to the device);
        with ``step``, each batch in pieces of at most ``step`` examples (the bar moves per piece)."""
        # quiet unless asked for, on rank 0, and stderr is a terminal; examples, with an ETA; the work on
        # a batch moves the bar within it (:meth:`within`)
        bar = ExampleBar(self.n, desc, progress)
        try:
            for batch in iter_batches(self.data, self.batch_size):
                inputs = cast_inputs(batch.inputs, self.dtype, explicit=self.explicit, device=self.device)
                extras = tuple(e.to(self.device) if isinstance(e, Tensor) else e for e in batch.extras)
                for piece in Batch(inputs, extras).split(step):
                    bar.begin(piece.size)
                    self._bar = bar
                    yield piece
                    bar.finish()
        finally:
            bar.close()

    def within(self, done: int, parts: int) -> None:
        """``done`` of ``parts`` equal parts of the work on the batch last yielded by :meth:`batches`
        are finished: its bar moves by that share of the batch's examples (:class:`ExampleBar`)."""
        if self._bar is not None:
            self._bar.within(done, parts)

    def inputs(self, desc: str = "", progress: bool = False) -> Iterator[Tensor | Mapping[str, Tensor]]:
        """The cast inputs of each batch."""
        for batch in self.batches(desc, progress):
            yield batch.inputs

    def materialize(self) -> list[Batch]:
        """Every batch, cast, as a list (for computations that read the data many times)."""
        return list(self.batches())

    def keep(self, acts: Mapping[str, Tensor]) -> None:
        """Add one batch's activations to the cache (dropped for good once over ``CACHE_BYTES``)."""
        if self._cache is None:
            return
        for name, x in acts.items():
            self._cache.setdefault(name, []).append(x)
        if sum(t.numel() * t.element_size() for v in self._cache.values() for t in v) > CACHE_BYTES:
            self._cache = None

    def cached(self, name: str, index: int) -> Tensor | None:
        """The activations of node layer ``name`` for batch ``index``, if kept."""
        if self._cache is None or name not in self._cache or index >= len(self._cache[name]):
            return None
        return self._cache[name][index]
