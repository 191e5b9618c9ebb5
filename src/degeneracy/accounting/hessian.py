"""The Hessian of the behavioral loss at θ* (paper eq 10): its spectrum, rank and trace.

One entry point and one result:

* :func:`hessian_spectrum` ``(model, data, method=...) →`` :class:`HessianSpectrum`: the eigenvalues
  (float64, descending) with the numerical floor, trace, Lanczos residuals and the SLQ density, and
  ``.rank(epsilon, relative=)``, ``.nullity(...)``, ``.rank_estimate(...)``, ``.save(path)``;
* :func:`hessian_rank`: the rank at ε in one call (``hessian_spectrum(...).rank(epsilon)``).

Two paths (``method``):

* **exact** (small models): the per-example Jacobians (``torch.func.vmap`` over ``jacrev``), then the
  Gram on whichever side is smaller, JᵀJ (N × N) or J Jᵀ (n·rows square), in float64; the nonzero
  eigenvalues agree and the rest are zeros, so all N eigenvalues are returned
  (:class:`~degeneracy.accounting.gauss_newton.BehavioralHessian`,
  :func:`~degeneracy.accounting.kronecker.linear_gram`).
* **lanczos** (large models): Hessian-vector products H v = 1/n J_zᵀ (J_z v) by ``torch.func.jvp`` and
  ``vjp`` (no N × N matrix), block Lanczos with full reorthogonalisation for the top of the spectrum,
  Hutchinson for the trace (vᵀHv = 1/n ‖J_z v‖², forward mode only), and stochastic Lanczos
  quadrature (SLQ) for the rank at any ε: the Krylov numerics of :mod:`degeneracy.linalg.krylov`.

**Rank at ε** (METHOD §6): eigenvalues λ ≤ ε count as zero (``relative=True``: λ ≤ ε·λ_max). A
numerical floor always applies (:func:`~degeneracy.accounting.gauss_newton.numerical_floor`): for the
exact path λ_max · d · max(eps64, 100·eps(dtype)²) with d the Gram side, for the Lanczos path
λ_max · 100 · eps(dtype), with ``dtype`` the dtype of the Jacobian computations.

``hessian_analysis`` (the former name of :func:`hessian_spectrum`) is a deprecated alias; the former
``hessian_spectrum`` returned only the eigenvalues, now ``hessian_spectrum(...).eigenvalues``.

>>> import torch
>>> model = torch.nn.Linear(2, 1, bias=False).double()
>>> spectrum = hessian_spectrum(model, torch.eye(2, dtype=torch.float64), method="exact")
>>> spectrum.eigenvalues.round(decimals=12).tolist(), spectrum.rank()
([1.0, 1.0], 2)
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import nn

from degeneracy.accounting.gauss_newton import BehavioralHessian, numerical_floor
from degeneracy.accounting.spectrum import HessianSpectrum, load_hessian_spectrum
from degeneracy.adapters.huggingface import with_eager_attention
from degeneracy.behavioral import LossKind
from degeneracy.data import in_eval_mode
from degeneracy.deprecation import deprecated_alias, renamed_arguments
from degeneracy.linalg import (
    block_krylov_top,
    hutchinson_trace,
    krylov_max_vectors,
    lanczos_top,
    psd_eigenvalues,
    rank_at,
    slq_nodes,
    slq_nodes_batched,
)
from degeneracy.progress import progress_bar
from degeneracy.run import ForwardFn, full_precision

__all__ = [
    "hessian_spectrum",
    "hessian_rank",
    "HessianSpectrum",
    "load_hessian_spectrum",
    "BehavioralHessian",
    "numerical_floor",
    "hessian_analysis",
    # moved to degeneracy.linalg, kept here for old imports
    "rank_at",
    "lanczos_top",
    "block_krylov_top",
    "slq_nodes",
    "slq_nodes_batched",
    "hutchinson_trace",
    "psd_eigenvalues",
]

Method = Literal["auto", "exact", "lanczos"]


def _choose_method(method: str, hessian: BehavioralHessian, max_exact: int) -> str:
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"method must be 'auto', 'exact' or 'lanczos', got {method!r}")
    if method != "auto":
        return method
    side = min(hessian.num_parameters, hessian.total_rows)
    return "exact" if side <= max_exact else "lanczos"


def _exact(hessian: BehavioralHessian, chunk_size: int | None, timings: dict[str, float]) -> dict[str, Any]:
    """Every eigenvalue from the float64 Gram on the smaller side."""
    t = time.perf_counter()
    gram, side = hessian.gram(chunk_size)
    timings["gram"] = time.perf_counter() - t
    t = time.perf_counter()
    values = psd_eigenvalues(gram)
    timings["eigvalsh"] = time.perf_counter() - t
    n_params = hessian.num_parameters
    if values.numel() < n_params:
        values = torch.cat([values, torch.zeros(n_params - values.numel(), dtype=torch.float64)])
    top = float(values[0]) if values.numel() else 0.0
    return {
        "eigenvalues": values,
        "floor": numerical_floor(top, max(gram.shape[0], 1), hessian.dtype),
        "trace": float(torch.diagonal(gram).sum()),
        "gram_side": side,
    }


def _lanczos(
    hessian: BehavioralHessian,
    k: int,
    *,
    block_size: int,
    max_iter: int | None,
    tol: float,
    num_trace_probes: int,
    num_rank_probes: int,
    num_rank_steps: int,
    seed: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The top k eigenvalues by block Lanczos, with the SLQ density and Hutchinson's trace if asked."""
    n_params = hessian.num_parameters
    counter = {"n": 0}
    show = getattr(hessian, "progress", False)  # a terminal, rank 0: vectors, rate, ETA
    bound = krylov_max_vectors(n_params, k, block_size=block_size, max_vectors=max_iter)
    bars = [progress_bar(bound, f"Lanczos top-{k}", show, unit="vec")]

    def matmat(v: torch.Tensor) -> torch.Tensor:
        counter["n"] += v.shape[1]
        out = hessian.matmat(v)
        bars[-1].update(v.shape[1])  # Hessian-vector products done (rate and ETA on a terminal)
        return out

    t = time.perf_counter()
    try:
        values, residuals, _ = block_krylov_top(
            matmat, n_params, k, block_size=block_size, max_vectors=max_iter, tol=tol, seed=seed
        )
    finally:
        bars[-1].close()
    timings["lanczos"] = time.perf_counter() - t
    top = float(values[0]) if values.numel() else 0.0
    fields: dict[str, Any] = {
        "eigenvalues": values,
        "floor": numerical_floor(top, n_params, hessian.dtype, operator=True),
        "residuals": residuals,
    }
    if num_rank_probes > 0:
        t = time.perf_counter()
        total = num_rank_probes * min(num_rank_steps, n_params)
        bars.append(progress_bar(total, "SLQ rank", show, unit="vec"))
        try:
            fields["density"] = slq_nodes_batched(
                matmat, n_params, num_probes=num_rank_probes, num_steps=num_rank_steps, seed=seed + 1
            )
        finally:
            bars[-1].close()
        timings["slq"] = time.perf_counter() - t
    fields["matvecs"] = counter["n"]
    if num_trace_probes > 0:
        t = time.perf_counter()
        bar = progress_bar(num_trace_probes, "Hutchinson trace", show, unit="vec")

        def forms(v: torch.Tensor) -> torch.Tensor:
            out = hessian.quadratic_forms(v)
            bar.update(v.shape[1])  # probes done
            return out

        try:
            fields["trace"], fields["trace_stderr"] = hutchinson_trace(
                forms, n_params, num_probes=num_trace_probes, seed=seed + 2, batched=True
            )
        finally:
            bar.close()
        timings["trace"] = time.perf_counter() - t
    hessian.release()
    return fields


@renamed_arguments(
    position="positions",
    trace_probes="num_trace_probes",
    rank_probes="num_rank_probes",
    rank_steps="num_rank_steps",
)
@full_precision()
@in_eval_mode
@with_eager_attention
def hessian_spectrum(
    model: nn.Module,
    data: Any,
    *,
    kind: LossKind = "mse",
    method: Method = "auto",
    k: int = 50,
    batch_size: int | None = None,
    positions: int | None = None,
    forward: ForwardFn | None = None,
    dtype: torch.dtype | None = None,
    max_exact: int = 6000,
    max_iter: int | None = None,
    tol: float = 1e-4,
    block_size: int = 16,
    num_trace_probes: int = 0,
    num_rank_probes: int = 0,
    num_rank_steps: int = 40,
    chunk_size: int | None = 64,
    seed: int = 0,
    progress: bool = False,
) -> HessianSpectrum:
    """Spectrum of the behavioral-loss Hessian at the model's parameters, with rank and trace.

    Args:
        model: the network at θ*.
        data: the dataset D (anything :func:`degeneracy.data.iter_batches` reads).
        kind: ``"mse"`` (paper eq 6; H = (2/n) Σ JᵀJ) or ``"kl"`` (H = Fisher); summed over positions.
        method: ``"exact"`` (all N eigenvalues), ``"lanczos"`` (top k) or ``"auto"`` (exact when the
            smaller Gram side is at most ``max_exact``).
        k: number of top eigenvalues for Lanczos.
        batch_size: batch size of every pass.
        positions: read a ``(batch, pos, d)`` output at one position (``-1``: last token); ``None``:
            every position (formerly ``position``).
        forward: ``forward(model, inputs)`` replacing ``model(inputs)`` (e.g.
            :func:`degeneracy.adapters.transformer_lens.forward.last_position_logits`).
        dtype: dtype of the Jacobian computations; default float64 for ``exact``, the model's for
            ``lanczos`` (whose vectors and reorthogonalisation are float64 regardless).
        max_exact: largest Gram side ``"auto"`` computes exactly.
        max_iter, tol, block_size: block Lanczos limits (see :func:`degeneracy.linalg.block_krylov_top`):
            at most ``max_iter`` Hessian-vector products, residuals ≤ ``tol·λ_max``, ``block_size``
            products batched per step (``1``: plain Lanczos).
        num_trace_probes: Hutchinson probes (0: none; the exact path always has the exact trace).
        num_rank_probes, num_rank_steps: SLQ probes and Lanczos steps per probe (0: none) for the
            rank at any ε (:meth:`HessianSpectrum.rank_estimate`).
        chunk_size: vmap chunk of the exact path.
        seed: seeds every random vector.
        progress: progress bars with an ETA, quiet when stderr is not a terminal: the exact path counts
            the examples of the per-example Jacobians (moving per ``chunk_size`` examples), Lanczos its
            Hessian-vector products (up to the bound of :func:`~degeneracy.linalg.krylov_max_vectors`;
            it may stop earlier) and then those of the SLQ rank probes.

    Under ``torch.distributed`` the data are sharded by rank and every Gram and Hessian-vector product
    is summed over the ranks (:class:`BehavioralHessian`): every rank returns the single-process
    spectrum (the Lanczos vectors, seeded alike, see the same products on every rank).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).double()
    >>> x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> spectrum = hessian_spectrum(model, x, method="exact")
    >>> len(spectrum) == spectrum.num_parameters == 9, spectrum.rank() <= 9
    (True, True)
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if method == "exact" and dtype is None:
        dtype = torch.float64
    options = {"batch_size": batch_size, "positions": positions, "forward": forward}
    hessian = BehavioralHessian(model, data, kind, dtype=dtype, **options)
    resolved = _choose_method(method, hessian, max_exact)
    if resolved == "exact" and dtype is None and hessian.dtype != torch.float64:
        hessian = BehavioralHessian(model, data, kind, dtype=torch.float64, **options)
    hessian.progress = progress  # a bar over the examples of the exact Jacobians (quiet off a terminal)
    timings["setup"] = time.perf_counter() - t0
    from degeneracy import __version__

    config = {
        "version": __version__,
        "kind": kind,
        "method": resolved,
        "k": k,
        "block_size": block_size,
        "tol": tol,
        "batch_size": batch_size,
        "positions": positions,
        "dtype": str(hessian.dtype).replace("torch.", ""),
        "num_trace_probes": num_trace_probes,
        "num_rank_probes": num_rank_probes,
        "num_rank_steps": num_rank_steps,
        "seed": seed,
    }
    if resolved == "exact":
        fields = _exact(hessian, chunk_size, timings)
    else:
        fields = _lanczos(
            hessian,
            k,
            block_size=block_size,
            max_iter=max_iter,
            tol=tol,
            num_trace_probes=num_trace_probes,
            num_rank_probes=num_rank_probes,
            num_rank_steps=num_rank_steps,
            seed=seed,
            timings=timings,
        )
    result = HessianSpectrum(
        num_parameters=hessian.num_parameters,
        method=resolved,
        kind=kind,
        num_examples=hessian.n,
        config=config,
        **fields,
    )
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    return result


def hessian_rank(
    model: nn.Module,
    data: Any,
    epsilon: float = 0.0,
    *,
    relative: bool = False,
    **options: Any,
) -> float:
    """Rank of the behavioral-loss Hessian at ε: exact with every eigenvalue, else the SLQ estimate.

    ``options`` are those of :func:`hessian_spectrum` (``method="lanczos"`` needs
    ``num_rank_probes > 0`` unless ε falls inside the computed top of the spectrum). Use
    :func:`hessian_spectrum` to read the rank at several ε from one computation.

    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> hessian_rank(model, torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64), method="exact")
    1.0
    """
    spectrum = hessian_spectrum(model, data, **options)
    if spectrum.complete:
        return float(spectrum.rank(epsilon, relative=relative))
    threshold = spectrum.threshold(epsilon, relative=relative)
    if int((spectrum.eigenvalues > threshold).sum()) < len(spectrum):
        return float(spectrum.rank(epsilon, relative=relative))
    return spectrum.rank_estimate(epsilon, relative=relative)[0]


hessian_analysis = deprecated_alias(hessian_spectrum, "hessian_analysis")
