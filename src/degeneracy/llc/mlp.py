"""A chain-batched engine with a hand-written backward, for stacks of ``nn.Linear`` and element-wise
activations (issue 13's speed targets).

The general batched engine (:mod:`degeneracy.llc.batched`) runs every chain's forward in plain batched
ops and lets autograd differentiate it; on small networks autograd's bookkeeping, the per-chain loss
calls and softmax kernels over a short last dimension cost several times the matmuls. For a model whose
forward is a chain ``Linear → activation → Linear → ...`` (traced with ``torch.fx``; activations ReLU,
LeakyReLU, Tanh, Sigmoid, SiLU, GELU, Identity) and whose sampled parameters are exactly those linear
layers' weights and biases, :class:`MLPChainLoss` computes all chains' losses and gradients itself:

* activations are kept feature-major, ``(chains, features, batch)``: every layer is one ``baddbmm``
  of the chain's weight view into the flat parameters θ ``(C, P)``, and reductions over classes run
  along a strided dimension (softmax over 10 classes: 7 µs instead of 155 µs on 4 × 256 outputs);
* the backward is the transposed matmuls written straight into the flat gradient buffer, and the
  activations' derivatives are the aten kernels autograd itself uses;
* the loss head: cross-entropy and mean squared error on labels by their closed-form gradient (also
  when the user's ``loss(model, batch)`` is recognised as one of them, see :func:`recognise_loss`), the
  behavioral losses likewise, or else the user's loss called once per chain on that chain's outputs
  with autograd through the loss alone.

The sampler calls :meth:`MLPChainLoss.value_and_grad`; calling the object is the autograd chain loss
it was built from (used for curvature and checks). The engine is used only after
:func:`value_and_grad_agree` has matched it against that reference at perturbed parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from degeneracy.data import Batch
from degeneracy.llc.sgld import ChainLoss, seed_from
from degeneracy.llc.user_loss import (
    Form,
    UserLoss,
    batched_user_chain_loss,
    builtin_as_user_loss,
    labels_of,
    per_chain_supervised,
)
from degeneracy.run import ParamLayout

__all__ = [
    "ACTIVATIONS",
    "LinearStep",
    "ActivationStep",
    "mlp_steps",
    "recognise_loss",
    "MLPChainLoss",
    "value_and_grad_agree",
    "labels_fit",
    "mlp_chain_loss",
]

_aten = torch.ops.aten


def _leaky_backward(d: Tensor, z: Tensor, h: Tensor, slope: float) -> Tensor:
    return _aten.leaky_relu_backward(d, z, slope, False)


ACTIVATIONS: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    "relu": (lambda z, _: torch.relu(z), lambda d, z, h, _: _aten.threshold_backward(d, h, 0)),
    "leaky_relu": (lambda z, slope: F.leaky_relu(z, slope), _leaky_backward),
    "tanh": (lambda z, _: torch.tanh(z), lambda d, z, h, _: _aten.tanh_backward(d, h)),
    "sigmoid": (lambda z, _: torch.sigmoid(z), lambda d, z, h, _: _aten.sigmoid_backward(d, h)),
    "silu": (lambda z, _: F.silu(z), lambda d, z, h, _: _aten.silu_backward(d, z)),
    "gelu": (
        lambda z, approximate: F.gelu(z, approximate=approximate),
        lambda d, z, h, approximate: _aten.gelu_backward(d, z, approximate=approximate),
    ),
    "identity": (lambda z, _: z, lambda d, z, h, _: d),
}
"""Element-wise activations the engine differentiates: ``name -> (forward(z, option), backward(d, z, h,
option))``, the backward being the aten kernel autograd uses (``option``: LeakyReLU's slope, GELU's
``approximate``)."""

_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Identity: "identity",
}
_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.silu: "silu",
    F.gelu: "gelu",
}
_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


@dataclass(frozen=True)
class LinearStep:
    """An ``nn.Linear`` of the stack: where its weight ``(out, in)`` and bias sit in θ.

    >>> LinearStep(0, None, 3, 2).out_features
    2
    """

    weight: int
    bias: int | None
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ActivationStep:
    """An element-wise activation of the stack (a key of :data:`ACTIVATIONS`) and its option.

    >>> ActivationStep("gelu", "tanh").name
    'gelu'
    """

    name: str
    option: Any = None


Step = LinearStep | ActivationStep


def _module_activation(module: nn.Module | None) -> ActivationStep | None:
    name = _MODULES.get(type(module))
    if name == "leaky_relu":
        return ActivationStep(name, float(module.negative_slope))  # type: ignore[union-attr]
    if name == "gelu":
        return ActivationStep(name, str(module.approximate))  # type: ignore[union-attr]
    return None if name is None else ActivationStep(name)


def _activation_of(node: Any, model: nn.Module) -> ActivationStep | None:
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)
    if node.op == "call_function" and node.target in _FUNCTIONS and len(node.args) == 1:
        name = _FUNCTIONS[node.target]
        if name == "gelu":
            approximate = kwargs.pop("approximate", "none")
            return None if kwargs else ActivationStep(name, approximate)
        return None if kwargs else ActivationStep(name)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not kwargs:
        return ActivationStep(_METHODS[node.target])
    return None


def _fx_chain(model: nn.Module) -> list[tuple[str, Any]] | None:
    """The forward as a chain of ``("module", name)`` / ``("activation", ActivationStep)`` by ``torch.fx``."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - not traceable (e.g. a type-checked forward): try hooks
        return None
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    chain: list[tuple[str, Any]] = []
    previous = nodes[0]
    for node in nodes[1:]:
        if len(previous.users) != 1:
            return None
        if node.op == "output":
            return chain if node.args[0] is previous else None
        if not node.args or node.args[0] is not previous:
            return None
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            chain.append(("module", str(node.target)))
        else:
            activation = _activation_of(node, model)
            if activation is None:
                return None
            chain.append(("activation", activation))
        previous = node
    return None


def _hook_chain(model: nn.Module, inputs: Tensor) -> list[tuple[str, Any]] | None:
    """The forward as a chain of leaf-module calls, recorded by forward hooks on one run: each module
    must take the previous one's output object, and the model return the last one's (an operation
    between two modules breaks the chain; one in place is caught by :func:`value_and_grad_agree`)."""
    calls: list[tuple[str, tuple[Any, ...], Any]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args, out)))
        for name, module in model.named_modules()
        if next(module.children(), None) is None
    ]
    try:
        with torch.no_grad():
            output = model(inputs)
    except Exception:  # noqa: BLE001 - the model does not run on these inputs: not this engine's case
        return None
    finally:
        for handle in handles:
            handle.remove()
    previous: Any = inputs
    for _, args, out in calls:
        if len(args) != 1 or args[0] is not previous:
            return None
        previous = out
    return [("module", name) for name, _, _ in calls] if output is previous else None


def mlp_steps(model: nn.Module, layout: ParamLayout, inputs: Tensor | None = None) -> list[Step] | None:
    """The model as a chain of :class:`LinearStep` and :class:`ActivationStep` (traced with
    ``torch.fx``, else by forward hooks on a run on ``inputs``), or ``None`` when it is not one, does not
    start with a linear layer, or its sampled parameters are not exactly the weights and biases of its
    linear layers.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> [type(s).__name__ for s in mlp_steps(model, ParamLayout.of_model(model))]
    ['LinearStep', 'ActivationStep', 'LinearStep']
    >>> mlp_steps(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), ParamLayout.of_model(nn.Linear(3, 4)))
    """
    linear = {
        f"{n}.{a}" for n, m in model.named_modules() if type(m) is nn.Linear for a in ("weight", "bias")
    }
    if not set(layout.names) <= linear:  # some sampled parameter outside a linear layer: no tracing
        return None
    chain = _fx_chain(model)
    if chain is None and inputs is not None:
        chain = _hook_chain(model, inputs)
    if not chain:
        return None
    offsets = dict(zip(layout.names, layout.offsets[: len(layout.names)], strict=True))
    steps: list[Step] = []
    covered: set[str] = set()
    for kind, what in chain:
        module = model.get_submodule(what) if kind == "module" else None
        if type(module) is nn.Linear:
            names = [f"{what}.weight"] + ([f"{what}.bias"] if module.bias is not None else [])
            if any(n not in offsets for n in names):
                return None
            covered.update(names)
            bias = offsets[names[1]] if len(names) == 2 else None
            steps.append(LinearStep(offsets[names[0]], bias, module.in_features, module.out_features))
            continue
        activation = what if kind == "activation" else _module_activation(module)
        if activation is None or not steps:
            return None
        steps.append(activation)
    if covered != set(layout.names):
        return None
    return steps


def recognise_loss(
    loss: UserLoss, form: Form, items: list[Any], classes: int, dtype: torch.dtype, seed: int = 0
) -> str | None:
    """``"cross_entropy"`` or ``"mse"`` when the user's ``loss(model, batch)``, given a model that outputs
    ``(batch, classes)`` logits, is that built-in loss on the batch's labels (same values and gradients
    with respect to the outputs at random outputs, on every item ``(Batch, None)`` given), else ``None``.

    >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> items = [(Batch(x, (y,)), None)]
    >>> user = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    >>> recognise_loss(user, "tuple", items, 3, torch.float64)
    'cross_entropy'
    >>> recognise_loss(lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=0.1), "tuple",
    ...                items, 3, torch.float64) is None
    True
    """
    holder: dict[str, Tensor] = {}
    per_chain = batched_user_chain_loss(lambda views, inputs: holder["out"], loss, form, "loop")
    generator = torch.Generator().manual_seed(seed_from(seed, 0x7EC0))
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for name in ("cross_entropy", "mse"):
        try:
            if all(
                _same_loss(name, per_chain, holder, item, form, classes, dtype, generator, rtol)
                for item in items
            ):
                return name
        except Exception:  # noqa: BLE001 - the loss does not behave as this built-in one
            continue
    return None


def labels_fit(name: str, labels: Tensor, size: int, classes: int) -> bool:
    """Whether ``labels`` of ``size`` examples are what the engine's closed-form ``name`` head takes:
    integer classes in ``[0, classes)`` (cross-entropy) or floating targets ``(size, classes)`` (mse).

    >>> [labels_fit("cross_entropy", torch.tensor(y), 2, 3) for y in ([0, 2], [0, 3])]
    [True, False]
    """
    if name == "cross_entropy":
        return (
            labels.shape == (size,)
            and not labels.is_floating_point()
            and bool(((labels >= 0) & (labels < classes)).all())
        )
    return labels.is_floating_point() and (
        labels.shape == (size, classes) or (classes == 1 and labels.shape == (size,))
    )


def _same_loss(
    name: str,
    per_chain: ChainLoss,
    holder: dict[str, Tensor],
    item: Any,
    form: Form,
    classes: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    rtol: float,
) -> bool:
    batch = item[0]
    labels = labels_of(batch, form)
    if not labels_fit(name, labels, batch.size, classes):
        return False
    for scale in (0.3, 3.0):
        out = (scale * torch.randn(2, batch.size, classes, generator=generator, dtype=torch.float64)).to(
            dtype
        )
        out.requires_grad_(True)
        with torch.enable_grad():
            holder["out"] = out
            mine = per_chain({}, item)
            (g_mine,) = torch.autograd.grad(mine.sum(), out)
            theirs = per_chain_supervised(name, out, labels)
            (g_theirs,) = torch.autograd.grad(theirs.sum(), out)
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=rtol, atol=0.0):
            return False
        if not torch.allclose(g_mine, g_theirs, rtol=rtol, atol=rtol * float(g_theirs.abs().max())):
            return False
    return True


class MLPChainLoss:
    """Every chain's loss and gradient on a stack of linear layers, with the backward written by hand.

    ``head`` is ``"cross_entropy"``/``"mse"`` (labels from the batch, items ``(Batch, None)``),
    ``"behavioral-mse"``/``"behavioral-kl"`` (items ``(Batch, f_θ*(x))``) or ``"user"``: ``user_loss``
    called once per chain on the chain's outputs (any loss that calls the model once on the batch's
    inputs), autograd through it alone. Calling the object is ``reference`` (an autograd chain loss of
    the same function: curvature, checks).

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> layout = ParamLayout.of_model(model)
    >>> engine = MLPChainLoss(mlp_steps(model, layout), "mse", reference=None)
    >>> theta = layout.flatten(dict(model.named_parameters())).detach().expand(2, -1)
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    >>> grad = torch.empty_like(theta)
    >>> losses = engine.value_and_grad(theta, (Batch(x, (y,)), None), grad)
    >>> torch.allclose(losses, (model(x) ** 2).mean().expand(2))
    True
    """

    def __init__(
        self,
        steps: list[Step],
        head: str,
        reference: ChainLoss | None,
        user_loss: UserLoss | None = None,
        form: Form = "tuple",
    ) -> None:
        if head not in ("cross_entropy", "mse", "behavioral-mse", "behavioral-kl", "user"):
            raise ValueError(f"unknown loss head {head!r}")
        if head == "user" and user_loss is None:
            raise ValueError("head='user' needs user_loss")
        self.steps = steps
        self.head = head
        self.reference = reference
        self.form = form
        self._holder: dict[str, Tensor] = {}
        self._user = (
            None
            if user_loss is None
            else batched_user_chain_loss(lambda views, inputs: self._holder["out"], user_loss, form, "loop")
        )
        self._last = next(i for i, s in enumerate(steps) if isinstance(s, LinearStep))
        self._view_cache: dict[tuple[Any, ...], list[tuple[Tensor, Tensor | None, Tensor | None]]] = {}

    def __call__(self, views: dict[str, Tensor], item: Any) -> Tensor:
        if self.reference is None:
            raise TypeError("this MLPChainLoss has no autograd reference: use value_and_grad")
        return self.reference(views, item)

    def value_and_grad(self, theta: Tensor, item: Any, grad: Tensor) -> Tensor:
        """The loss of every chain at ``theta`` ``(C, P)`` (returned, ``(C,)``), its gradient written
        into ``grad`` ``(C, P)``: one batched forward, the loss head, one hand-written backward."""
        batch: Batch = item[0]
        inputs = batch.inputs
        if not isinstance(inputs, Tensor) or inputs.dim() != 2:
            raise TypeError("the MLP engine takes inputs (batch, features)")
        out, saved = self._forward(theta, inputs)
        losses, d = self._head(out, item)
        self._backward(theta, grad, d, saved)
        return losses

    def _views(self, flat: Tensor) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """Per step: (weight ``(C, out, in)``, bias ``(C, out, 1)``, bias ``(C, out)``) views into ``flat``
        (θ or its gradient), made once per buffer: the sampler updates its buffers in place."""
        key = (flat.data_ptr(), tuple(flat.shape), tuple(flat.stride()), flat.dtype)
        found = self._view_cache.get(key)
        if found is not None:
            return found
        chains, views = flat.shape[0], []
        for step in self.steps:
            if not isinstance(step, LinearStep):
                views.append((flat, None, None))  # unused
                continue
            size = step.out_features * step.in_features
            weight = flat[:, step.weight : step.weight + size].view(
                chains, step.out_features, step.in_features
            )
            bias = None if step.bias is None else flat[:, step.bias : step.bias + step.out_features]
            views.append((weight, None if bias is None else bias.unsqueeze(2), bias))
        if len(self._view_cache) >= 4:
            self._view_cache.clear()
        self._view_cache[key] = views
        return views

    def _forward(self, theta: Tensor, x: Tensor) -> tuple[Tensor, list[Any]]:
        chains = theta.shape[0]
        a = x.t().expand(chains, x.shape[1], x.shape[0])  # (C, in, B): feature-major, shared input
        saved: list[Any] = []
        for step, (weight, bias, _) in zip(self.steps, self._views(theta), strict=True):
            if isinstance(step, LinearStep):
                saved.append(a)
                a = torch.bmm(weight, a) if bias is None else torch.baddbmm(bias, weight, a)
            else:
                h = ACTIVATIONS[step.name][0](a, step.option)
                saved.append((a, h))
                a = h
        return a, saved

    def _backward(self, theta: Tensor, grad: Tensor, d: Tensor, saved: list[Any]) -> None:
        weights, grads = self._views(theta), self._views(grad)
        for i in range(len(self.steps) - 1, -1, -1):
            step = self.steps[i]
            if isinstance(step, ActivationStep):
                z, h = saved[i]
                d = ACTIVATIONS[step.name][1](d, z, h, step.option)
                continue
            g_weight, _, g_bias = grads[i]
            if i == self._last:  # the input is shared by the chains: one GEMM (C·out, B) × (B, in)
                chains, out_features, examples = d.shape
                flat = torch.mm(d.reshape(chains * out_features, examples), saved[i][0].t())
                g_weight.copy_(flat.view(chains, out_features, -1))
            else:
                torch.bmm(d, saved[i].transpose(1, 2), out=g_weight)
            if g_bias is not None:
                torch.sum(d, dim=2, out=g_bias)
            if i > self._last:
                d = torch.bmm(weights[i][0].transpose(1, 2), d)

    def _head(self, out: Tensor, item: Any) -> tuple[Tensor, Tensor]:
        """(losses ``(C,)``, their gradient with respect to ``out`` ``(C, classes, B)``)."""
        examples = out.shape[2]
        if self.head == "cross_entropy":
            labels = labels_of(item[0], self.form)
            index = labels.view(1, 1, examples).expand(out.shape[0], 1, examples)
            logp = torch.log_softmax(out, dim=1)
            losses = logp.gather(1, index).mean(dim=2).squeeze(1).neg()
            d = logp.exp_()
            d.scatter_add_(
                1, index, torch.full((1, 1, 1), -1.0, dtype=d.dtype, device=d.device).expand_as(index)
            )
            return losses, d.mul_(1.0 / examples)
        if self.head == "mse":
            labels = labels_of(item[0], self.form).to(out.dtype)
            diff = out - labels.reshape(examples, out.shape[1]).t()
            losses = diff.square().mean(dim=(1, 2))
            return losses, diff.mul_(2.0 / (examples * out.shape[1]))
        if self.head == "behavioral-mse":
            diff = out - item[1].reshape(examples, -1).t()
            losses = diff.square().sum(dim=1).mean(dim=1)
            return losses, diff.mul_(2.0 / examples)
        if self.head == "behavioral-kl":
            ref_logp = torch.log_softmax(item[1].reshape(examples, -1).t(), dim=0)
            logp = torch.log_softmax(out, dim=1)
            ref_p = ref_logp.exp()
            losses = (ref_p * (ref_logp - logp)).sum(dim=1).mean(dim=1)
            return losses, logp.exp_().sub_(ref_p).mul_(1.0 / examples)
        assert self._user is not None
        leaf = out.detach().requires_grad_(True)
        with torch.enable_grad():
            self._holder["out"] = leaf.transpose(1, 2)
            losses = self._user({}, item)
            (d,) = torch.autograd.grad(losses, leaf, grad_outputs=torch.ones_like(losses))
        return losses.detach(), d


def value_and_grad_agree(
    engine: MLPChainLoss, reference: ChainLoss, layout: ParamLayout, center: Tensor, item: Any, seed: int = 0
) -> bool:
    """Whether ``engine.value_and_grad`` gives the losses and gradients of the autograd chain loss
    ``reference`` on two chains at distinct random perturbations of ``center`` (relative tolerance 1e-4
    in float32, 1e-9 in float64).

    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    >>> layout = ParamLayout.of_model(model)
    >>> center = layout.flatten(dict(model.named_parameters())).detach()
    >>> from degeneracy.llc.batched import batched_behavioral_chain_loss
    >>> reference = batched_behavioral_chain_loss(model, list(layout.names), "mse")
    >>> engine = MLPChainLoss(mlp_steps(model, layout), "behavioral-mse", reference)
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> value_and_grad_agree(engine, reference, layout, center, (Batch(x), model(x).detach()))
    True
    """
    generator = torch.Generator(device=center.device).manual_seed(seed_from(seed, 0x3A11))
    noise = torch.randn((2, center.numel()), generator=generator, dtype=center.dtype, device=center.device)
    theta = center.unsqueeze(0) + 1e-2 * center.abs().mean().clamp_min(1e-3) * noise
    rtol = 1e-9 if center.dtype == torch.float64 else 1e-4
    leaf = theta.detach().clone().requires_grad_(True)
    grad = torch.empty_like(theta)
    try:
        with torch.enable_grad():
            b_loss = reference(layout.unflatten(leaf), item)
            (b_grad,) = torch.autograd.grad(b_loss.sum(), leaf)
        a_loss = engine.value_and_grad(theta.detach(), item, grad)
        b_loss = b_loss.detach()
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, NotImplementedError):
        return False
    if a_loss.shape != b_loss.shape or not bool(torch.isfinite(a_loss).all()):
        return False
    loss_ok = torch.allclose(
        a_loss, b_loss.detach(), rtol=rtol, atol=rtol * float(b_loss.abs().max()) + 1e-30
    )
    tol = rtol * float(b_grad.abs().max()) + 1e-30
    return bool(loss_ok and torch.allclose(grad, b_grad, rtol=rtol, atol=tol))


def mlp_chain_loss(
    model: nn.Module,
    layout: ParamLayout,
    center: Tensor,
    reference: ChainLoss,
    loss: str | UserLoss,
    form: Form,
    items: list[Any],
    labels: list[Tensor],
    seed: int = 0,
) -> tuple[MLPChainLoss, dict[str, Any]] | None:
    """The engine for ``model`` when it applies and agrees with the autograd chain loss ``reference`` on
    ``items[0]`` (:func:`value_and_grad_agree`), with what it records (``{"backward": "manual", ...}``),
    else ``None``.

    ``loss``: ``"cross_entropy"``/``"mse"`` (built in), ``"behavioral-mse"``/``"behavioral-kl"`` (items
    ``(Batch, f_θ*(x))``) or the user's ``loss(model, batch)``; a user loss recognised as a built-in one on
    ``items`` (:func:`recognise_loss`) runs as that one (recorded as ``"loss_formula"``), otherwise it is
    called per chain. The closed-form heads need ``labels`` (all the data's) to fit (:func:`labels_fit`).

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    >>> layout = ParamLayout.of_model(model)
    >>> center = layout.flatten(dict(model.named_parameters())).detach()
    >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> from degeneracy.llc.batched import chain_batched_forward
    >>> forward = chain_batched_forward(model, list(layout.names))
    >>> reference = batched_user_chain_loss(forward, "cross_entropy", "tuple")
    >>> user = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])
    >>> items = [(Batch(x, (y,)), None)]
    >>> engine, details = mlp_chain_loss(model, layout, center, reference, user, "tuple", items, [y])
    >>> engine.head, details
    ('cross_entropy', {'backward': 'manual', 'loss_formula': 'cross_entropy'})
    """
    inputs = items[0][0].inputs if items else None
    if not isinstance(inputs, Tensor) or inputs.dim() != 2:
        return None
    steps = mlp_steps(model, layout, inputs)
    if steps is None:
        return None
    classes = next(s.out_features for s in reversed(steps) if isinstance(s, LinearStep))
    details: dict[str, Any] = {"backward": "manual"}
    user: UserLoss | None = None
    if isinstance(loss, str) and loss.startswith("behavioral-"):
        head = loss
    else:
        if isinstance(loss, str):
            head = loss
            user = builtin_as_user_loss(loss, form)
        else:
            user = loss
            head = recognise_loss(loss, form, items, classes, center.dtype, seed) or "user"
            if head != "user":
                details["loss_formula"] = head
        if head != "user" and not all(labels_fit(head, t, t.shape[0], classes) for t in labels):
            head = "user"
            details.pop("loss_formula", None)
    engine = MLPChainLoss(steps, head, reference, user, form)
    if not value_and_grad_agree(engine, reference, layout, center, items[0], seed):
        return None
    return engine, details
