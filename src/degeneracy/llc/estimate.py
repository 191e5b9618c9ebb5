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

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from degeneracy.adapters.huggingface import eager_attention
from degeneracy.data import eval_mode
from degeneracy.fingerprint import result_fingerprint
from degeneracy.linalg import intra_op_threads
from degeneracy.llc.diagnostics import DIVERGENCE_FACTOR, LLCWarning
from degeneracy.llc.distributed import empty_chain_run, gather_chain_runs, is_main_process, my_chains
from degeneracy.llc.model_loss import (
    ENGINES,
    Engine,
    LossSpec,
    materialize,
    model_chain_loss,
    resolve_loss,
    select_parameters,
)
from degeneracy.llc.result import LLCResult, summarize_chains
from degeneracy.llc.sgld import (
    ChainLoss,
    ChainRun,
    SGLDConfig,
    cycle_batches,
    default_threads,
    max_curvature,
    run_mala_chains,
    run_sgld_chains,
)
from degeneracy.llc.user_loss import loss_name, warn_unshifted_labels
from degeneracy.run import ParamLayout, model_device, model_dtype, resolve_dtype

__all__ = ["LLCWarning", "sample_sgld", "estimate_llc", "auto_step_size", "AUTO_STEP_FACTOR", "LossSpec"]

AUTO_STEP_FACTOR = 0.1
"""``step_size="auto"`` uses η = AUTO_STEP_FACTOR / (nβ h_max + γ), h_max the largest Hessian eigenvalue
of the loss at θ*: the stiffest direction's variance is then inflated by 1/(1 − 0.1/4) ≈ 2.6 %."""

Sampler = Literal["sgld", "mala", "rmsprop"]


def _check_sampler(sampler: str, num_batches: int) -> None:
    if sampler not in ("sgld", "mala", "rmsprop"):
        raise ValueError(f"unknown sampler {sampler!r}: use 'sgld', 'rmsprop' or 'mala'")
    if sampler == "mala" and num_batches > 1:
        raise ValueError(
            f"sampler='mala' needs the same loss at every step, but the data gives {num_batches} distinct "
            "batches (minibatching): the Metropolis correction is only exact for a deterministic loss; "
            "use the full batch (one batch, batch_size=None) or sampler='sgld'"
        )


def _sampler_extra(sampler: str, run: ChainRun) -> dict[str, Any]:
    """What the result's config records about the sampler (nothing for the default SGLD)."""
    if sampler == "rmsprop":
        return {"sampler": sampler}
    if sampler == "sgld" or run.acceptance is None:
        return {}
    return {
        "sampler": sampler,
        "acceptance": float(run.acceptance.mean()),
        "chain_acceptance": [round(float(a), 6) for a in run.acceptance],
    }


def auto_step_size(nbeta: float, localization: float, curvature: float) -> float:
    """η = AUTO_STEP_FACTOR / (nβ h_max + γ).

    >>> auto_step_size(nbeta=100.0, localization=0.0, curvature=2.0)
    0.0005
    """
    stiffness = nbeta * curvature + localization
    if not (math.isfinite(stiffness) and stiffness > 0):
        raise ValueError(
            f"cannot choose a step size automatically: nβ h_max + γ = {stiffness:.3g} (the loss is flat "
            "at θ* and localization is 0); pass step_size explicitly"
        )
    return AUTO_STEP_FACTOR / stiffness


@dataclass(frozen=True)
class _Sampling:
    """The sampler settings both entry points take (documented in :func:`sample_sgld`)."""

    nbeta: float
    localization: float
    step_size: float | str
    num_chains: int
    num_draws: int
    num_burnin: int
    thinning: int
    seed: int
    vectorize: bool
    threads: int | None
    progress: bool
    sampler: str
    divergence_factor: float
    warn: bool
    sampler_options: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> _Sampling:
        """The settings an entry point was called with: each field taken by name from ``arguments``
        (its ``locals()``), so both entry points build them the same way, in no positional order."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})

    def config(self, step_size: float) -> SGLDConfig:
        """The :class:`SGLDConfig` of these settings at step size ``step_size``."""
        options = dict(self.sampler_options or {})
        rmsprop: dict[str, Any] = {}
        if self.sampler == "rmsprop":
            unknown = sorted(set(options) - {"alpha", "eps", "adapt"})
            if unknown:
                raise ValueError(
                    f"unknown sampler_options {unknown} for sampler='rmsprop': use 'alpha', 'eps', 'adapt'"
                )
            rmsprop = {"preconditioner": "rmsprop"}
            rmsprop.update({f"rmsprop_{k}": v if k == "adapt" else float(v) for k, v in options.items()})
        elif options:
            raise ValueError(f"sampler_options are for sampler='rmsprop', not {self.sampler!r}")
        return SGLDConfig(
            nbeta=float(self.nbeta),
            localization=float(self.localization),
            step_size=float(step_size),
            num_chains=self.num_chains,
            num_draws=self.num_draws,
            num_burnin=self.num_burnin,
            thinning=self.thinning,
            seed=self.seed,
            **rmsprop,
        )

    def run(
        self,
        chain_loss: ChainLoss,
        layout: ParamLayout,
        center: Tensor,
        make_batches: Callable[[], Iterator[Any]],
        first_item: Any,
        init_loss: float,
        extra: dict[str, Any],
    ) -> LLCResult:
        """Sample the chains of ``chain_loss`` around θ* = ``center`` and summarise them.

        ``step_size="auto"`` is resolved at θ* on ``first_item`` (the first batch), where the largest
        curvature is also taken for the step-size stability check; ``extra`` (and the sampler's
        acceptance) go into the result's config, and its warnings are emitted as :class:`LLCWarning`
        when ``warn``.
        """
        curvature = max_curvature(chain_loss, layout, center, first_item, seed=self.seed)
        step_size = self.step_size
        if step_size == "auto":
            # the preconditioner multiplies the step by at most max_preconditioner (RMSprop: 1/ε)
            limit = self.config(1.0).max_preconditioner
            step_size = auto_step_size(self.nbeta, self.localization, curvature) / limit
        config = self.config(float(step_size))
        threads = self.threads
        if threads is None:
            threads = default_threads(config.num_chains if self.vectorize else 1, layout.numel)
        with intra_op_threads(threads):
            run = self.chains(chain_loss, layout, center, make_batches, config)
        extra = {**extra, **_sampler_extra(self.sampler, run)}
        factor = self.divergence_factor
        result = summarize_chains(run, init_loss, config, layout.numel, extra, curvature, factor)
        if self.warn:
            for note in result.warnings:
                warnings.warn(note, LLCWarning, stacklevel=3)
        return result

    def chains(
        self,
        chain_loss: ChainLoss,
        layout: ParamLayout,
        center: Tensor,
        make_batches: Callable[[], Iterator[Any]],
        config: SGLDConfig,
    ) -> ChainRun:
        """The sampler's chains, all in one vectorised run or one after another (the same draws);
        under ``torch.distributed`` each rank runs its share and all ranks gather them
        (:mod:`degeneracy.llc.distributed`: the result does not depend on the number of processes)."""
        progress = self.progress and is_main_process()

        def run(chain_ids: list[int], desc: str) -> ChainRun:
            options = {"chain_ids": chain_ids, "progress": progress, "desc": desc}
            if self.sampler == "mala":  # the one batch (checked by the caller)
                return run_mala_chains(chain_loss, layout, center, next(make_batches()), config, **options)
            return run_sgld_chains(chain_loss, layout, center, make_batches(), config, **options)

        mine = my_chains(config.num_chains)
        if not mine:  # more ranks than chains
            local = empty_chain_run(config.num_draws, config.num_burnin, layout.numel, center.dtype)
        elif self.vectorize:
            local = run(mine, self.sampler.upper())
        else:
            runs = [run([c], f"chain {c}") for c in mine]
            acceptances = [r.acceptance for r in runs]
            local = ChainRun(
                loss_traces=torch.cat([r.loss_traces for r in runs]),
                burnin_traces=torch.cat([r.burnin_traces for r in runs]),
                final_params=torch.cat([r.final_params for r in runs]),
                seconds=sum(r.seconds for r in runs),
                acceptance=None if any(a is None for a in acceptances) else torch.cat(acceptances),  # type: ignore[arg-type]
            )
        return gather_chain_runs(local, mine, config.num_chains)


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
    sampler_options: Mapping[str, Any] | None = None,
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
            recorded in ``result.config["acceptance"]`` (per chain: ``"chain_acceptance"``). Or
            ``"rmsprop"``: RMSprop-preconditioned SGLD (devinterp's ``RMSpropSGLD``, see
            :class:`~degeneracy.llc.sgld.SGLDConfig`): each coordinate's step scaled by 1/(√V + ε), V the
            running mean of its squared gradient; ``step_size="auto"`` then divides the SGLD rule by
            1/ε (the largest scaling).
        sampler_options: for ``sampler="rmsprop"``: ``{"alpha": 0.99, "eps": 0.1, "adapt": "burnin"}``
            (the defaults; ``adapt``: the preconditioner is learnt during burn-in then frozen, or
            ``"always"`` as devinterp, biased: :class:`~degeneracy.llc.sgld.SGLDConfig`).

    >>> import torch
    >>> quadratic = lambda w, _: w.square().sum()   # one regular parameter: λ = 1/2
    >>> r = sample_sgld(quadratic, torch.zeros(1, dtype=torch.float64), nbeta=100.0, num_chains=2,
    ...                 num_draws=400, seed=0, warn=False)
    >>> abs(r.mean - 0.5) < 0.2
    True
    """
    single_tensor = isinstance(init_params, Tensor)
    params = {"": init_params} if single_tensor else dict(init_params)
    if not params:
        raise ValueError("init_params is empty: nothing to sample")
    layout = ParamLayout.of(params)
    center = layout.flatten(params).detach()

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

    sampling = _Sampling.of(locals())
    name = loss_name(loss_fn)
    extra = {"loss": name, "num_batches": len(items), "vectorize": vectorize}

    def batches() -> Iterator[Any]:
        return cycle_batches(items, seed)

    return sampling.run(chain_loss, layout, center, batches, items[0], init_loss, extra)


# --------------------------------------------------------------------------------------------------
# nn.Module path


def estimate_llc(
    model: nn.Module,
    data: Any,
    *,
    loss: LossSpec | None = None,
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
    engine: Engine = "auto",
    threads: int | None = None,
    progress: bool = False,
    divergence_factor: float = DIVERGENCE_FACTOR,
    warn: bool = True,
    sampler: Sampler = "sgld",
    sampler_options: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> LLCResult:
    """Estimate the local learning coefficient λ̂ of ``model`` at its current parameters θ*.

    λ̂ = nβ (E_SGLD[L] − L(θ*)) with SGLD on exp(−nβ L(θ) − γ/2 ‖θ − θ*‖²) (METHOD §7);
    N_eff = 2 λ̂ (paper eq 9) is ``result.n_eff``.

    Args:
        model: any ``nn.Module``; it is put in eval mode while sampling (restored after) and its
            parameters are not modified (chains run on ``torch.func.functional_call``).
        data: one dataset — a tensor of inputs, a dict of tensors (keyword inputs), or a tuple/list of
            equal-length tensors ``(inputs, labels, ...)`` — or batches: a ``DataLoader`` or any other
            iterable (a generator, a list of ``(inputs, labels)`` tuples), each batch a tensor, a dict or
            a tuple/list. Everything is read once into memory on the model's device. A dataset is
            sampled in minibatches of ``batch_size`` (``None``: full batch); batches given as an
            iterable are used one per step (``batch_size=None``) or pooled and re-split to
            ``batch_size``.
        loss: what λ is the learning coefficient of.

            * ``loss(model, batch) -> scalar tensor`` (the mean loss of the batch), ``batch`` exactly as
              the data yield it (``x, y = batch`` for ``(X, y)`` data), as devinterp's
              ``evaluate(model, batch)``;
            * ``"cross_entropy"`` / ``"mse"``: ``F.cross_entropy`` / ``F.mse_loss`` of the model's output
              against the labels of the batch (its second element, or a dict's ``"labels"``);
            * ``"behavioral"``: E ‖f_θ(x) − f_θ*(x)‖², the squared norm summed over output features and
              positions, averaged over examples (n counts sequences; METHOD §6,
              :mod:`degeneracy.behavioral`); ``"kl"``: E Σ_pos KL(softmax f_θ* ‖ softmax f_θ).
            * ``None`` (default): the behavioral loss, with an :class:`LLCWarning` when the data carry
              labels (the training loss's λ is another number: pass ``loss=`` to choose). ``"mse"`` on
              data without labels is a deprecated alias of ``"behavioral"``.

            The result's ``config["loss"]`` and repr name the loss. A loss that ``torch.func.vmap``
            cannot vectorise (it calls ``.item()``, branches on values...) is evaluated chain by chain
            (``engine="sequential"``) with an :class:`LLCWarning`.
        nbeta: nβ; default n / log n with n the number of examples (Watanabe's WBIC temperature).
        localization: γ.
        step_size: η, or ``"auto"``: :func:`auto_step_size` from the top Hessian eigenvalue at θ*.
        num_chains, num_draws, num_burnin, thinning, seed: sampler settings (``SGLDConfig``).
        batch_size: minibatch size (``None``: full batch). Minibatches are drawn without replacement
            from a permutation per pass, the same for every chain.
        params: names of the parameters to sample (or a predicate on names); default all parameters
            that require grad. The others stay at θ*.
        vectorize: run the chains together (default) or one after another (identical results).
        engine: how chains are vectorised: ``"batched"`` (linear layers with a chain dimension, see
            :mod:`degeneracy.llc.batched`: all chains' outputs in plain batched ops; for labelled losses
            the loss must call the model once, on the batch's inputs), ``"vmap"`` (``torch.func.vmap``
            of ``functional_call``), ``"sequential"`` (one chain after another inside each step, any
            loss, any model) or ``"auto"`` (batched when it applies and reproduces the loss chain by
            chain at perturbed parameters, else vmap, else sequential: a model that vmap cannot run,
            such as an ``nn.GRU``, with an :class:`LLCWarning`). ``result.config["engine"]``.
        threads: torch intra-op threads while sampling; default: 1 for small problems
            (:func:`~degeneracy.llc.sgld.default_threads`), else torch's setting.
        progress: show a progress bar.
        divergence_factor: see :func:`~degeneracy.llc.diagnostics.find_bad_chains`.
        warn: emit the result's warnings as :class:`LLCWarning`.
        sampler: ``"sgld"`` (default), ``"rmsprop"`` (RMSprop-preconditioned SGLD) or ``"mala"``
            (Metropolis-adjusted, exact for any η; needs the full batch: ValueError when ``batch_size``
            or the data split it into several batches), as in :func:`sample_sgld`.
        sampler_options: for ``sampler="rmsprop"``: ``{"alpha": 0.99, "eps": 0.1, "adapt": "burnin"}``
            (the defaults; ``adapt``: the preconditioner is learnt during burn-in then frozen, or
            ``"always"`` as devinterp, biased: :class:`~degeneracy.llc.sgld.SGLDConfig`).
        dtype: compute dtype (name or ``torch.dtype``). The run layer's one rule
            (:func:`degeneracy.run.cast_inputs`): without it the model's dtype is used and a floating
            input of another dtype is a ``ValueError``; with it a cast copy of the model is sampled and
            floating inputs are cast. Integer inputs (token ids) are never cast.

    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False).double()
    >>> x = torch.linspace(-1, 1, 50, dtype=torch.float64).unsqueeze(1)
    >>> r = estimate_llc(model, x, nbeta=100.0, num_chains=2, num_draws=40, num_burnin=20, warn=False)
    >>> r.loss_traces.shape, r.config["loss"]   # one regular parameter: λ̂ near 1/2
    (torch.Size([2, 40]), 'behavioral-mse')
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {ENGINES}")
    if next(model.parameters(), None) is None:
        raise ValueError("the model has no parameters")
    wanted = resolve_dtype(dtype)
    if wanted is not None and model_dtype(model) != wanted:
        model = copy.deepcopy(model).to(wanted)  # the caller's model is never modified
    chosen = select_parameters(model, params)
    layout = ParamLayout.of(chosen)
    center = layout.flatten(chosen).detach()
    examples = materialize(data, model_device(model), model_dtype(model), explicit=wanted is not None)
    loss = resolve_loss(loss, examples)
    warn_unshifted_labels(model, loss, examples.form)
    n = examples.num_examples
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
    if nbeta is None:
        if n < 2:
            raise ValueError("nbeta cannot default to n / log n with fewer than 2 examples; pass nbeta")
        nbeta = n / math.log(n)
    _check_sampler(sampler, examples.num_batches(batch_size))

    sampling = _Sampling.of(locals())
    # the function, not dropout samples of it; SDPA has no double backward (the curvature check)
    with eval_mode(model), eager_attention(model):
        spec = model_chain_loss(
            model, examples, layout, center, loss=loss, engine=engine, batch_size=batch_size, seed=seed
        )
        extra = {
            "loss": spec.name,
            "batch_size": batch_size,
            "num_batches": examples.num_batches(batch_size),
            "num_examples": n,
            "params": list(layout.names),
            "dtype": str(center.dtype).replace("torch.", ""),
            "vectorize": vectorize,
            "engine": spec.engine,
            **spec.details,
            "fingerprint": result_fingerprint(model, data),  # model + data (older files have none)
        }
        first_item = next(spec.batches())
        return sampling.run(spec.chain_loss, layout, center, spec.batches, first_item, spec.init_loss, extra)
