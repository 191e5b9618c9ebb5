"""The behavioral-loss Hessian at θ* as an object: exact Jacobian Grams and Hessian-vector products.

At θ = θ* the behavioral loss and its gradient vanish, so its Hessian is the Gram matrix of the
(whitened) per-example output gradients (paper eq 10, METHOD §6):

    H = 1/n Σ_x J_z(x)ᵀ J_z(x),    J_z = A ∂f/∂θ   ((rows × N) per example)

with A from :func:`degeneracy.behavioral.whiten_outputs` (A = √2·I for the MSE loss of eq 6, which
carries no ½: H = (2/n) Σ JᵀJ; A = diag(√p) − √p pᵀ for the KL variant: H is the Fisher matrix).
Outputs at several positions are flattened into the rows (the behavioral loss sums over positions).

:class:`BehavioralHessian` holds the model, the data and the reference outputs, and gives

* the exact Gram on the smaller side (:meth:`BehavioralHessian.gram`), from per-example Jacobians
  (``torch.func.vmap`` over ``jacrev``) or, for chains of ``nn.Linear`` maps, the Kronecker form of
  eq 11 (:func:`degeneracy.accounting.kronecker.linear_gram`);
* products H v, H V and quadratic forms vᵀHv by ``torch.func.jvp``/``vjp`` (no N × N matrix), for
  the Krylov methods of :mod:`degeneracy.linalg.krylov`.

>>> import torch
>>> h = BehavioralHessian(torch.nn.Linear(2, 1, bias=False).double(), torch.eye(2, dtype=torch.float64))
>>> h.gram()[0].round(decimals=12).tolist()   # (2/n) Σ x xᵀ with n = 2
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from degeneracy.accounting.kronecker import linear_gram
from degeneracy.behavioral import BehavioralProblem, LossKind, whiten_outputs
from degeneracy.distributed import all_gather_rows, all_reduce_sum
from degeneracy.progress import progress_bar
from degeneracy.run import (
    ParamLayout,
    model_device,
    shard,
)

__all__ = ["BehavioralHessian", "numerical_floor"]


def numerical_floor(largest: float, size: int, dtype: torch.dtype, *, operator: bool = False) -> float:
    """Numerical zero of a Hessian spectrum.

    Exact path (a float64 Gram of ``size`` square built from ``dtype`` Jacobians):
    λ_max · max(size·eps64, 100·size·eps(dtype)²). Operator path (``operator=True``: products computed in
    ``dtype``): λ_max · 100 · eps(dtype), the accuracy of a Hessian-vector product.

    >>> numerical_floor(1.0, 10, torch.float32, operator=True) == 100 * torch.finfo(torch.float32).eps
    True
    """
    eps = float(torch.finfo(dtype).eps)
    if operator:
        return float(largest) * 100.0 * eps
    eps64 = float(torch.finfo(torch.float64).eps)
    return float(largest) * max(size, 1) * max(eps64, 100.0 * eps**2)


class BehavioralHessian(BehavioralProblem):
    """H = 1/n Σ_x J_z(x)ᵀ J_z(x) at θ* for a model and a dataset; a state holder for the passes below.

    Built like its base :class:`degeneracy.behavioral.BehavioralProblem` (model at θ*, data read once and
    kept, ``kind``, ``batch_size``, ``positions``, ``forward``, ``dtype`` of the Jacobian computations).

    The flat parameter vector is :class:`degeneracy.run.ParamLayout` order (``named_parameters``).

    Under ``torch.distributed`` each rank keeps its share of the data (:func:`degeneracy.run.shard`;
    a list or loader of batches is taken as this rank's share already), ``n`` counts every rank's
    examples, and every Gram, product and quadratic form is summed over the ranks: each rank gets the
    single-process H. Products run on the model's device; vectors come back on their own.

    >>> h = BehavioralHessian(torch.nn.Linear(3, 2).double(), torch.ones(4, 3, dtype=torch.float64))
    >>> h.num_parameters, h.n, h.rows
    (8, 4, 2)
    """

    _vjp_cache: list[Callable[..., Any]] | None = None

    def __init__(self, model: nn.Module, data: Any, kind: LossKind = "mse", **options: Any) -> None:
        super().__init__(model, shard(data), kind, **options)
        self.local_n = self.n
        self.n = int(all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64)).item())

    @functools.cached_property
    def device(self) -> torch.device:
        """The model's device, where every product is computed."""
        return model_device(self.model)

    @functools.cached_property
    def layout(self) -> ParamLayout:
        """The flat parameter layout (``named_parameters`` order)."""
        return ParamLayout.of_model(self.model)

    @functools.cached_property
    def rows(self) -> int:
        """Output rows per example (positions × features of the analysed output) of the first batch."""
        return int(self.refs[0][0].numel())

    @functools.cached_property
    def total_rows(self) -> int:
        """Output rows of all the examples, every rank's (batches of sequences may differ in length)."""
        local = torch.tensor([float(sum(ref.numel() for ref in self.refs))], dtype=torch.float64)
        return int(all_reduce_sum(local).item())

    @property
    def num_parameters(self) -> int:
        """N, the length of the flat parameter vector."""
        return self.layout.numel

    @property
    def position(self) -> int | None:
        """Deprecated name of :attr:`positions`."""
        return self.positions

    def whitened(self, params: dict[str, Tensor], inputs: Any, ref: Tensor) -> Float[Tensor, "batch rows"]:
        """z = A f_θ(x) on one batch (``ref``: the reference outputs f_θ*(x) of that batch)."""
        return whiten_outputs(self.output(params, inputs), ref, self.kind)

    def batches(self) -> Iterator[tuple[Any, Tensor]]:
        """(cast inputs, reference outputs) of each batch."""
        return zip(self.inputs, self.refs, strict=True)

    # -- exact ---------------------------------------------------------------------------------------
    def jacobian_blocks(self, chunk_size: int | None = 64) -> Iterator[Tensor]:
        """Yield the per-example whitened Jacobians J_z of each batch, as ``(batch·rows, N)`` tensors."""

        def z_single(theta: dict[str, Tensor], x: Any, ref: Tensor) -> Tensor:
            xb = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), x)
            return self.whitened(theta, xb, ref.unsqueeze(0))[0]

        batched_fn = vmap(jacrev(z_single), in_dims=(None, 0, 0), chunk_size=chunk_size)
        one_fn = jacrev(z_single)
        looped = False

        def looped_fn(params: dict[str, Tensor], part: Any, refs: Tensor) -> dict[str, Tensor]:
            rows = [
                one_fn(params, torch.utils._pytree.tree_map(lambda t, i=i: t[i], part), refs[i])
                for i in range(refs.shape[0])
            ]
            return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

        def jac_fn(params: dict[str, Tensor], part: Any, refs: Tensor) -> dict[str, Tensor]:
            nonlocal looped
            if not looped:
                try:
                    return batched_fn(params, part, refs)
                except RuntimeError as error:  # an operation without a vmap batching rule (nn.GRU, ...)
                    looped = True
                    warnings.warn(
                        f"the model cannot be vectorised over examples with torch.func.vmap "
                        f"({str(error).splitlines()[0]}); the Hessian's Jacobians are computed one example "
                        "after another (slower)",
                        UserWarning,
                        stacklevel=4,
                    )
            return looped_fn(params, part, refs)
        bar = progress_bar(self.n, "Hessian", getattr(self, "progress", False))  # examples, rate, ETA
        try:
            for x, ref in self.batches():
                b = ref.shape[0]
                step = chunk_size or b  # vmap's own chunks, run one by one: the bar moves per chunk
                parts = []
                for start in range(0, b, step):
                    end = min(b, start + step)
                    part = torch.utils._pytree.tree_map(lambda t, s=start, e=end: t[s:e], x)
                    parts.append(jac_fn(self.params, part, ref[start:end]))
                    bar.update(end - start)
                jac = {name: torch.cat([p[name] for p in parts]) for name in self.layout.names}
                rows = int(ref[0].numel())  # this batch's (sequence lengths may differ between batches)
                yield torch.cat(
                    [jac[name].reshape(b, rows, -1) for name in self.layout.names], dim=2
                ).reshape(b * rows, self.num_parameters)
        finally:
            bar.close()

    def gram(self, chunk_size: int | None = 64) -> tuple[Tensor, str]:
        """The float64 Gram on the smaller side: (H, "parameters") or (1/n J_z J_zᵀ, "outputs").

        Models made only of ``nn.Linear`` maps (plus parameter-free layers) on (batch, d) activations
        use the Kronecker form of eq 11 (:meth:`linear_gram`, the same H in another order of the
        parameters, n·N² instead of n·rows·N² operations).
        """
        total_rows = self.total_rows
        n_params = self.num_parameters
        if total_rows >= n_params:
            fast = self.linear_gram()
            if fast is not None:
                return fast.cpu(), "parameters"
            gram = torch.zeros(n_params, n_params, dtype=torch.float64, device=self.device)
            for block in self.jacobian_blocks(chunk_size):
                block = block.to(torch.float64)
                gram.addmm_(block.T, block)
            return (all_reduce_sum(gram) / self.n).cpu(), "parameters"
        blocks = [block.to(torch.float64) for block in self.jacobian_blocks(chunk_size)]
        empty = torch.zeros(0, n_params, dtype=torch.float64, device=self.device)
        jac = all_gather_rows(torch.cat(blocks, dim=0) if blocks else empty)  # every rank's rows
        return ((jac @ jac.T) / self.n).cpu(), "outputs"

    def linear_gram(self, batch_size: int = 256) -> Tensor | None:
        """H by eq 11 for chains of ``nn.Linear`` maps; ``None`` when that does not apply.

        See :func:`degeneracy.accounting.kronecker.linear_gram` (this rank's examples; summed over the
        ranks here).
        """
        gram = linear_gram(self, batch_size)
        return None if gram is None else all_reduce_sum(gram)

    # -- operator ------------------------------------------------------------------------------------
    def _flat(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.layout.flatten(tensors).to(torch.float64)

    def _vjps(self, cache: bool) -> Iterator[Callable[..., Any]]:
        """The VJP function of z at θ* for each batch (built once and kept when ``cache``)."""
        if cache and self._vjp_cache is None:
            self._vjp_cache = [
                vjp(lambda th, x=x, ref=ref: self.whitened(th, x, ref), self.params)[1]
                for x, ref in self.batches()
            ]
        for i, (x, ref) in enumerate(self.batches()):
            if cache and self._vjp_cache is not None:
                yield self._vjp_cache[i]
            else:
                yield vjp(lambda th, x=x, ref=ref: self.whitened(th, x, ref), self.params)[1]

    def _tangents(self, v: Tensor) -> dict[str, Tensor]:
        """A block V (N, b) as b stacked parameter dicts (name → (b, *shape)) in the compute dtype."""
        b = v.shape[1]
        return {
            name: v[self.layout.slice(name)].T.reshape(b, *shape).to(self.device, self.dtype)
            for name, shape in zip(self.layout.names, self.layout.shapes, strict=True)
        }

    def matvec(self, v: Tensor, *, cache: bool = True) -> Tensor:
        """H v for a flat float64 vector v (N,), via J_z v (jvp) and J_zᵀ(·) (vjp); float64 result.

        With ``cache`` the backward graphs of every batch are kept after the first call (more memory,
        one forward pass fewer per product).
        """
        tangent = {k: t.to(self.device, self.dtype) for k, t in self.layout.unflatten(v).items()}
        out = torch.zeros(self.num_parameters, dtype=torch.float64, device=self.device)
        for (x, ref), fn in zip(self.batches(), self._vjps(cache), strict=True):
            _, jv = jvp(lambda th, x=x, ref=ref: self.whitened(th, x, ref), (self.params,), (tangent,))
            (grad,) = fn(jv)
            out += self._flat(grad)
        return (all_reduce_sum(out) / self.n).to(v.device)

    def matmat(self, v: Tensor, *, cache: bool = True) -> Tensor:
        """H V for a float64 block V (N, b): b Hessian-vector products batched with ``vmap`` (float64).

        Much faster per vector than :meth:`matvec` on CPUs (the b tangents share every kernel).
        """
        b = v.shape[1]
        tangents = self._tangents(v)
        out = torch.zeros(b, self.num_parameters, dtype=torch.float64, device=self.device)
        for (x, ref), fn in zip(self.batches(), self._vjps(cache), strict=True):

            def push(t: dict[str, Tensor], x: Any = x, ref: Tensor = ref) -> Tensor:
                return jvp(lambda th: self.whitened(th, x, ref), (self.params,), (t,))[1]

            jv = vmap(push)(tangents)
            (grads,) = vmap(fn)(jv)
            out += torch.cat([grads[name].reshape(b, -1) for name in self.layout.names], dim=1).to(
                torch.float64
            )
        return (all_reduce_sum(out).T / self.n).to(v.device)

    def quadratic_forms(self, v: Tensor) -> Tensor:
        """vᵀ H v for each column of a float64 block V (N, b): 1/n Σ_x ‖J_z(x) v‖² (forward mode)."""
        b = v.shape[1]
        tangents = self._tangents(v)
        total = torch.zeros(b, dtype=torch.float64, device=self.device)
        for x, ref in self.batches():

            def push(t: dict[str, Tensor], x: Any = x, ref: Tensor = ref) -> Tensor:
                return jvp(lambda th: self.whitened(th, x, ref), (self.params,), (t,))[1]

            jv = vmap(push)(tangents)
            total += jv.to(torch.float64).pow(2).reshape(b, -1).sum(1)
        return (all_reduce_sum(total) / self.n).to(v.device)

    def quadratic_form(self, v: Tensor) -> float:
        """vᵀ H v = 1/n Σ_x ‖J_z(x) v‖² (forward mode only).

        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> h = BehavioralHessian(model, torch.eye(2, dtype=torch.float64))
        >>> round(h.quadratic_form(torch.tensor([1.0, 1.0], dtype=torch.float64)), 12)
        2.0
        """
        tangent = {k: t.to(self.device, self.dtype) for k, t in self.layout.unflatten(v).items()}
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, ref in self.batches():
            _, jv = jvp(lambda th, x=x, ref=ref: self.whitened(th, x, ref), (self.params,), (tangent,))
            total += jv.to(torch.float64).pow(2).sum()
        return float(all_reduce_sum(total)) / self.n

    def release(self) -> None:
        """Drop the cached backward graphs."""
        self._vjp_cache = None
