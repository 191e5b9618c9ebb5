"""A faster chain-batched evaluation for models whose sampled parameters all sit in ``nn.Linear`` layers.

``torch.func.vmap`` + ``functional_call`` (the general path, :func:`vmap_behavioral_chain_loss`) costs
about a millisecond of Python per step whatever the model size, which dominates on small models. For
the common case where every sampled parameter belongs to an ``nn.Linear``, a copy of the model whose
linear layers carry a leading chain dimension (``baddbmm``) computes all chains in plain batched ops:
inputs ``(B, ...)`` are expanded to ``(C, B, ...)`` and every other module (activations, containers,
frozen layers) is reused as is. This needs the model's forward to treat leading dimensions as batch
dimensions, which is checked numerically against the vmap path (losses and gradients at perturbed
parameters) before it is used; when the check fails the vmap path is used instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import vmap

from degeneracy.behavioral import LossKind, behavioral_loss_from_outputs, check_kind, without_padding
from degeneracy.data import Batch, model_output_tensor
from degeneracy.llc.sgld import ChainLoss, seed_from
from degeneracy.run import ParamLayout, functional_output

__all__ = [
    "per_chain_behavioral",
    "vmap_behavioral_chain_loss",
    "sequential_behavioral_chain_loss",
    "ChainForward",
    "chain_batched_forward",
    "batched_behavioral_chain_loss",
    "chain_losses_agree",
]


def per_chain_behavioral(
    output: Float[Tensor, "chains batch *out"], reference: Float[Tensor, " batch *out"], kind: LossKind
) -> Float[Tensor, " chains"]:
    """The behavioral loss of each chain: ``output`` ``(C, batch, *out)`` against ``reference``
    ``(batch, *out)``, with the reductions of :func:`degeneracy.behavioral.behavioral_loss_from_outputs`
    per chain: summed over every dimension after the example dimension, averaged over examples.

    >>> out, ref = torch.zeros(2, 4, 3, 2), torch.ones(4, 3, 2)   # 2 chains, 4 sequences of 3 positions
    >>> per_chain_behavioral(out, ref, "mse").tolist()
    [6.0, 6.0]
    """
    check_kind(kind)
    chains, examples = output.shape[0], output.shape[1]
    if kind == "mse":
        per = (output - reference).square()
    else:
        ref_logp = torch.log_softmax(reference, dim=-1)
        per = ref_logp.exp() * (ref_logp - torch.log_softmax(output, dim=-1))
    return per.reshape(chains, examples, -1).sum(dim=2).mean(dim=1)


def _one_chain_behavioral(
    model: nn.Module, kind: LossKind
) -> Callable[[dict[str, Tensor], Any, Tensor], Tensor]:
    """``loss(params, inputs, reference)``: the behavioral loss of one chain's parameters, padded positions
    out of f_θ and f_θ* alike."""
    check_kind(kind)

    def one_chain(params: dict[str, Tensor], inputs: Any, reference: Tensor) -> Tensor:
        output = without_padding(functional_output(model, params, inputs), inputs)  # padded positions: 0
        return behavioral_loss_from_outputs(output, without_padding(reference, inputs), kind)

    return one_chain


def vmap_behavioral_chain_loss(model: nn.Module, kind: LossKind) -> ChainLoss:
    """The general path: ``vmap`` over chains of :func:`degeneracy.run.functional_output` + the
    behavioral loss. Items of the batch stream are ``(Batch, reference_outputs)``.

    >>> model = nn.Linear(2, 1).double()
    >>> x = torch.ones(3, 2, dtype=torch.float64)
    >>> params = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}  # 2 chains at θ*
    >>> vmap_behavioral_chain_loss(model, "mse")(params, (Batch(x), model(x).detach())).tolist()
    [0.0, 0.0]
    """
    batched = vmap(_one_chain_behavioral(model, kind), in_dims=(0, None, None))

    def chain_loss(views: dict[str, Tensor], item: tuple[Batch, Tensor]) -> Tensor:
        batch, reference = item
        return batched(views, batch.inputs, reference)

    return chain_loss


def sequential_behavioral_chain_loss(model: nn.Module, kind: LossKind) -> ChainLoss:
    """:func:`vmap_behavioral_chain_loss` one chain after another, for models that ``vmap`` cannot run
    (operations without a batching rule, such as ``nn.GRU`` and ``nn.LSTM``): the same losses.

    >>> model = nn.Linear(2, 1).double()
    >>> x = torch.ones(3, 2, dtype=torch.float64)
    >>> params = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}  # 2 chains at θ*
    >>> sequential_behavioral_chain_loss(model, "mse")(params, (Batch(x), model(x).detach())).tolist()
    [0.0, 0.0]
    """
    one_chain = _one_chain_behavioral(model, kind)

    def chain_loss(views: dict[str, Tensor], item: tuple[Batch, Tensor]) -> Tensor:
        batch, reference = item
        chains = next(iter(views.values())).shape[0]
        per_chain = [{n: v[c] for n, v in views.items()} for c in range(chains)]
        return torch.stack([one_chain(params, batch.inputs, reference) for params in per_chain])

    return chain_loss


class _ChainLinear(nn.Module):
    """``nn.Linear`` whose weight ``(C, out, in)`` and bias ``(C, out)`` carry a chain dimension; inputs
    are ``(C, *, in)``. Unsampled weights/biases stay unbatched."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.weight: Tensor = source.weight.detach()
        self.bias: Tensor | None = None if source.bias is None else source.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if weight.dim() == 3 and x.dim() == 3 and bias is not None and bias.dim() == 2:
            return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # one fused autograd node
        chains = x.shape[0]
        if weight.dim() == 3:
            flat = x.reshape(chains, -1, self.in_features)
            out = torch.bmm(flat, weight.transpose(1, 2)).reshape(*x.shape[:-1], self.out_features)
        else:
            out = torch.matmul(x, weight.t())
        if bias is None:
            return out
        if bias.dim() == 1:
            return out + bias
        return out + bias.reshape(chains, *([1] * (out.dim() - 2)), self.out_features)


ChainForward = Callable[[dict[str, Tensor], Tensor], Tensor]
"""``forward(views, inputs) -> outputs``: the model's output tensor for every chain, ``(C, batch, *out)``,
from parameters ``views`` with a leading chain dimension and inputs ``(batch, ...)``."""


def chain_batched_forward(model: nn.Module, sampled: list[str]) -> ChainForward | None:
    """All chains' outputs in plain batched ops (a copy of ``model`` whose ``nn.Linear`` layers carry a
    chain dimension), or ``None`` when some sampled parameter is not the weight or bias of an
    ``nn.Linear`` (exact class). Tensor inputs only (a ``TypeError`` otherwise).

    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    >>> params = {n: p.detach().expand(4, *p.shape) for n, p in model.named_parameters()}
    >>> chain_batched_forward(model, list(params))(params, torch.ones(5, 2, dtype=torch.float64)).shape
    torch.Size([4, 5, 1])
    """
    owners: dict[str, tuple[str, str]] = {}
    linear_names = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    for pname in sampled:
        module_name, _, attr = pname.rpartition(".")
        if module_name not in linear_names or attr not in ("weight", "bias"):
            return None
        owners[pname] = (module_name, attr)
    clone = copy.deepcopy(model)
    chain_modules: dict[str, _ChainLinear] = {}
    for module_name in {m for m, _ in owners.values()}:
        parent_name, _, child = module_name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        replacement = _ChainLinear(clone.get_submodule(module_name))  # type: ignore[arg-type]
        setattr(parent, child, replacement)
        chain_modules[module_name] = replacement
    slots = [(pname, chain_modules[m], attr) for pname, (m, attr) in owners.items()]

    def forward(views: dict[str, Tensor], inputs: Tensor) -> Tensor:
        if not isinstance(inputs, Tensor):
            raise TypeError("the batched path takes tensor inputs only")
        for pname, module, attr in slots:
            module.__dict__[attr] = views[pname]  # plain attributes: skip nn.Module.__setattr__
        chains = views[slots[0][0]].shape[0]
        return model_output_tensor(clone(inputs.expand(chains, *inputs.shape)))

    return forward


def batched_behavioral_chain_loss(
    model: nn.Module, sampled: list[str], kind: LossKind, forward: ChainForward | None = None
) -> ChainLoss | None:
    """The fast path: the behavioral loss of ``forward``'s outputs (default: :func:`chain_batched_forward`
    of ``model``), or ``None`` when there is no such forward (some sampled parameter is not the weight or
    bias of an ``nn.Linear``, exact class). Inputs must be a plain tensor (checked per call).

    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> params = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}
    >>> fast = batched_behavioral_chain_loss(model, list(params), "mse")
    >>> fast(params, (Batch(x), model(x).detach())).tolist()
    [0.0, 0.0]
    """
    forward = forward or chain_batched_forward(model, sampled)
    if forward is None:
        return None

    def chain_loss(views: dict[str, Tensor], item: tuple[Batch, Tensor]) -> Tensor:
        batch, reference = item
        return per_chain_behavioral(forward(views, batch.inputs), reference, kind)  # type: ignore[arg-type]

    return chain_loss


def chain_losses_agree(
    first: ChainLoss,
    second: ChainLoss,
    layout: ParamLayout,
    center: Tensor,
    item: Any,
    seed: int = 0,
    scale: float = 1e-2,
) -> bool:
    """Whether two chain losses give the same losses and gradients on two chains at distinct random
    perturbations of ``center`` (relative tolerance 1e-4 in float32, 1e-9 in float64).

    >>> model = nn.Sequential(nn.Linear(2, 1)).double()
    >>> layout = ParamLayout.of_model(model)
    >>> center = layout.flatten(dict(model.named_parameters())).detach()
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> item = (Batch(x), model(x).detach())
    >>> fast = batched_behavioral_chain_loss(model, list(layout.names), "mse")
    >>> chain_losses_agree(fast, vmap_behavioral_chain_loss(model, "mse"), layout, center, item)
    True
    """
    generator = torch.Generator(device=center.device).manual_seed(seed_from(seed, 0xC4EC))
    noise = torch.randn((2, center.numel()), generator=generator, dtype=center.dtype, device=center.device)
    spread = center.abs().mean().clamp_min(1e-3)
    theta = center.unsqueeze(0) + scale * spread * noise
    rtol = 1e-9 if center.dtype == torch.float64 else 1e-4

    def evaluate(fn: Callable[[dict[str, Tensor], Any], Tensor]) -> tuple[Tensor, Tensor]:
        leaf = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            losses = fn(layout.unflatten(leaf), item)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grad

    try:
        a_loss, a_grad = evaluate(first)
        b_loss, b_grad = evaluate(second)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, NotImplementedError):
        return False
    if a_loss.shape != b_loss.shape or not (torch.isfinite(a_loss).all() and torch.isfinite(b_loss).all()):
        return False
    loss_ok = torch.allclose(a_loss, b_loss, rtol=rtol, atol=rtol * float(a_loss.abs().max()) + 1e-30)
    grad_tol = rtol * float(a_grad.abs().max()) + 1e-30
    return bool(loss_ok and torch.allclose(a_grad, b_grad, rtol=rtol, atol=grad_tol))
