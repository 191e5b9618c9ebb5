"""The exact behavioral-loss Hessian of a chain of linear maps by its Kronecker form (paper eq 11).

For a site a = ``nn.Linear`` with input f^a (and the constant 1 when it has a bias) and output
p^a = W f̃^a, ∂z_r/∂W_ij = (∂z_r/∂p^a_i) f̃^a_j. Block (a, b) of H = 1/n Σ_x J_zᵀ J_z is therefore

    H_ab = 1/n Σ_x A_x ⊗ B_x,   A_x = Σ_r g^a_r g^bᵀ_r,   B_x = f̃^a f̃^bᵀ

with g^a_r = ∂z_r/∂p^a (the output Jacobian of site a). This costs n·N² operations instead of the
n·rows·N² of the per-example Jacobians. The activations f^a and p^a are read with
:func:`degeneracy.capture.capture`, and g^a is the Jacobian of the section p^a ↦ z
(:func:`degeneracy.capture.section`, one forward pass per site and batch).

>>> import torch
>>> from degeneracy.accounting.gauss_newton import BehavioralHessian
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
>>> x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
>>> h = BehavioralHessian(model, x)
>>> kron = linear_gram(h)
>>> generic = sum(b.T @ b for b in h.jacobian_blocks()) / h.n
>>> bool(torch.allclose(torch.linalg.eigvalsh(kron), torch.linalg.eigvalsh(generic), atol=1e-12))
True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from degeneracy.adapters.transformer_lens import is_hooked_transformer
from degeneracy.behavioral import whiten_outputs
from degeneracy.capture import OUTPUT, NodeLayer, capture, section
from degeneracy.run import model_device, model_dtype

__all__ = ["linear_gram"]


def _site_layers(names: list[str]) -> list[NodeLayer]:
    """Node layers reading each site's input and output, then the model output."""
    layers = []
    for name in names:
        layers.append(NodeLayer(f"{name}:input", (name,), read="input"))
        layers.append(NodeLayer(f"{name}:output", (name,), read="output"))
    return [*layers, NodeLayer(OUTPUT, (OUTPUT,))]


def linear_gram(hessian: Any, batch_size: int = 256) -> Tensor | None:
    """H via eq 11 for models whose parameters all sit in ``nn.Linear`` maps called once on (batch, d)
    inputs; ``None`` when that does not apply (then use the per-example Jacobians).

    ``hessian`` is a :class:`~degeneracy.accounting.gauss_newton.BehavioralHessian` (its model, cast
    inputs, reference outputs, loss kind and compute dtype).

    The result is H (float64) with the parameters of each site in [W | b] row-major order (a
    permutation of ``named_parameters`` order, which leaves the eigenvalues unchanged).

    >>> from degeneracy.accounting.gauss_newton import BehavioralHessian
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).double()
    >>> x = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> h = BehavioralHessian(model, x)
    >>> gram = linear_gram(h)  # N = 9 + 4 parameters; the same trace as the per-example Jacobians give
    >>> trace = sum(b.square().sum() for b in h.jacobian_blocks()) / h.n
    >>> gram.shape, bool(torch.isclose(gram.trace(), trace))
    (torch.Size([13, 13]), True)
    >>> linear_gram(BehavioralHessian(model, x, forward=lambda m, x: m(x))) is None  # a user forward
    True
    """
    from degeneracy.accounting.structure import discover_torch

    model = hessian.model
    if is_hooked_transformer(model) or hessian.forward is not None or hessian.positions is not None:
        return None
    if not all(isinstance(x, Tensor) and x.dim() == 2 for x in hessian.inputs):
        return None
    try:
        structure = discover_torch(model, hessian.inputs[0][:2].to(model_dtype(model)))
    except Exception:  # noqa: BLE001 - any failure means: use the generic path
        return None
    sites = structure.sites
    n_params = hessian.num_parameters
    if not sites or structure.covered_parameters() != n_params:
        return None
    sizes = [site.num_parameters for site in sites]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    if offsets[-1] != n_params:
        return None
    if model_dtype(model) != hessian.dtype:  # the Hessian's compute dtype (parameters and buffers cast)
        model = copy.deepcopy(model).to(hessian.dtype)
    layers = _site_layers([s.name for s in sites])
    gram = torch.zeros(n_params, n_params, dtype=torch.float64, device=model_device(model))
    for x_all, ref_all in hessian.batches():
        for start in range(0, x_all.shape[0], batch_size):
            x, ref = x_all[start : start + batch_size], ref_all[start : start + batch_size]
            acts = capture(model, x, layers, [layer.name for layer in layers[:-1]])
            if any(acts[f"{s.name}:input"].shape[1] != 1 for s in sites):
                return None  # a site read at several positions: not a (batch, d) chain
            jac = [_output_jacobian(model, x, ref, layers, s.name, acts, hessian.kind) for s in sites]
            feats = [_features(acts[f"{s.name}:input"][:, 0], s.has_bias) for s in sites]
            _accumulate(gram, jac, feats, sites, sizes, offsets)
    for ia in range(len(sites)):
        for ib in range(ia + 1, len(sites)):
            gram[offsets[ib] : offsets[ib + 1], offsets[ia] : offsets[ia + 1]] = gram[
                offsets[ia] : offsets[ia + 1], offsets[ib] : offsets[ib + 1]
            ].T
    return gram / hessian.n


def _output_jacobian(
    model: Any, x: Tensor, ref: Tensor, layers: list[NodeLayer], site: str, acts: dict[str, Tensor], kind: Any
) -> Tensor:
    """g^a: ∂z_r/∂p^a for every row r and example, ``(rows, batch, d_out)`` in float64."""
    p = acts[f"{site}:output"].detach().requires_grad_(True)  # (batch, 1, d_out)
    to_output = section(model, x, layers, f"{site}:output", OUTPUT)
    with torch.enable_grad():
        z = whiten_outputs(to_output(p).reshape(ref.shape), ref, kind)
    b, rows = z.shape
    eye = torch.eye(rows, dtype=z.dtype, device=z.device).unsqueeze(1).expand(rows, b, rows)
    (grad,) = torch.autograd.grad(z, [p], grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    if grad is None:  # the output does not depend on this site
        return torch.zeros(rows, b, p.shape[-1], dtype=torch.float64, device=p.device)
    return grad.reshape(rows, b, -1).to(torch.float64)


def _features(f: Tensor, bias: bool) -> Tensor:
    """f̃ = [f | 1] (with a bias) in float64, ``(batch, d_in_aug)``."""
    f = f.detach().to(torch.float64)
    if bias:
        f = torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64, device=f.device)], dim=1)
    return f


def _accumulate(
    gram: Tensor,
    jac: list[Tensor],
    feats: list[Tensor],
    sites: list[Any],
    sizes: list[int],
    offsets: list[int],
) -> None:
    """Add Σ_x A_x ⊗ B_x to the upper blocks (a ≤ b) of ``gram``."""
    b = feats[0].shape[0]
    for ia, sa in enumerate(sites):
        for ib in range(ia, len(sites)):
            sb = sites[ib]
            a_x = torch.einsum("rxi,rxk->xik", jac[ia], jac[ib]).reshape(b, -1)
            b_x = torch.einsum("xj,xl->xjl", feats[ia], feats[ib]).reshape(b, -1)
            block = (a_x.T @ b_x).view(sa.d_out, sb.d_out, sa.d_in_aug, sb.d_in_aug)
            block = block.permute(0, 2, 1, 3).reshape(sizes[ia], sizes[ib])
            gram[offsets[ia] : offsets[ia + 1], offsets[ib] : offsets[ib + 1]] += block
