"""The LLC estimator: SGLD around θ* on any loss, by default the behavioral loss (METHOD §6–7).

Two entry points share one sampler (:func:`degeneracy.llc.sgld.run_sgld_chains`):

* :func:`sample_sgld` — functional: a loss of a parameter tensor (or dict of tensors) and a batch,
  for model-free problems (monomials, quadratics, ...) whose answer is known;
* :func:`estimate_llc` — for an ``nn.Module`` and data in the :mod:`degeneracy.data` convention;
  ``loss="behavioral"`` (default) is L_B(θ|θ*) = E ‖f_θ(x) − f_θ*(x)‖², ``"kl"`` its classifier form,
  or any ``loss(model, batch) -> scalar tensor``.

Both return an :class:`~degeneracy.llc.result.LLCResult` with λ̂ = nβ (E_chains[L] − L(θ*)).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from degeneracy.data import Batch, call_model, iter_batches, model_output_tensor
from degeneracy.llc.batched import (
    batched_behavioral_chain_loss,
    chain_losses_agree,
    vmap_behavioral_chain_loss,
)
from degeneracy.llc.diagnostics import DIVERGENCE_FACTOR
from degeneracy.llc.losses import BehavioralKind
from degeneracy.llc.result import LLCResult, summarize_chains
from degeneracy.llc.sgld import (
    ChainLoss,
    ChainRun,
    ParamLayout,
    SGLDConfig,
    _seed_from,
    cycle_batches,
    default_threads,
    intra_op_threads,
    max_curvature,
    run_mala_chains,
    run_sgld_chains,
)

__all__ = ["LLCWarning", "sample_sgld", "estimate_llc", "auto_step_size", "AUTO_STEP_FACTOR", "LossSpec"]

AUTO_STEP_FACTOR = 0.1
"""``step_size="auto"`` uses η = AUTO_STEP_FACTOR / (nβ h_max + γ), h_max the largest Hessian eigenvalue
of the loss at θ*: the stiffest direction's variance is then inflated by 1/(1 − 0.1/4) ≈ 2.6 %."""

LossSpec = Literal["behavioral", "mse", "kl"] | Callable[[nn.Module, Batch], Tensor]

Sampler = Literal["sgld", "mala"]


def _check_sampler(sampler: str, num_batches: int) -> None:
    if sampler not in ("sgld", "mala"):
        raise ValueError(f"unknown sampler {sampler!r}: use 'sgld' or 'mala'")
    if sampler == "mala" and num_batches > 1:
        raise ValueError(
            f"sampler='mala' needs the same loss at every step, but the data gives {num_batches} distinct "
            "batches (minibatching): the Metropolis correction is only exact for a deterministic loss; "
            "use the full batch (one batch, batch_size=None) or sampler='sgld'"
        )


def _sampler_extra(sampler: str, run: ChainRun) -> dict[str, Any]:
    """What the result's config records about the sampler (nothing for the default SGLD)."""
    if sampler == "sgld" or run.acceptance is None:
        return {}
    return {
        "sampler": sampler,
        "acceptance": float(run.acceptance.mean()),
        "chain_acceptance": [round(float(a), 6) for a in run.acceptance],
    }


class LLCWarning(UserWarning):
    """A diagnostic of an LLC estimate (bad chains, step size, stationarity, negative estimates)."""


def auto_step_size(nbeta: float, localization: float, curvature: float) -> float:
    """η = AUTO_STEP_FACTOR / (nβ h_max + γ)."""
    stiffness = nbeta * curvature + localization
    if not (math.isfinite(stiffness) and stiffness > 0):
        raise ValueError(
            f"cannot choose a step size automatically: nβ h_max + γ = {stiffness:.3g} (the loss is flat "
            "at θ* and localization is 0); pass step_size explicitly"
        )
    return AUTO_STEP_FACTOR / stiffness


def _config(
    chain_loss: Any,
    layout: Any,
    center: Tensor,
    first_item: Any,
    nbeta: float,
    localization: float,
    step_size: float | str,
    num_chains: int,
    num_draws: int,
    num_burnin: int,
    thinning: int,
    seed: int,
) -> tuple[SGLDConfig, float]:
    """The sampler settings, with ``step_size="auto"`` resolved at θ* on the first batch, and the
    largest curvature of the loss there (for the step-size stability check)."""
    curvature = max_curvature(chain_loss, layout, center, first_item, seed=seed)
    if step_size == "auto":
        step_size = auto_step_size(nbeta, localization, curvature)
    config = SGLDConfig(
        nbeta=float(nbeta),
        localization=float(localization),
        step_size=float(step_size),
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin=num_burnin,
        thinning=thinning,
        seed=seed,
    )
    return config, curvature


def _run(
    chain_loss: ChainLoss,
    layout: ParamLayout,
    center: Tensor,
    make_batches: Callable[[], Iterator[Any]],
    config: SGLDConfig,
    vectorize: bool,
    progress: bool,
    threads: int | None = None,
    sampler: str = "sgld",
) -> ChainRun:
    if threads is None:
        threads = default_threads(config.num_chains if vectorize else 1, layout.numel)
    with intra_op_threads(threads):
        return _run_chains(chain_loss, layout, center, make_batches, config, vectorize, progress, sampler)


def _run_chains(
    chain_loss: ChainLoss,
    layout: ParamLayout,
    center: Tensor,
    make_batches: Callable[[], Iterator[Any]],
    config: SGLDConfig,
    vectorize: bool,
    progress: bool,
    sampler: str = "sgld",
) -> ChainRun:
    def run(chain_ids: list[int] | None, desc: str) -> ChainRun:
        if sampler == "mala":  # the one batch (checked by the caller)
            batch = next(make_batches())
            return run_mala_chains(
                chain_loss, layout, center, batch, config, chain_ids=chain_ids, progress=progress, desc=desc
            )
        return run_sgld_chains(
            chain_loss,
            layout,
            center,
            make_batches(),
            config,
            chain_ids=chain_ids,
            progress=progress,
            desc=desc,
        )

    if vectorize:
        return run(None, sampler.upper())
    runs = [run([c], f"chain {c}") for c in range(config.num_chains)]
    acceptances = [r.acceptance for r in runs]
    return ChainRun(
        loss_traces=torch.cat([r.loss_traces for r in runs]),
        burnin_traces=torch.cat([r.burnin_traces for r in runs]),
        final_params=torch.cat([r.final_params for r in runs]),
        seconds=sum(r.seconds for r in runs),
        acceptance=None if any(a is None for a in acceptances) else torch.cat(acceptances),  # type: ignore[arg-type]
    )


def _finish(result: LLCResult, warn: bool) -> LLCResult:
    if warn:
        for note in result.warnings:
            warnings.warn(note, LLCWarning, stacklevel=3)
    return result


def sample_sgld(
    loss_fn: Callable[[Any, Any], Tensor],
    init_params: Tensor | Mapping[str, Tensor],
    data: Sequence[Any] | None = None,
    *,
    nbeta: float,
    localization: float = 0.0,
    step_size: float | Literal["auto"] = "auto",
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin: int = 0,
    thinning: int = 1,
    seed: int = 0,
    init_loss: float | None = None,
    vectorize: bool = True,
    threads: int | None = None,
    progress: bool = False,
    divergence_factor: float = DIVERGENCE_FACTOR,
    warn: bool = True,
    sampler: Sampler = "sgld",
) -> LLCResult:
    """Estimate the LLC of ``loss_fn`` at ``init_params`` = θ* by SGLD (functional form).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, where ``params`` has the structure of
            ``init_params`` (one chain, no chain dimension) and ``batch`` is an item of ``data``
            (``None`` when ``data`` is ``None``). It is vectorised over chains with ``torch.func.vmap``,
            so it must not call ``.item()`` or branch on values.
        init_params: θ*, a tensor or a dict of tensors; their dtype and device are the sampler's.
        data: batches to cycle through (one per step, same for every chain, reshuffled every pass
            from ``seed``), or ``None`` for a loss without data.
        nbeta: inverse temperature nβ.
        localization: γ.
        step_size: η, or ``"auto"`` for :func:`auto_step_size` at θ* (first batch).
        num_chains, num_draws, num_burnin, thinning, seed: see :class:`~degeneracy.llc.sgld.SGLDConfig`.
        init_loss: L(θ*); default: the mean of ``loss_fn(θ*, b)`` over the batches.
        vectorize: run all chains in one vmapped step (``False``: one chain after another, same result).
        threads: torch intra-op threads while sampling; default: 1 for small problems
            (:func:`~degeneracy.llc.sgld.default_threads`), else torch's setting.
        progress: show a progress bar.
        divergence_factor: see :func:`~degeneracy.llc.diagnostics.find_bad_chains`.
        warn: emit the result's warnings as :class:`LLCWarning`.
        sampler: ``"sgld"`` (default; Euler–Maruyama Langevin, biased by O(η)) or ``"mala"``: the same
            Langevin proposal with a Metropolis–Hastings accept/reject step
            (:func:`~degeneracy.llc.sgld.run_mala_chains`), exact for any η but only for a deterministic
            loss, so ``data`` must be ``None`` or one batch (ValueError otherwise). The acceptance rate is
            recorded in ``result.config["acceptance"]`` (per chain: ``"chain_acceptance"``).
    """
    single_tensor = isinstance(init_params, Tensor)
    params = {"": init_params} if single_tensor else dict(init_params)
    if not params:
        raise ValueError("init_params is empty: nothing to sample")
    layout = ParamLayout.of(params)
    center = layout.flatten(params)

    def one_chain(p: dict[str, Tensor], batch: Any) -> Tensor:
        return loss_fn(p[""] if single_tensor else p, batch)

    def chain_loss(views: dict[str, Tensor], batch: Any) -> Tensor:
        return vmap(lambda p: one_chain(p, batch))(views)

    items: Sequence[Any] = [None] if data is None else list(data)
    if not items:
        raise ValueError("data is empty: give batches, or None for a loss without data")
    _check_sampler(sampler, len({id(b) for b in items}))

    if init_loss is None:
        with torch.no_grad():
            init_loss = float(sum(float(one_chain(params, b)) for b in items) / len(items))

    config, curvature = _config(
        chain_loss,
        layout,
        center,
        items[0],
        nbeta,
        localization,
        step_size,
        num_chains,
        num_draws,
        num_burnin,
        thinning,
        seed,
    )
    run = _run(
        chain_loss,
        layout,
        center,
        lambda: cycle_batches(items, seed),
        config,
        vectorize,
        progress,
        threads,
        sampler,
    )
    extra = {
        "loss": getattr(loss_fn, "__name__", "callable"),
        "num_batches": len(items),
        "vectorize": vectorize,
        **_sampler_extra(sampler, run),
    }
    result = summarize_chains(run, init_loss, config, layout.numel, extra, curvature, divergence_factor)
    return _finish(result, warn)


# --------------------------------------------------------------------------------------------------
# nn.Module path


@dataclass(frozen=True)
class _Examples:
    """Data held in memory: either one pooled batch of every example (indexable) or a list of batches."""

    pooled: Batch | None
    batches: list[Batch]

    @property
    def num_examples(self) -> int:
        if self.pooled is not None:
            return self.pooled.size
        return sum(b.size for b in self.batches)


def _index(batch: Batch, idx: Tensor | slice) -> Batch:
    if isinstance(batch.inputs, Mapping):
        inputs: Tensor | dict[str, Tensor] = {k: v[idx] for k, v in batch.inputs.items()}
    else:
        inputs = batch.inputs[idx]
    return Batch(inputs, tuple(e[idx] for e in batch.extras))


def _pool(batches: list[Batch]) -> Batch | None:
    """Concatenate batches into one if their inputs and extras are tensors that line up, else None."""
    first = batches[0]
    if any(not isinstance(e, Tensor) or e.dim() == 0 or e.shape[0] != first.size for e in first.extras):
        return None
    for b in batches:
        if len(b.extras) != len(first.extras) or type(b.inputs) is not type(first.inputs):
            return None
        if any(not isinstance(e, Tensor) or e.dim() == 0 or e.shape[0] != b.size for e in b.extras):
            return None
        if isinstance(first.inputs, Mapping) and set(b.inputs) != set(first.inputs):  # type: ignore[arg-type]
            return None
    if len(batches) == 1:
        return first
    try:
        if isinstance(first.inputs, Mapping):
            inputs: Tensor | dict[str, Tensor] = {
                k: torch.cat([b.inputs[k] for b in batches])
                for k in first.inputs  # type: ignore[index]
            }
        else:
            inputs = torch.cat([b.inputs for b in batches])  # type: ignore[misc]
        extras = tuple(torch.cat([b.extras[i] for b in batches]) for i in range(len(first.extras)))
    except (RuntimeError, TypeError):
        return None
    return Batch(inputs, extras)


def _materialize(data: Any, device: torch.device) -> _Examples:
    batches = [b.to(device) for b in iter_batches(data)]
    return _Examples(_pool(batches), batches)


def _minibatches(examples: _Examples, batch_size: int | None, seed: int) -> Callable[[], Iterator[Batch]]:
    """A factory of fresh minibatch streams (same order every time: it depends on ``seed`` only)."""
    pooled = examples.pooled
    if pooled is not None:
        n = pooled.size
        if batch_size is None or batch_size >= n:
            return lambda: itertools.repeat(pooled)

        def stream() -> Iterator[Batch]:
            generator = torch.Generator().manual_seed(_seed_from(seed, 0xDA7A))
            while True:
                # one gather per pass, then every minibatch is a slice (a view)
                shuffled = _index(pooled, torch.randperm(n, generator=generator).to(_device_of(pooled)))
                for start in range(0, n - batch_size + 1, batch_size):  # drop the last partial batch
                    yield _index(shuffled, slice(start, start + batch_size))

        return stream
    split = [part for b in examples.batches for part in _split_batch(b, batch_size)]
    return lambda: cycle_batches(split, seed)


def _split_batch(batch: Batch, size: int | None) -> Iterator[Batch]:
    """Split ``batch`` into pieces of at most ``size`` examples (extras split alongside when they are
    tensors of the batch's length; a batch whose extras cannot be split is kept whole)."""
    n = batch.size
    splittable = all(isinstance(e, Tensor) and e.dim() > 0 and e.shape[0] == n for e in batch.extras)
    if size is None or n <= size or not splittable:
        yield batch
        return
    for start in range(0, n, size):
        yield _index(batch, slice(start, start + size))


def _device_of(batch: Batch) -> torch.device:
    inputs = batch.inputs
    tensor = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return tensor.device


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


def _select_params(
    model: nn.Module, params: Sequence[str] | Callable[[str], bool] | None
) -> dict[str, Tensor]:
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


def _reference_outputs(model: nn.Module, batch: Batch, chunk: int) -> Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, batch.size, chunk):
            part = _index(batch, slice(start, start + chunk))
            outs.append(model_output_tensor(call_model(model, part.inputs)).detach())
    return torch.cat(outs)


def _behavioral_kind(loss: str) -> BehavioralKind:
    if loss in ("behavioral", "mse"):
        return "mse"
    if loss == "kl":
        return "kl"
    raise ValueError(f"unknown loss {loss!r}: use 'behavioral', 'kl' or a callable loss(model, batch)")


def _behavioral_engine(
    model: nn.Module, sampled: list[str], kind: BehavioralKind, engine: str
) -> tuple[ChainLoss, str]:
    if engine in ("auto", "batched"):
        fast = batched_behavioral_chain_loss(model, sampled, kind)
        if fast is not None:
            return fast, "batched"
        if engine == "batched":
            raise ValueError(
                "engine='batched' needs every sampled parameter to be the weight or bias of an nn.Linear; "
                "use engine='vmap' or 'auto'"
            )
    return vmap_behavioral_chain_loss(model, kind), "vmap"


def _behavioral_batches(
    model: nn.Module, examples: _Examples, batch_size: int | None, seed: int, chunk: int
) -> Callable[[], Iterator[tuple[Batch, Tensor]]]:
    """Stream factory of ``(batch, f_θ*(batch inputs))``; the reference outputs are computed once."""
    if examples.pooled is not None:
        pooled = examples.pooled
        indexed = Batch(pooled.inputs, (*pooled.extras, _reference_outputs(model, pooled, chunk)))
        inner = _minibatches(_Examples(indexed, []), batch_size, seed)

        def pooled_stream() -> Iterator[tuple[Batch, Tensor]]:
            for b in inner():
                yield Batch(b.inputs, b.extras[:-1]), b.extras[-1]

        return pooled_stream
    make_batches = _minibatches(examples, batch_size, seed)
    cache: dict[int, tuple[Batch, Tensor]] = {}

    def listed_stream() -> Iterator[tuple[Batch, Tensor]]:
        for b in make_batches():
            if id(b) not in cache:
                cache[id(b)] = (b, _reference_outputs(model, b, chunk))
            yield cache[id(b)]

    return listed_stream


def _mean_loss(
    model: nn.Module, loss: Callable[[nn.Module, Batch], Tensor], examples: _Examples, chunk: int
) -> float:
    """L(θ*): the example-weighted mean of ``loss`` over all the data."""
    total, count = 0.0, 0
    with torch.no_grad():
        for whole in [examples.pooled] if examples.pooled is not None else examples.batches:
            for part in _split_batch(whole, chunk):
                total += float(loss(model, part)) * part.size
                count += part.size
    return total / count


def estimate_llc(
    model: nn.Module,
    data: Any,
    *,
    loss: LossSpec = "behavioral",
    nbeta: float | None = None,
    localization: float = 100.0,
    step_size: float | Literal["auto"] = "auto",
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin: int = 100,
    thinning: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    vectorize: bool = True,
    engine: Literal["auto", "vmap", "batched"] = "auto",
    threads: int | None = None,
    progress: bool = False,
    divergence_factor: float = DIVERGENCE_FACTOR,
    warn: bool = True,
    sampler: Sampler = "sgld",
) -> LLCResult:
    """Estimate the local learning coefficient λ̂ of ``model`` at its current parameters θ*.

    λ̂ = nβ (E_SGLD[L] − L(θ*)) with SGLD on exp(−nβ L(θ) − γ/2 ‖θ − θ*‖²) (METHOD §7);
    N_eff = 2 λ̂ (paper eq 9) is ``result.n_eff``.

    Args:
        model: any ``nn.Module``; it is put in eval mode while sampling (restored after) and its
            parameters are not modified (chains run on ``torch.func.functional_call``).
        data: inputs in the :mod:`degeneracy.data` convention (tensor, dict of tensors, or iterable of
            batches / ``(inputs, labels, ...)`` tuples). They are held in memory.
        loss: ``"behavioral"`` (alias ``"mse"``): E ‖f_θ(x) − f_θ*(x)‖² summed over output features,
            averaged over examples and positions; ``"kl"``: E KL(softmax f_θ* ‖ softmax f_θ); or
            ``loss(model, batch) -> scalar`` (``batch`` a :class:`~degeneracy.data.Batch`), vectorised
            over chains with ``torch.func.vmap``.
        nbeta: nβ; default n / log n with n the number of examples (Watanabe's WBIC temperature).
        localization: γ.
        step_size: η, or ``"auto"``: :func:`auto_step_size` from the top Hessian eigenvalue at θ*.
        num_chains, num_draws, num_burnin, thinning, seed: sampler settings (``SGLDConfig``).
        batch_size: minibatch size (``None``: full batch). Minibatches are drawn without replacement
            from a permutation per pass, the same for every chain.
        params: names of the parameters to sample (or a predicate on names); default all parameters
            that require grad. The others stay at θ*.
        vectorize: run the chains together (default) or one after another (identical results).
        engine: how chains are vectorised for the behavioral loss: ``"vmap"`` (``torch.func.vmap`` of
            ``functional_call``, any model), ``"batched"`` (linear layers with a chain dimension, see
            :mod:`degeneracy.llc.batched`; faster on small models) or ``"auto"`` (batched when it applies
            and reproduces the vmap path at perturbed parameters, else vmap). Custom losses use vmap.
        threads: torch intra-op threads while sampling; default: 1 for small problems
            (:func:`~degeneracy.llc.sgld.default_threads`), else torch's setting.
        progress: show a progress bar.
        divergence_factor: see :func:`~degeneracy.llc.diagnostics.find_bad_chains`.
        warn: emit the result's warnings as :class:`LLCWarning`.
        sampler: ``"sgld"`` (default) or ``"mala"`` (Metropolis-adjusted, exact for any η; needs the full
            batch: ValueError when ``batch_size`` or the data split it into several batches), as in
            :func:`sample_sgld`.
    """
    if engine not in ("auto", "vmap", "batched"):
        raise ValueError(f"unknown engine {engine!r}: use 'auto', 'vmap' or 'batched'")
    requested_engine = engine
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("the model has no parameters")
    device = first.device
    chosen = _select_params(model, params)
    layout = ParamLayout.of(chosen)
    center = layout.flatten(chosen)
    examples = _materialize(data, device)
    n = examples.num_examples
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
    if nbeta is None:
        if n < 2:
            raise ValueError("nbeta cannot default to n / log n with fewer than 2 examples; pass nbeta")
        nbeta = n / math.log(n)
    if examples.pooled is not None:
        num_batches = 1 if batch_size is None or batch_size >= n else n // batch_size
    else:
        num_batches = sum(1 for b in examples.batches for _ in _split_batch(b, batch_size))
    _check_sampler(sampler, num_batches)

    was_training = model.training
    model.eval()
    try:
        chunk = max(batch_size or 0, 4096)  # evaluation chunk (reference outputs, L(θ*))
        if isinstance(loss, str):
            kind = _behavioral_kind(loss)
            chain_loss, engine = _behavioral_engine(model, list(layout.names), kind, engine)
            batches = _behavioral_batches(model, examples, batch_size, seed, chunk)
            init_loss = 0.0  # L_B(θ*|θ*) = 0 exactly
            loss_name = f"behavioral-{kind}"
            first_item = next(batches())
            if engine == "batched" and not chain_losses_agree(
                chain_loss, vmap_behavioral_chain_loss(model, kind), layout, center, first_item, seed
            ):
                if requested_engine == "batched":
                    raise ValueError(
                        "engine='batched' does not reproduce the vmap path on this model (its forward does "
                        "not treat leading dimensions as batch dimensions); use engine='vmap' or 'auto'"
                    )
                chain_loss, engine = vmap_behavioral_chain_loss(model, kind), "vmap"
        else:
            if requested_engine == "batched":
                raise ValueError("engine='batched' needs the behavioral loss; use engine='vmap' or 'auto'")
            chain_loss, engine = _custom_chain_loss(model, loss), "vmap"
            make_batches = _minibatches(examples, batch_size, seed)

            def batches() -> Iterator[tuple[Batch, None]]:
                return ((b, None) for b in make_batches())

            init_loss = _mean_loss(model, loss, examples, chunk)
            loss_name = getattr(loss, "__name__", "callable")
            first_item = next(batches())

        config, curvature = _config(
            chain_loss,
            layout,
            center,
            first_item,
            nbeta,
            localization,
            step_size,
            num_chains,
            num_draws,
            num_burnin,
            thinning,
            seed,
        )
        run = _run(chain_loss, layout, center, batches, config, vectorize, progress, threads, sampler)
    finally:
        model.train(was_training)
    extra = {
        "loss": loss_name,
        "batch_size": batch_size,
        "num_examples": n,
        "params": list(layout.names),
        "dtype": str(center.dtype).replace("torch.", ""),
        "vectorize": vectorize,
        "engine": engine,
        **_sampler_extra(sampler, run),
    }
    result = summarize_chains(run, init_loss, config, layout.numel, extra, curvature, divergence_factor)
    return _finish(result, warn)
