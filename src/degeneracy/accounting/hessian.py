"""The Hessian of the behavioral loss at θ* (paper eq 10): exact spectrum, Lanczos, stochastic estimates.

At θ = θ* the behavioral loss and its gradient vanish, so its Hessian is the Gram matrix of the
(whitened) per-example output gradients (paper eq 10, METHOD §6):

    H = 1/n Σ_x J_z(x)ᵀ J_z(x),    J_z = A ∂f/∂θ   ((rows × N) per example)

with A from :func:`degeneracy.accounting.behavioral.whiten_outputs` (A = √2·I for the MSE loss of
eq 6, which carries no ½: H = (2/n) Σ JᵀJ; A = diag(√p) − √p pᵀ for the KL variant: H is the Fisher
matrix). Free directions are eigenvectors with zero eigenvalue (paper §3.1).

Two paths:

* **exact** (small models): the per-example Jacobians (``torch.func.vmap`` over ``jacrev``), then the
  Gram on whichever side is smaller — JᵀJ (N × N) or J Jᵀ (n·rows square) — in float64; the nonzero
  eigenvalues agree and the rest are zeros, so all N eigenvalues are returned.
* **lanczos** (large models): Hessian-vector products H v = 1/n J_zᵀ (J_z v) by ``torch.func.jvp`` and
  ``vjp`` (no N × N matrix), Lanczos with full reorthogonalisation for the top of the spectrum,
  Hutchinson for the trace (vᵀHv = 1/n ‖J_z v‖², forward mode only), and stochastic Lanczos quadrature
  (SLQ) for the spectral density and the rank at any ε.

**Rank at ε** (METHOD §6): eigenvalues λ ≤ ε count as zero (``relative=True``: λ ≤ ε·λ_max). A
numerical floor always applies (:func:`degeneracy.accounting._model.numerical_floor`): for the exact
path λ_max · d · max(eps64, 100·eps(dtype)²) with d the Gram side, for the Lanczos path
λ_max · 100 · eps(dtype), with ``dtype`` the dtype of the Jacobian computations.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from degeneracy.accounting._model import (
    ForwardFn,
    ParamSpec,
    cast_inputs,
    eigh,
    functional_output,
    materialize,
    model_dtype,
    numerical_floor,
    param_spec,
    parameters_and_buffers,
)
from degeneracy.accounting.behavioral import LossKind, _check_kind, whiten_outputs
from degeneracy.io import atomic_write_text

__all__ = [
    "HessianSpectrum",
    "hessian_spectrum",
    "hessian_analysis",
    "rank_at",
    "lanczos_top",
    "block_krylov_top",
    "slq_nodes",
    "hutchinson_trace",
    "BehavioralHessian",
]

Method = Literal["auto", "exact", "lanczos"]


def rank_at(
    eigenvalues: Tensor,
    epsilon: float = 0.0,
    *,
    relative: bool = False,
    floor: float = 0.0,
) -> int:
    """Number of eigenvalues above the threshold max(ε or ε·λ_max, floor); the rest count as zero."""
    if eigenvalues.numel() == 0:
        return 0
    top = float(eigenvalues.max())
    threshold = max(epsilon * top if relative else epsilon, floor)
    return int((eigenvalues > threshold).sum())


# ---------------------------------------------------------------------------------------------------
# The behavioral-loss Hessian as an operator


class BehavioralHessian:
    """H = 1/n Σ_x J_z(x)ᵀ J_z(x) at θ* for a model and a dataset; a state holder for the passes below.

    Args:
        model: the network at θ*.
        data: any data :func:`degeneracy.data.iter_batches` reads (read once and kept).
        kind: ``"mse"`` (eq 6) or ``"kl"``.
        batch_size: batch size of the passes.
        position: restrict ``(batch, pos, d)`` outputs to one position (``-1``: last token).
        forward: ``forward(model, inputs)`` replacing ``model(inputs)``.
        dtype: dtype of the Jacobian computations (parameters, buffers and float inputs are cast);
            ``None`` keeps the model's.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        kind: LossKind = "mse",
        *,
        batch_size: int | None = None,
        position: int | None = None,
        forward: ForwardFn | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_kind(kind)
        self.model = model
        self.kind = kind
        self.position = position
        self.forward = forward
        self.dtype = dtype or model_dtype(model)
        self.params, self.buffers = parameters_and_buffers(model, self.dtype)
        self.spec: ParamSpec = param_spec(model)
        batches = materialize(data, batch_size)
        self.inputs = [cast_inputs(b.inputs, self.dtype) for b in batches]
        self.sizes = [b.size for b in batches]
        self.n = sum(self.sizes)
        with torch.no_grad():
            self.refs = [self._output(self.params, x) for x in self.inputs]
        self.rows = int(self.refs[0][0].numel())
        self._vjp_cache: list[Callable[..., Any]] | None = None

    @property
    def num_parameters(self) -> int:
        return self.spec.size

    def _output(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        return functional_output(
            self.model, {**params, **self.buffers}, inputs, forward=self.forward, position=self.position
        )

    def _z(self, params: dict[str, Tensor], inputs: Any, ref: Tensor) -> Tensor:
        return whiten_outputs(self._output(params, inputs), ref, self.kind)

    # -- exact ---------------------------------------------------------------------------------------
    def jacobian_blocks(self, chunk_size: int | None = 64) -> Any:
        """Yield the per-example whitened Jacobians J_z of each batch, as ``(batch·rows, N)`` tensors."""

        def z_single(theta: dict[str, Tensor], x: Any, ref: Tensor) -> Tensor:
            xb = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), x)
            return self._z(theta, xb, ref.unsqueeze(0))[0]

        jac_fn = vmap(jacrev(z_single), in_dims=(None, 0, 0), chunk_size=chunk_size)
        for x, ref in zip(self.inputs, self.refs, strict=True):
            jac = jac_fn(self.params, x, ref)
            b = ref.shape[0]
            yield torch.cat([jac[name].reshape(b, self.rows, -1) for name in self.spec.names], dim=2).reshape(
                b * self.rows, self.spec.size
            )

    def gram(self, chunk_size: int | None = 64) -> tuple[Tensor, str]:
        """The float64 Gram on the smaller side: (H, "parameters") or (1/n J_z J_zᵀ, "outputs").

        Models made only of ``nn.Linear`` maps (plus parameter-free layers) on (batch, d) activations
        use the Kronecker form of eq 11 (:meth:`linear_gram`, the same H in another order of the
        parameters, n·N² instead of n·rows·N² operations).
        """
        total_rows = self.n * self.rows
        n_params = self.spec.size
        if total_rows >= n_params:
            fast = self.linear_gram()
            if fast is not None:
                return fast, "parameters"
            gram = torch.zeros(n_params, n_params, dtype=torch.float64)
            for block in self.jacobian_blocks(chunk_size):
                block = block.to(torch.float64)
                gram.addmm_(block.T, block)
            return gram / self.n, "parameters"
        blocks = [block.to(torch.float64) for block in self.jacobian_blocks(chunk_size)]
        jac = torch.cat(blocks, dim=0)
        return (jac @ jac.T) / self.n, "outputs"

    def linear_gram(self, batch_size: int = 256) -> Tensor | None:
        """H via eq 11, ∂z_r/∂W_ij = (∂z_r/∂p_i) f_j, for models whose parameters all sit in
        ``nn.Linear`` maps called once on (batch, d) inputs; ``None`` when that does not apply.

        Block (a, b) of H is 1/n Σ_x A_x ⊗ B_x with A_x = Σ_r g^a_r g^bᵀ_r (output Jacobians of the two
        sites) and B_x = f̃^a f̃^bᵀ (inputs with the constant 1). The result is H with the parameters
        of each site in [W | b] row-major order (a permutation of ``named_parameters`` order, which
        leaves the eigenvalues unchanged).
        """
        from degeneracy.accounting.structure import discover_torch, is_transformer_lens

        if is_transformer_lens(self.model) or self.forward is not None or self.position is not None:
            return None
        if not all(isinstance(x, Tensor) and x.dim() == 2 for x in self.inputs):
            return None
        try:
            structure = discover_torch(self.model, self.inputs[0][:2].to(model_dtype(self.model)))
        except Exception:  # noqa: BLE001 - any failure means: use the generic path
            return None
        sites = structure.sites
        if not sites or structure.covered_parameters() != self.spec.size:
            return None
        sizes = [site.num_parameters for site in sites]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        if offsets[-1] != self.spec.size:
            return None
        gram = torch.zeros(self.spec.size, self.spec.size, dtype=torch.float64)
        modules = {site.name: dict(self.model.named_modules())[site.name] for site in sites}
        inputs: dict[str, Tensor] = {}
        deltas: dict[str, Tensor] = {}

        def make(name: str) -> Any:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                inputs[name] = args[0].detach()
                deltas[name] = torch.zeros_like(output, requires_grad=True)
                return output + deltas[name]

            return hook

        handles = [module.register_forward_hook(make(name)) for name, module in modules.items()]
        try:
            for x_all, ref_all in zip(self.inputs, self.refs, strict=True):
                for start in range(0, x_all.shape[0], batch_size):
                    x, ref = x_all[start : start + batch_size], ref_all[start : start + batch_size]
                    inputs.clear()
                    deltas.clear()
                    with torch.enable_grad():
                        z = self._z(self.params, x, ref)
                    if any(inputs[s.name].dim() != 2 for s in sites):
                        return None
                    self._accumulate_linear_blocks(gram, z, sites, inputs, deltas, sizes, offsets)
        finally:
            for h in handles:
                h.remove()
        for ia in range(len(sites)):
            for ib in range(ia + 1, len(sites)):
                gram[offsets[ib] : offsets[ib + 1], offsets[ia] : offsets[ia + 1]] = gram[
                    offsets[ia] : offsets[ia + 1], offsets[ib] : offsets[ib + 1]
                ].T
        return gram / self.n

    @staticmethod
    def _accumulate_linear_blocks(
        gram: Tensor,
        z: Tensor,
        sites: list[Any],
        inputs: dict[str, Tensor],
        deltas: dict[str, Tensor],
        sizes: list[int],
        offsets: list[int],
    ) -> None:
        b, rows = z.shape
        eye = torch.eye(rows, dtype=z.dtype).unsqueeze(1).expand(rows, b, rows)
        grads = torch.autograd.grad(
            z, [deltas[s.name] for s in sites], grad_outputs=eye, is_grads_batched=True, allow_unused=True
        )
        jac = [
            torch.zeros(rows, b, s.d_out, dtype=torch.float64) if g is None else g.to(torch.float64)
            for g, s in zip(grads, sites, strict=True)
        ]
        feats = []
        for s in sites:
            f = inputs[s.name].to(torch.float64)
            if s.has_bias:
                f = torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64)], dim=1)
            feats.append(f)
        for ia, sa in enumerate(sites):
            for ib in range(ia, len(sites)):
                sb = sites[ib]
                a_x = torch.einsum("rxi,rxk->xik", jac[ia], jac[ib]).reshape(b, -1)
                b_x = torch.einsum("xj,xl->xjl", feats[ia], feats[ib]).reshape(b, -1)
                block = (a_x.T @ b_x).view(sa.d_out, sb.d_out, sa.d_in_aug, sb.d_in_aug)
                block = block.permute(0, 2, 1, 3).reshape(sizes[ia], sizes[ib])
                gram[offsets[ia] : offsets[ia + 1], offsets[ib] : offsets[ib + 1]] += block

    # -- operator ------------------------------------------------------------------------------------
    def _flat(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.spec.flatten(tensors).to(torch.float64)

    def matvec(self, v: Tensor, *, cache: bool = True) -> Tensor:
        """H v for a flat float64 vector v (N,), via J_z v (jvp) and J_zᵀ(·) (vjp); float64 result.

        With ``cache`` the backward graphs of every batch are kept after the first call (more memory,
        one forward pass fewer per product).
        """
        tangent = {k: t.to(self.dtype) for k, t in self.spec.unflatten(v).items()}
        if cache and self._vjp_cache is None:
            self._vjp_cache = []
            for x, ref in zip(self.inputs, self.refs, strict=True):
                _, fn = vjp(lambda th, x=x, ref=ref: self._z(th, x, ref), self.params)
                self._vjp_cache.append(fn)
        out = torch.zeros(self.spec.size, dtype=torch.float64)
        for i, (x, ref) in enumerate(zip(self.inputs, self.refs, strict=True)):
            _, jv = jvp(lambda th, x=x, ref=ref: self._z(th, x, ref), (self.params,), (tangent,))
            if cache and self._vjp_cache is not None:
                fn = self._vjp_cache[i]
            else:
                _, fn = vjp(lambda th, x=x, ref=ref: self._z(th, x, ref), self.params)
            (grad,) = fn(jv)
            out += self._flat(grad)
        return out / self.n

    def matmat(self, v: Tensor, *, cache: bool = True) -> Tensor:
        """H V for a float64 block V (N, b): b Hessian-vector products batched with ``vmap`` (float64).

        Much faster per vector than :meth:`matvec` on CPUs (the b tangents share every kernel).
        """
        b = v.shape[1]
        tangents = {
            name: v[self.spec.slice(name)].T.reshape(b, *shape).to(self.dtype)
            for name, shape in zip(self.spec.names, self.spec.shapes, strict=True)
        }
        if cache and self._vjp_cache is None:
            self._vjp_cache = []
            for x, ref in zip(self.inputs, self.refs, strict=True):
                _, fn = vjp(lambda th, x=x, ref=ref: self._z(th, x, ref), self.params)
                self._vjp_cache.append(fn)
        out = torch.zeros(b, self.spec.size, dtype=torch.float64)
        for i, (x, ref) in enumerate(zip(self.inputs, self.refs, strict=True)):

            def push(t: dict[str, Tensor], x: Any = x, ref: Tensor = ref) -> Tensor:
                return jvp(lambda th: self._z(th, x, ref), (self.params,), (t,))[1]

            jv = vmap(push)(tangents)
            if cache and self._vjp_cache is not None:
                fn = self._vjp_cache[i]
            else:
                _, fn = vjp(lambda th, x=x, ref=ref: self._z(th, x, ref), self.params)
            (grads,) = vmap(fn)(jv)
            out += torch.cat([grads[name].reshape(b, -1) for name in self.spec.names], dim=1).to(
                torch.float64
            )
        return out.T / self.n

    def quadratic_forms(self, v: Tensor) -> Tensor:
        """vᵀ H v for each column of a float64 block V (N, b): 1/n Σ_x ‖J_z(x) v‖² (forward mode)."""
        b = v.shape[1]
        tangents = {
            name: v[self.spec.slice(name)].T.reshape(b, *shape).to(self.dtype)
            for name, shape in zip(self.spec.names, self.spec.shapes, strict=True)
        }
        total = torch.zeros(b, dtype=torch.float64)
        for x, ref in zip(self.inputs, self.refs, strict=True):

            def push(t: dict[str, Tensor], x: Any = x, ref: Tensor = ref) -> Tensor:
                return jvp(lambda th: self._z(th, x, ref), (self.params,), (t,))[1]

            jv = vmap(push)(tangents)
            total += jv.to(torch.float64).pow(2).reshape(b, -1).sum(1)
        return total / self.n

    def quadratic_form(self, v: Tensor) -> float:
        """vᵀ H v = 1/n Σ_x ‖J_z(x) v‖² (forward mode only)."""
        tangent = {k: t.to(self.dtype) for k, t in self.spec.unflatten(v).items()}
        total = 0.0
        for x, ref in zip(self.inputs, self.refs, strict=True):
            _, jv = jvp(lambda th, x=x, ref=ref: self._z(th, x, ref), (self.params,), (tangent,))
            total += float(jv.to(torch.float64).pow(2).sum())
        return total / self.n

    def release(self) -> None:
        """Drop the cached backward graphs."""
        self._vjp_cache = None


# ---------------------------------------------------------------------------------------------------
# Lanczos, SLQ and Hutchinson on any symmetric PSD operator


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """w minus its projection on the rows of ``basis`` (classical Gram–Schmidt, twice)."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _lanczos_steps(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    *,
    generator: torch.Generator,
    stop: Callable[[Tensor, Tensor, float], bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalisation from ``start``: the tridiagonal (alphas, betas).

    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ. A breakdown (β ≈ 0: the Krylov space is invariant) restarts
    from a random vector orthogonal to the basis with a zero off-diagonal entry, so T stays the
    projection of the operator on an orthonormal basis. ``stop(alphas, betas, β_m)`` is asked after
    each step and may end the iteration.
    """
    n = start.numel()
    steps = min(steps, n)
    basis = torch.zeros(steps, n, dtype=torch.float64)
    alphas = torch.zeros(steps, dtype=torch.float64)
    betas = torch.zeros(steps, dtype=torch.float64)
    q = start.to(torch.float64)
    q = q / q.norm()
    scale = 0.0
    m = 0
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        alphas[j] = torch.dot(q, w)
        w = _orthogonalize(w, basis[: j + 1])
        m = j + 1
        beta = float(w.norm())
        scale = max(scale, abs(float(alphas[j])), beta)
        if stop is not None and stop(alphas[:m], betas[: m - 1], beta):
            break
        if j == steps - 1:
            break
        if beta <= 1e-10 * max(scale, 1e-300):
            w = _orthogonalize(torch.randn(n, dtype=torch.float64, generator=generator), basis[: j + 1])
            q = w / w.norm()
            betas[j] = 0.0
        else:
            betas[j] = beta
            q = w / beta
    return alphas[:m], betas[: m - 1]


def _tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    t = torch.diag(alphas)
    if betas.numel():
        t = t + torch.diag(betas, 1) + torch.diag(betas, -1)
    return t


def lanczos_top(
    matvec: Callable[[Tensor], Tensor],
    size: int,
    k: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-8,
    seed: int = 0,
) -> tuple[Tensor, Tensor, int]:
    """The k largest eigenvalues of a symmetric PSD operator by Lanczos with full reorthogonalisation.

    Stops when the residual bound |β_m · y_{m,i}| of each of the top-k Ritz pairs (θ_i, Q_m y_i) is at
    most ``tol · λ_max``, checked every 5 steps, or after ``max_iter`` products (default
    min(N, max(3k, k + 50))).

    Returns:
        (eigenvalues descending (k,), residual bounds (k,), number of operator products).
    """
    k = min(k, size)
    max_iter = min(size, max_iter or max(3 * k, k + 50))
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(size, dtype=torch.float64, generator=generator)
    state: dict[str, Tensor] = {}

    def stop(alphas: Tensor, betas: Tensor, beta_m: float) -> bool:
        m = alphas.numel()
        if m < k or ((m - k) % 5 and m < max_iter):
            return False
        values, vectors = eigh(_tridiagonal(alphas, betas))
        order = torch.argsort(values, descending=True)[:k]
        state["residuals"] = (beta_m * vectors[-1, order]).abs()
        return bool((state["residuals"] <= tol * max(float(values.max()), 1e-300)).all())

    alphas, betas = _lanczos_steps(matvec, start, max_iter, generator=generator, stop=stop)
    values = eigh(_tridiagonal(alphas, betas))[0]
    top = values.flip(0)[:k].clamp_min(0.0)
    residuals = state.get("residuals", torch.full((k,), float("nan"), dtype=torch.float64))
    if top.numel() < k:
        top = torch.cat([top, torch.zeros(k - top.numel(), dtype=torch.float64)])
    return top, residuals, int(alphas.numel())


def block_krylov_top(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    k: int,
    *,
    block_size: int = 16,
    max_vectors: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
) -> tuple[Tensor, Tensor, int]:
    """The k largest eigenvalues of a symmetric PSD operator by block Lanczos (full reorthogonalisation).

    The Krylov basis Q grows by blocks Q_{j+1} R_j = (I − QQᵀ) H Q_j; T = Qᵀ H Q is assembled from the
    same products and its top Ritz values are returned. With H Q = Q T + Q_{j+1} R_j E_jᵀ the residual
    of Ritz pair (θ_i, Q y_i) is ‖R_j y_i[last block]‖; iteration stops when the top-k residuals are at
    most ``tol · λ_max`` or after ``max_vectors`` products (default min(N, max(3k, k + 100))). A
    rank-deficient block (invariant subspace) is refilled with random directions orthogonal to Q.
    ``block_size=1`` is plain Lanczos.

    Returns:
        (eigenvalues descending (k,), residual bounds (k,), number of operator products).
    """
    k = min(k, size)
    b = max(1, min(block_size, size))
    max_vectors = min(size, max_vectors or max(3 * k, k + 100))
    max_vectors = max(max_vectors, min(size, k + b))
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(max_vectors + b, size, dtype=torch.float64)  # rows: contiguous slices
    t = torch.zeros(max_vectors + b, max_vectors + b, dtype=torch.float64)
    block = torch.linalg.qr(torch.randn(size, b, dtype=torch.float64, generator=generator))[0].T
    m = 0
    values = torch.zeros(0, dtype=torch.float64)
    residuals = torch.full((k,), float("nan"), dtype=torch.float64)
    while True:
        width = block.shape[0]
        basis[m : m + width] = block
        w = matmat(block.T.contiguous()).T.contiguous()  # (width, size)
        t[: m + width, m : m + width] = basis[: m + width] @ w.T
        t[m : m + width, :m] = t[:m, m : m + width].T
        m += width
        q = basis[:m]
        for _ in range(2):
            w = w - (w @ q.T) @ q
        values, vectors = eigh(0.5 * (t[:m, :m] + t[:m, :m].T))
        order = torch.argsort(values, descending=True)[:k]
        next_block, r = torch.linalg.qr(w.T)
        scale = max(float(values.max()), 1e-300)
        residuals = (r @ vectors[m - width : m, order]).norm(dim=0)
        if order.numel() >= k and bool((residuals <= tol * scale).all()):
            break
        room = min(b, size - m, max_vectors - m)
        if room <= 0:
            break
        # columns of w that vanished (invariant subspace): refill with random orthogonal directions
        weak = torch.diagonal(r).abs() <= 1e-10 * scale
        if bool(weak.any()):
            fill = torch.randn(size, width, dtype=torch.float64, generator=generator)
            next_block = torch.where(weak[None, :], fill, next_block)
            for _ in range(2):
                next_block = next_block - q.T @ (q @ next_block)
            next_block = torch.linalg.qr(next_block)[0]
        block = next_block[:, :room].T
    top = values.flip(0)[:k].clamp_min(0.0)
    if top.numel() < k:
        top = torch.cat([top, torch.zeros(k - top.numel(), dtype=torch.float64)])
        residuals = torch.cat(
            [residuals, torch.full((k - residuals.numel(),), float("nan"), dtype=torch.float64)]
        )
    return top, residuals, m


def slq_nodes(
    matvec: Callable[[Tensor], Tensor],
    size: int,
    *,
    probes: int = 8,
    steps: int = 40,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Stochastic Lanczos quadrature: for each Rademacher probe v, Lanczos nodes θ_j and weights τ_j.

    tr f(H) ≈ N · mean over probes of Σ_j τ_j f(θ_j) (Ubaru, Chen & Saad 2017); with f = 1[λ > ε]
    this estimates the rank at ε.
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(probes):
        v = torch.randint(0, 2, (size,), generator=generator).to(torch.float64) * 2 - 1
        alphas, betas = _lanczos_steps(matvec, v, steps, generator=generator)
        values, vectors = eigh(_tridiagonal(alphas, betas))
        out.append((values.clamp_min(0.0), vectors[0].pow(2)))
    return out


def slq_nodes_batched(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    *,
    probes: int = 8,
    steps: int = 40,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`slq_nodes` with the probes run side by side: one block product per Lanczos step.

    Each probe keeps its own Lanczos recurrence with full reorthogonalisation against its own basis;
    a probe whose Krylov space becomes invariant (β ≈ 0) stops there (its quadrature is then exact).
    """
    generator = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 2, (size, probes), generator=generator).to(torch.float64) * 2 - 1
    q = v / v.norm(dim=0, keepdim=True)
    steps = min(steps, size)
    basis = torch.zeros(steps, size, probes, dtype=torch.float64)
    alphas = torch.zeros(steps, probes, dtype=torch.float64)
    betas = torch.zeros(steps, probes, dtype=torch.float64)
    length = torch.full((probes,), steps, dtype=torch.long)
    active = torch.ones(probes, dtype=torch.bool)
    scale = torch.zeros(probes, dtype=torch.float64)
    for j in range(steps):
        basis[j] = q
        w = matmat(q)
        alphas[j] = (q * w).sum(0)
        for _ in range(2):
            w = w - torch.einsum("jnp,jp->np", basis[: j + 1], torch.einsum("jnp,np->jp", basis[: j + 1], w))
        beta = w.norm(dim=0)
        scale = torch.maximum(scale, torch.maximum(alphas[j].abs(), beta))
        broke = active & (beta <= 1e-10 * scale.clamp_min(1e-300))
        length[broke] = j + 1
        active &= ~broke
        if j == steps - 1 or not bool(active.any()):
            break
        betas[j] = torch.where(active, beta, torch.zeros_like(beta))
        q = torch.where(active[None, :], w / beta.clamp_min(1e-300)[None, :], q)
    out = []
    for p in range(probes):
        m = int(length[p])
        values, vectors = eigh(_tridiagonal(alphas[:m, p], betas[: m - 1, p]))
        out.append((values.clamp_min(0.0), vectors[0].pow(2)))
    return out


def hutchinson_trace(
    quadratic_form: Callable[[Tensor], Any],
    size: int,
    *,
    probes: int = 16,
    seed: int = 0,
    batched: bool = False,
    block_size: int = 16,
) -> tuple[float, float]:
    """Hutchinson's estimate of tr H = E[vᵀHv] (Rademacher v): (mean, standard error).

    ``quadratic_form(v)`` takes one vector (N,), or with ``batched`` a block (N, b) and returns the b
    values.
    """
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randint(0, 2, (size, probes), generator=generator).to(torch.float64) * 2 - 1
    if batched:
        t = torch.cat(
            [
                torch.as_tensor(quadratic_form(vectors[:, i : i + block_size]), dtype=torch.float64)
                for i in range(0, probes, block_size)
            ]
        )
    else:
        t = torch.tensor([float(quadratic_form(vectors[:, i])) for i in range(probes)], dtype=torch.float64)
    values = t.tolist()
    stderr = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), stderr


def psd_eigenvalues(gram: Tensor) -> Tensor:
    """All eigenvalues of a PSD Gram matrix, descending, clamped at 0.

    Rows with an exactly zero diagonal are zero rows (|G_ij|² ≤ G_ii G_jj) — e.g. the incoming
    weights of a dead neuron or the weights of an input that is always 0 — and contribute exact zero
    eigenvalues; they are removed before ``eigvalsh``, whose cost is cubic in the size.
    """
    keep = torch.diagonal(gram) > 0
    reduced = gram[keep][:, keep] if not bool(keep.all()) else gram
    values = torch.linalg.eigvalsh(reduced).flip(0).clamp_min(0.0)
    missing = gram.shape[0] - values.numel()
    if missing:
        values = torch.cat([values, torch.zeros(missing, dtype=values.dtype)])
    return values


# ---------------------------------------------------------------------------------------------------
# Result


@dataclass
class HessianSpectrum:
    """The spectrum of the behavioral-loss Hessian at θ* (float64, descending).

    Attributes:
        eigenvalues: all N eigenvalues (``method="exact"``) or the top k (``"lanczos"``).
        num_parameters: N, the nominal parameter count.
        method: ``"exact"`` or ``"lanczos"``.
        kind: ``"mse"`` or ``"kl"`` (the behavioral loss whose Hessian this is).
        num_examples: n.
        floor: numerical zero: eigenvalues at or below it count as zero at every ε.
        trace: exact trace (exact path) or Hutchinson's estimate; ``trace_stderr`` its standard error.
        residuals: Lanczos residual bounds of the top-k Ritz values.
        density: SLQ nodes and weights per probe (for :meth:`rank_estimate`).
        gram_side: ``"parameters"`` (JᵀJ) or ``"outputs"`` (J Jᵀ) for the exact path.
        timings: seconds per stage.
        config: the arguments of the call.
    """

    eigenvalues: Tensor
    num_parameters: int
    method: str
    kind: str
    num_examples: int
    floor: float
    trace: float | None = None
    trace_stderr: float | None = None
    residuals: Tensor | None = None
    density: list[tuple[Tensor, Tensor]] | None = None
    gram_side: str | None = None
    matvecs: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every eigenvalue is known (exact path)."""
        return self.eigenvalues.numel() == self.num_parameters

    def threshold(self, epsilon: float = 0.0, *, relative: bool = False) -> float:
        top = float(self.eigenvalues.max()) if self.eigenvalues.numel() else 0.0
        return max(epsilon * top if relative else epsilon, self.floor)

    def rank(self, epsilon: float = 0.0, *, relative: bool = False) -> int:
        """Number of eigenvalues above ε (``relative``: above ε·λ_max), and above the numerical floor.

        Needs every eigenvalue unless the k-th one is already below the threshold; otherwise use
        :meth:`rank_estimate`.
        """
        threshold = self.threshold(epsilon, relative=relative)
        count = int((self.eigenvalues > threshold).sum())
        if not self.complete and count == self.eigenvalues.numel():
            raise ValueError(
                f"only the top {self.eigenvalues.numel()} eigenvalues are known and all exceed "
                f"{threshold:g}; "
                "use rank_estimate() (stochastic, needs rank_probes > 0) or method='exact'"
            )
        return count

    def nullity(self, epsilon: float = 0.0, *, relative: bool = False) -> int:
        """N − rank: the number of free directions of the quadratic approximation at scale ε."""
        return self.num_parameters - self.rank(epsilon, relative=relative)

    def rank_estimate(self, epsilon: float = 0.0, *, relative: bool = False) -> tuple[float, float]:
        """(rank, standard error) at ε: exact when complete, else from the SLQ density."""
        if self.complete:
            return float(self.rank(epsilon, relative=relative)), 0.0
        if not self.density:
            raise ValueError("no stochastic density was computed: pass rank_probes > 0")
        threshold = self.threshold(epsilon, relative=relative)
        per_probe = torch.tensor(
            [float((w * (v > threshold)).sum()) * self.num_parameters for v, w in self.density],
            dtype=torch.float64,
        )
        lower = int((self.eigenvalues > threshold).sum())
        mean = max(float(per_probe.mean()), float(lower))
        stderr = float(per_probe.std() / math.sqrt(len(per_probe))) if len(per_probe) > 1 else float("nan")
        return mean, stderr

    def __len__(self) -> int:
        return int(self.eigenvalues.numel())

    def to_dict(self) -> dict[str, Any]:
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "num_parameters": self.num_parameters,
            "method": self.method,
            "kind": self.kind,
            "num_examples": self.num_examples,
            "floor": self.floor,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "residuals": None if self.residuals is None else self.residuals.tolist(),
            "density": None
            if self.density is None
            else [{"nodes": v.tolist(), "weights": w.tolist()} for v, w in self.density],
            "gram_side": self.gram_side,
            "matvecs": self.matvecs,
            "timings": self.timings,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HessianSpectrum:
        f64 = torch.float64
        return cls(
            eigenvalues=torch.tensor(d["eigenvalues"], dtype=f64),
            num_parameters=int(d["num_parameters"]),
            method=d["method"],
            kind=d["kind"],
            num_examples=int(d["num_examples"]),
            floor=float(d["floor"]),
            trace=d.get("trace"),
            trace_stderr=d.get("trace_stderr"),
            residuals=None if d.get("residuals") is None else torch.tensor(d["residuals"], dtype=f64),
            density=None
            if d.get("density") is None
            else [
                (torch.tensor(p["nodes"], dtype=f64), torch.tensor(p["weights"], dtype=f64))
                for p in d["density"]
            ],
            gram_side=d.get("gram_side"),
            matvecs=d.get("matvecs"),
            timings=dict(d.get("timings", {})),
            config=dict(d.get("config", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary file + ``os.replace``)."""
        return _atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> HessianSpectrum:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _atomic_write_json(path: Path, payload: Any) -> Path:
    atomic_write_text(path, json.dumps(payload, indent=2))
    return path


# ---------------------------------------------------------------------------------------------------
# Public entry points


def _choose_method(method: str, hessian: BehavioralHessian, max_exact: int) -> str:
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"method must be 'auto', 'exact' or 'lanczos', got {method!r}")
    if method != "auto":
        return method
    side = min(hessian.num_parameters, hessian.n * hessian.rows)
    return "exact" if side <= max_exact else "lanczos"


def hessian_analysis(
    model: nn.Module,
    data: Any,
    *,
    kind: LossKind = "mse",
    method: Method = "auto",
    k: int = 50,
    batch_size: int | None = None,
    position: int | None = None,
    forward: ForwardFn | None = None,
    dtype: torch.dtype | None = None,
    max_exact: int = 6000,
    max_iter: int | None = None,
    tol: float = 1e-4,
    block_size: int = 16,
    trace_probes: int = 0,
    rank_probes: int = 0,
    rank_steps: int = 40,
    chunk_size: int | None = 64,
    seed: int = 0,
) -> HessianSpectrum:
    """Spectrum of the behavioral-loss Hessian at the model's parameters, with rank and trace.

    Args:
        model: the network at θ*.
        data: the dataset D (anything :func:`degeneracy.data.iter_batches` reads).
        kind: ``"mse"`` (paper eq 6; H = (2/n) Σ JᵀJ) or ``"kl"`` (H = Fisher).
        method: ``"exact"`` (all N eigenvalues), ``"lanczos"`` (top k) or ``"auto"`` (exact when the
            smaller Gram side is at most ``max_exact``).
        k: number of top eigenvalues for Lanczos.
        batch_size, position, forward: see :func:`degeneracy.accounting.behavioral_loss`.
        dtype: dtype of the Jacobian computations; default float64 for ``exact``, the model's for
            ``lanczos`` (whose vectors and reorthogonalisation are float64 regardless).
        max_iter, tol, block_size: block Lanczos limits (see :func:`block_krylov_top`): at most
            ``max_iter`` Hessian-vector products, residuals ≤ ``tol·λ_max``, ``block_size`` products
            batched per step (``1``: plain Lanczos).
        trace_probes: Hutchinson probes (0: none; the exact path always has the exact trace).
        rank_probes, rank_steps: SLQ probes and Lanczos steps per probe (0: none) for the rank at any ε.
        chunk_size: vmap chunk of the exact path.
        seed: seeds every random vector.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    resolved = method
    if method == "exact" and dtype is None:
        dtype = torch.float64
    hessian = BehavioralHessian(
        model, data, kind, batch_size=batch_size, position=position, forward=forward, dtype=dtype
    )
    resolved = _choose_method(method, hessian, max_exact)
    if resolved == "exact" and dtype is None and hessian.dtype != torch.float64:
        hessian = BehavioralHessian(
            model, data, kind, batch_size=batch_size, position=position, forward=forward, dtype=torch.float64
        )
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
        "position": position,
        "dtype": str(hessian.dtype).replace("torch.", ""),
        "trace_probes": trace_probes,
        "rank_probes": rank_probes,
        "rank_steps": rank_steps,
        "seed": seed,
    }
    n_params = hessian.num_parameters
    if resolved == "exact":
        t = time.perf_counter()
        gram, side = hessian.gram(chunk_size)
        timings["gram"] = time.perf_counter() - t
        t = time.perf_counter()
        values = psd_eigenvalues(gram)
        timings["eigvalsh"] = time.perf_counter() - t
        if values.numel() < n_params:
            values = torch.cat([values, torch.zeros(n_params - values.numel(), dtype=torch.float64)])
        top = float(values[0]) if values.numel() else 0.0
        result = HessianSpectrum(
            eigenvalues=values,
            num_parameters=n_params,
            method="exact",
            kind=kind,
            num_examples=hessian.n,
            floor=numerical_floor(top, max(gram.shape[0], 1), hessian.dtype),
            trace=float(torch.diagonal(gram).sum()),
            gram_side=side,
            config=config,
        )
    else:
        t = time.perf_counter()
        counter = {"n": 0}

        def matvec(v: Tensor) -> Tensor:
            counter["n"] += 1
            return hessian.matvec(v)

        def matmat(v: Tensor) -> Tensor:
            counter["n"] += v.shape[1]
            return hessian.matmat(v)

        values, residuals, _ = block_krylov_top(
            matmat, n_params, k, block_size=block_size, max_vectors=max_iter, tol=tol, seed=seed
        )
        timings["lanczos"] = time.perf_counter() - t
        top = float(values[0]) if values.numel() else 0.0
        result = HessianSpectrum(
            eigenvalues=values,
            num_parameters=n_params,
            method="lanczos",
            kind=kind,
            num_examples=hessian.n,
            floor=numerical_floor(top, n_params, hessian.dtype, operator=True),
            residuals=residuals,
            config=config,
        )
        if rank_probes > 0:
            t = time.perf_counter()
            result.density = slq_nodes_batched(
                matmat, n_params, probes=rank_probes, steps=rank_steps, seed=seed + 1
            )
            timings["slq"] = time.perf_counter() - t
        result.matvecs = counter["n"]
        if trace_probes > 0:
            t = time.perf_counter()
            result.trace, result.trace_stderr = hutchinson_trace(
                hessian.quadratic_forms, n_params, probes=trace_probes, seed=seed + 2, batched=True
            )
            timings["trace"] = time.perf_counter() - t
        hessian.release()
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    return result


def hessian_spectrum(
    model: nn.Module,
    data: Any,
    *,
    kind: LossKind = "mse",
    method: Method = "auto",
    k: int = 50,
    batch_size: int | None = None,
    position: int | None = None,
    forward: ForwardFn | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Tensor:
    """Eigenvalues (float64, descending) of the behavioral-loss Hessian at the model's parameters.

    All N of them with ``method="exact"`` (zeros included), the top ``k`` with ``"lanczos"``. The
    Hessian is H = 1/n Σ_x J_zᵀ J_z (module docstring); for the paper's MSE loss (eq 6) H = (2/n) Σ JᵀJ.
    For rank, trace, density and saving, use :func:`hessian_analysis`, which takes the same arguments
    (``options``) and returns a :class:`HessianSpectrum`.
    """
    return hessian_analysis(
        model,
        data,
        kind=kind,
        method=method,
        k=k,
        batch_size=batch_size,
        position=position,
        forward=forward,
        dtype=dtype,
        **options,
    ).eigenvalues
