"""Stochastic-gradient Langevin dynamics around θ*, with every chain run in one vectorised step.

The sampler targets (METHOD §7, Lau et al. 2023)

    p(θ) ∝ exp(−nβ L(θ) − γ/2 ‖θ − θ*‖²)

with the update

    Δθ = −(η/2) (nβ ∇L(θ) + γ (θ − θ*)) + √η ξ,      ξ ~ N(0, I),

where ``nbeta`` = nβ (inverse temperature), ``localization`` = γ, ``step_size`` = η. With minibatches
the gradient is that of the minibatch loss (the same minibatch for every chain at a given step).

Chains are stacked along a leading chain dimension ``C`` of one flat parameter tensor
``theta: (C, P)``; the loss of all chains is computed by one ``torch.func.vmap`` call (see
:data:`ChainLoss`) and differentiated by one backward pass, then the update is a handful of in-place
operations on ``theta``. Each chain draws its noise from its own ``torch.Generator`` seeded from
``(seed, chain index)`` only, and the minibatch order depends on ``seed`` only, so running the chains
one at a time (``chain_ids=[c]``) reproduces the vectorised run chain by chain.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from degeneracy.distributed import is_main
from degeneracy.linalg import intra_op_threads
from degeneracy.progress import progress_bar
from degeneracy.run import ParamLayout

__all__ = [
    "ChainLoss",
    "SGLDConfig",
    "ParamLayout",
    "seed_from",
    "ChainRun",
    "chain_generator",
    "noise_block_steps",
    "default_threads",
    "intra_op_threads",
    "cycle_batches",
    "run_sgld_chains",
    "run_mala_chains",
    "max_curvature",
    "progress_options",
]

ChainLoss = Callable[[dict[str, Tensor], Any], Tensor]
"""``chain_loss(params, batch) -> losses``: ``params`` maps each sampled parameter name to a tensor with
a leading chain dimension ``(C, *shape)``; the result is the loss of every chain, shape ``(C,)``.
It must be differentiable with respect to ``params`` (built with ``torch.func.vmap``). A chain loss may
also offer ``value_and_grad(theta, batch, grad) -> losses`` (θ ``(C, P)``, the gradient written into
``grad``), which :func:`run_sgld_chains` then uses instead of autograd (:mod:`degeneracy.llc.mlp`)."""


@dataclass(frozen=True)
class SGLDConfig:
    """Settings of one SGLD run.

    Attributes:
        nbeta: inverse temperature nβ (> 0).
        localization: γ ≥ 0, strength of the pull towards θ*.
        step_size: η > 0.
        num_chains: independent chains, run together.
        num_draws: recorded draws per chain (after burn-in).
        num_burnin: steps before the first draw.
        thinning: steps between draws (1 = every step is a draw).
        seed: seeds the chains' noise (with the chain index) and the minibatch order.
        preconditioner: ``"none"`` (plain SGLD) or ``"rmsprop"``: RMSprop-preconditioned SGLD (Li et al.
            2016, as devinterp's ``RMSpropSGLD``): per coordinate V ← α V + (1 − α) (∇L)², G = 1/(√V + ε)
            and Δθ = −(η/2) G ⊙ (nβ ∇L + γ (θ − θ*)) + √(η G) ⊙ ξ (V starts at 0, so G ≤ 1/ε).
        rmsprop_alpha, rmsprop_eps: α and ε of the RMSprop preconditioner.
        rmsprop_adapt: ``"burnin"`` (default): G is learnt during burn-in and then frozen, so the draws
            sample the target exactly (up to the O(η) bias of SGLD); ``"always"``: adapted at every step,
            as devinterp does, which omits the correction term of a state-dependent G and biases λ̂
            (measured +33 % at α = 0.99 on a quadratic, tests/test_llc_rmsprop.py).

    >>> config = SGLDConfig(10.0, 1.0, 1e-3, num_draws=5, num_burnin=2, thinning=2)
    >>> config.num_steps, config.to_dict()["nbeta"]
    (12, 10.0)
    """

    nbeta: float
    localization: float
    step_size: float
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 0
    thinning: int = 1
    seed: int = 0
    preconditioner: str = "none"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1
    rmsprop_adapt: str = "burnin"

    def __post_init__(self) -> None:
        if self.rmsprop_adapt not in ("burnin", "always"):
            raise ValueError(f"unknown rmsprop_adapt {self.rmsprop_adapt!r}: use 'burnin' or 'always'")
        if self.preconditioner == "rmsprop" and self.rmsprop_adapt == "burnin" and self.num_burnin < 1:
            raise ValueError(
                "the RMSprop preconditioner is learnt during burn-in (rmsprop_adapt='burnin') but num_burnin "
                "is 0: give burn-in steps (a few times 1/(1 − rmsprop_alpha)), or rmsprop_adapt='always' "
                "(adapted at every draw: biased)"
            )
        if self.preconditioner not in ("none", "rmsprop"):
            raise ValueError(f"unknown preconditioner {self.preconditioner!r}: use 'none' or 'rmsprop'")
        if not 0.0 <= self.rmsprop_alpha < 1.0 or not self.rmsprop_eps > 0.0:
            raise ValueError(
                f"rmsprop_alpha must be in [0, 1) and rmsprop_eps > 0, got {self.rmsprop_alpha}, "
                f"{self.rmsprop_eps}"
            )
        if not (math.isfinite(self.nbeta) and self.nbeta > 0):
            raise ValueError(f"nbeta must be a positive finite number, got {self.nbeta}")
        if not (math.isfinite(self.localization) and self.localization >= 0):
            raise ValueError(f"localization must be >= 0, got {self.localization}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be a positive finite number, got {self.step_size}")
        for name in ("num_chains", "num_draws", "thinning"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_burnin < 0:
            raise ValueError(f"num_burnin must be >= 0, got {self.num_burnin}")

    @property
    def num_steps(self) -> int:
        """Total SGLD steps per chain: ``num_burnin + num_draws * thinning``."""
        return self.num_burnin + self.num_draws * self.thinning

    @property
    def max_preconditioner(self) -> float:
        """The largest factor the preconditioner applies to the step size (1 for plain SGLD, 1/ε for
        RMSprop): the effective step is at most ``step_size * max_preconditioner``."""
        return 1.0 / self.rmsprop_eps if self.preconditioner == "rmsprop" else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict (the RMSprop ones only when used)."""
        settings = asdict(self)
        if self.preconditioner == "none":
            for key in ("preconditioner", "rmsprop_alpha", "rmsprop_eps", "rmsprop_adapt"):
                settings.pop(key)
        return settings


SMALL_WORK = 200_000
"""Chains × parameters up to which the sampler runs single-threaded by default: a step of such a
problem is dominated by per-operation overhead, which intra-op threads only add to (and on shared
cores, multiply)."""


def default_threads(chains: int, dim: int) -> int | None:
    """1 for small problems (``chains * dim <= SMALL_WORK``), else ``None`` (leave torch's setting).

    >>> default_threads(4, 100), default_threads(4, 10**6)
    (1, None)
    """
    return 1 if chains * dim <= SMALL_WORK else None


def seed_from(*entropy: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence): distinct streams of one seed.

    >>> seed_from(0, 1) == seed_from(0, 1) != seed_from(0, 2)
    True
    """
    state = np.random.SeedSequence([int(e) % (2**63) for e in entropy]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def chain_generator(seed: int, chain: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The noise generator of chain ``chain``: depends on ``(seed, chain)`` only.

    >>> first = torch.randn(2, generator=chain_generator(0, 1))
    >>> torch.equal(first, torch.randn(2, generator=chain_generator(0, 1)))
    True
    """
    return torch.Generator(device=device).manual_seed(seed_from(seed, chain, 0x51D))


def cycle_batches(batches: Sequence[Any], seed: int) -> Iterator[Any]:
    """Cycle through ``batches`` endlessly, each pass in a fresh order drawn from ``seed``.

    >>> stream = cycle_batches(["a", "b"], seed=0)
    >>> sorted(next(stream) for _ in range(2))
    ['a', 'b']
    """
    if len(batches) == 0:
        raise ValueError("no batches to sample with")
    if len(batches) == 1:
        while True:
            yield batches[0]
    generator = torch.Generator().manual_seed(seed_from(seed, 0xDA7A))
    while True:
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


def noise_block_steps(dim: int, max_steps: int = 64, max_numbers: int = 1 << 18) -> int:
    """How many steps of noise a chain draws at once: at most ``max_steps``, at most ``max_numbers``
    numbers per chain, at least one step.

    >>> noise_block_steps(10), noise_block_steps(10**6)
    (64, 1)
    """
    return max(1, min(max_steps, max_numbers // max(dim, 1)))


@dataclass(frozen=True)
class ChainRun:
    """What the SGLD loop returns: per-chain loss traces, final positions and wall time.

    >>> run = ChainRun(torch.zeros(2, 5), torch.zeros(2, 0), torch.zeros(2, 3), seconds=0.1)
    >>> run.loss_traces.shape, run.acceptance
    (torch.Size([2, 5]), None)
    """

    loss_traces: Float[Tensor, "chains draws"]
    burnin_traces: Float[Tensor, "chains burnin"]
    final_params: Float[Tensor, "chains P"]
    seconds: float
    acceptance: Float[Tensor, " chains"] | None = None
    """MALA only: the fraction of accepted proposals of each chain over all its steps (burn-in included)."""


def progress_options(progress: bool, desc: str, chains: int) -> dict[str, Any]:
    """tqdm options of a sampler's bar: one tick per step (burn-in, then draws) with rate and ETA, off
    unless ``progress``, off when stderr is not a terminal (logs stay clean) and off on every rank but
    rank 0 under torch.distributed.

    >>> progress_options(False, "SGLD", 4)["disable"]
    True
    """
    return {
        "desc": f"{desc} ({chains} chain{'s' if chains != 1 else ''})",
        "unit": "step",
        # None: tqdm turns itself off when not on a terminal
        "disable": None if progress and is_main() else True,
        "leave": False,
        "dynamic_ncols": True,
    }


def run_sgld_chains(
    chain_loss: ChainLoss,
    layout: ParamLayout,
    center: Float[Tensor, " P"],
    batches: Iterator[Any],
    config: SGLDConfig,
    chain_ids: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "SGLD",
) -> ChainRun:
    """Run the chains ``chain_ids`` (default: all of ``config.num_chains``) together.

    Args:
        chain_loss: batched loss, see :data:`ChainLoss`.
        layout: how θ splits into named parameters.
        center: θ*, the point the chains start from and are localised around (its dtype and device
            are the sampler's).
        batches: one batch per step (shared by all chains); ``None`` items are allowed.
        config: the sampler settings.
        chain_ids: which chains to run (their noise depends on the id only).
        progress: show a tqdm bar.

    Returns:
        The loss of each chain at each recorded draw, evaluated at θ_t before the step from θ_t,
        as float64, with the burn-in losses separately.

    >>> layout = ParamLayout(("w",), ((1,),))
    >>> chain_loss = lambda views, batch: views["w"].square().sum(1)   # L(w) = w², every chain
    >>> config = SGLDConfig(nbeta=100.0, localization=0.0, step_size=1e-3, num_chains=2, num_draws=10)
    >>> center = torch.zeros(1, dtype=torch.float64)
    >>> run = run_sgld_chains(chain_loss, layout, center, iter([None] * 10), config)
    >>> run.loss_traces.shape, run.final_params.shape
    (torch.Size([2, 10]), torch.Size([2, 1]))
    """
    ids = list(range(config.num_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    chains, dim = len(ids), layout.numel
    center = center.detach()
    theta = center.expand(chains, dim).clone()
    # a chain loss with value_and_grad(theta, batch, grad) computes its own gradient (degeneracy.llc.mlp)
    value_and_grad = getattr(chain_loss, "value_and_grad", None)
    # per-parameter views into theta, made autograd leaves once: theta is then updated in place
    # under no_grad and every step differentiates with respect to the same leaves
    views = layout.unflatten(theta)
    leaves = views if value_and_grad is not None else {n: v.requires_grad_(True) for n, v in views.items()}
    leaf_list = tuple(leaves.values())
    grad_flat = torch.empty_like(theta)
    drift = torch.empty_like(theta)
    # noise is drawn per chain in blocks of `block` steps (one generator call per chain per block); the
    # block length depends on P only, so a chain's noise is the same whether it runs alone or not
    block = noise_block_steps(dim)
    noise = torch.empty(chains, block, dim, dtype=theta.dtype, device=theta.device)
    generators = [chain_generator(config.seed, c, theta.device) for c in ids]
    losses_all = torch.empty(chains, config.num_steps, dtype=theta.dtype, device=theta.device)
    ones = torch.ones(
        chains, dtype=theta.dtype, device=theta.device
    )  # d(Σ_c L_c)/dL_c: chains are independent
    half_eta, sqrt_eta = 0.5 * config.step_size, math.sqrt(config.step_size)
    nbeta, gamma = float(config.nbeta), float(config.localization)
    square_avg = torch.zeros_like(theta) if config.preconditioner == "rmsprop" else None
    precond, precond_sqrt = torch.empty_like(theta), torch.empty_like(theta)
    alpha, eps = float(config.rmsprop_alpha), float(config.rmsprop_eps)
    adapt_always = config.rmsprop_adapt == "always"

    start = time.perf_counter()
    label = progress_options(progress, desc, chains)["desc"]  # one bar helper: degeneracy.progress
    steps = progress_bar(config.num_steps, label, progress, unit="step", iterable=range(config.num_steps))
    for step in steps:
        batch = next(batches)
        if value_and_grad is not None:
            losses = value_and_grad(theta, batch, grad_flat)
        else:
            with torch.enable_grad():
                losses = chain_loss(leaves, batch)
                if ones.dtype != losses.dtype:
                    ones = torch.ones_like(losses)
                grads = torch.autograd.grad(losses, leaf_list, grad_outputs=ones, allow_unused=True)
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(v)).reshape(chains, -1)
                    for g, v in zip(grads, leaf_list, strict=True)
                ],
                dim=1,
                out=grad_flat,
            )
        losses_all[:, step] = losses.detach()
        with torch.no_grad():
            # drift = nβ ∇L + γ (θ − θ*);  θ ← θ − (η/2) G drift + √η √G ξ  (G = 1 without preconditioner)
            torch.sub(theta, center, out=drift)
            drift.mul_(gamma).add_(grad_flat, alpha=nbeta)
            k = step % block
            if k == 0:
                for row, generator in enumerate(generators):
                    torch.randn(
                        (block, dim),
                        generator=generator,
                        dtype=theta.dtype,
                        device=theta.device,
                        out=noise[row],
                    )
            if square_avg is None:
                theta.add_(drift, alpha=-half_eta)
                theta.add_(noise[:, k], alpha=sqrt_eta)
            else:
                if adapt_always or step < config.num_burnin:  # else G stays frozen
                    square_avg.mul_(alpha).addcmul_(grad_flat, grad_flat, value=1 - alpha)
                    torch.sqrt(square_avg, out=precond).add_(eps).reciprocal_()
                    torch.sqrt(precond, out=precond_sqrt)
                theta.addcmul_(precond, drift, value=-half_eta)
                theta.addcmul_(precond_sqrt, noise[:, k], value=sqrt_eta)
    seconds = time.perf_counter() - start

    losses_all = losses_all.to(torch.float64)
    burnin = losses_all[:, : config.num_burnin]
    draws = losses_all[:, config.num_burnin :: config.thinning][:, : config.num_draws]
    return ChainRun(draws.contiguous(), burnin.contiguous(), theta.detach(), seconds)


def _loss_and_grad(chain_loss: ChainLoss, leaves: dict[str, Tensor], batch: Any, out: Tensor) -> Tensor:
    """The loss of every chain at the leaves' values (returned, detached) and its gradient, written
    flat into ``out``: one forward and one backward for all chains."""
    leaf_list = tuple(leaves.values())
    chains = out.shape[0]
    with torch.enable_grad():
        losses = chain_loss(leaves, batch)
        grads = torch.autograd.grad(
            losses, leaf_list, grad_outputs=torch.ones_like(losses), allow_unused=True
        )
    torch.cat(
        [
            (g if g is not None else torch.zeros_like(v)).reshape(chains, -1)
            for g, v in zip(grads, leaf_list, strict=True)
        ],
        dim=1,
        out=out,
    )
    return losses.detach()


def run_mala_chains(
    chain_loss: ChainLoss,
    layout: ParamLayout,
    center: Float[Tensor, " P"],
    batch: Any,
    config: SGLDConfig,
    chain_ids: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "MALA",
) -> ChainRun:
    """Metropolis-adjusted Langevin chains on the same target as :func:`run_sgld_chains`.

    With U(θ) = nβ L(θ) + γ/2 ‖θ − θ*‖², each step proposes the SGLD move
    θ' = θ − (η/2) ∇U(θ) + √η ξ and accepts it with probability
    min(1, exp(U(θ) − U(θ') + log q(θ|θ') − log q(θ'|θ))), q(b|a) = N(b; a − (η/2)∇U(a), η I), chain by
    chain. The chain is then exactly stationary on exp(−U) for any η, but only if L is the same function
    at every step: ``batch`` is the one batch used throughout (full batch or ``None``).

    Each chain draws its noise and its acceptance uniforms from its own generator (noise block first,
    then a block of uniforms), so a chain's trajectory does not depend on which other chains run with it.
    The recorded loss of a draw is that of θ_t before the step from θ_t, as in :func:`run_sgld_chains`.

    >>> layout = ParamLayout(("w",), ((1,),))
    >>> chain_loss = lambda views, batch: views["w"].square().sum(1)
    >>> config = SGLDConfig(nbeta=100.0, localization=0.0, step_size=1e-2, num_chains=2, num_draws=10)
    >>> run = run_mala_chains(chain_loss, layout, torch.zeros(1, dtype=torch.float64), None, config)
    >>> run.acceptance.shape
    torch.Size([2])
    """
    ids = list(range(config.num_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    chains, dim = len(ids), layout.numel
    center = center.detach()
    dtype, device = center.dtype, center.device
    theta = center.expand(chains, dim).clone()
    proposal = theta.clone()
    leaves = {n: v.requires_grad_(True) for n, v in layout.unflatten(proposal).items()}
    grad = torch.empty_like(theta)  # ∇L at θ* (the start)
    grad_prop = torch.empty_like(theta)  # ∇L at θ'
    block = noise_block_steps(dim)
    noise = torch.empty(chains, block, dim, dtype=dtype, device=device)
    uniforms = torch.empty(chains, block, dtype=dtype, device=device)
    generators = [chain_generator(config.seed, c, device) for c in ids]
    losses_all = torch.empty(chains, config.num_steps, dtype=dtype, device=device)
    accepted = torch.zeros(chains, dtype=torch.float64, device=device)
    eta, half_eta, sqrt_eta = config.step_size, 0.5 * config.step_size, math.sqrt(config.step_size)
    nbeta, gamma = float(config.nbeta), float(config.localization)

    def energy(losses: Tensor, x: Tensor) -> Tensor:
        return nbeta * losses + 0.5 * gamma * (x - center).square().sum(dim=1)

    def drift_of(x: Tensor, g: Tensor) -> Tensor:
        return (x - center).mul_(gamma).add_(g, alpha=nbeta)  # ∇U = nβ ∇L + γ (θ − θ*)

    start = time.perf_counter()
    loss = _loss_and_grad(chain_loss, leaves, batch, grad)  # proposal == θ == θ* here
    u_cur = energy(loss, theta)
    drift = drift_of(theta, grad)
    label = progress_options(progress, desc, chains)["desc"]  # one bar helper: degeneracy.progress
    steps = progress_bar(config.num_steps, label, progress, unit="step", iterable=range(config.num_steps))
    for step in steps:
        losses_all[:, step] = loss
        k = step % block
        if k == 0:
            for row, generator in enumerate(generators):
                torch.randn((block, dim), generator=generator, dtype=dtype, device=device, out=noise[row])
                torch.rand((block,), generator=generator, dtype=dtype, device=device, out=uniforms[row])
        xi = noise[:, k]
        with torch.no_grad():
            # θ' = θ − (η/2) ∇U(θ) + √η ξ, written into the proposal leaves
            torch.add(theta, drift, alpha=-half_eta, out=proposal)
            proposal.add_(xi, alpha=sqrt_eta)
        loss_prop = _loss_and_grad(chain_loss, leaves, batch, grad_prop)
        with torch.no_grad():
            u_prop = energy(loss_prop, proposal)
            drift_prop = drift_of(proposal, grad_prop)
            # log q(θ'|θ) = −‖ξ‖²/2 + c;  log q(θ|θ') = −‖θ − θ' + (η/2) ∇U(θ')‖² / (2η) + c
            backward = (theta - proposal).add_(drift_prop, alpha=half_eta).square().sum(dim=1) / (2 * eta)
            log_alpha = u_cur - u_prop - backward + 0.5 * xi.square().sum(dim=1)
            log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf)  # a non-finite proposal is rejected
            accept = torch.log(uniforms[:, k]) < log_alpha
            accepted += accept.to(torch.float64)
            mask = accept.unsqueeze(1)
            theta = torch.where(mask, proposal, theta)
            drift = torch.where(mask, drift_prop, drift)
            loss = torch.where(accept, loss_prop, loss)
            u_cur = torch.where(accept, u_prop, u_cur)
    seconds = time.perf_counter() - start

    losses_all = losses_all.to(torch.float64)
    burnin = losses_all[:, : config.num_burnin]
    draws = losses_all[:, config.num_burnin :: config.thinning][:, : config.num_draws]
    acceptance = (accepted / config.num_steps).cpu()
    return ChainRun(draws.contiguous(), burnin.contiguous(), theta.detach(), seconds, acceptance)


def max_curvature(
    chain_loss: ChainLoss,
    layout: ParamLayout,
    center: Float[Tensor, " P"],
    batch: Any,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Largest |eigenvalue| of the Hessian of the loss at ``center`` (power iteration on
    Hessian-vector products by double backward). Used for the step-size rule and its warning.

    >>> layout = ParamLayout(("w",), ((2,),))
    >>> chain_loss = lambda views, batch: (views["w"].square() * torch.tensor([3.0, 1.0])).sum(1)
    >>> round(max_curvature(chain_loss, layout, torch.zeros(2), None), 3)   # Hessian diag(6, 2)
    6.0
    """
    generator = torch.Generator(device=center.device).manual_seed(seed_from(seed, 0xC0DE))
    v = torch.randn(center.shape, generator=generator, dtype=center.dtype, device=center.device)
    v /= v.norm()
    x = center.detach().clone().unsqueeze(0).requires_grad_(True)
    with torch.enable_grad():
        loss = chain_loss(layout.unflatten(x), batch).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
    if not g.requires_grad:  # the loss is linear or constant in θ
        return 0.0
    estimate = 0.0
    for i in range(iters):
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v.unsqueeze(0), retain_graph=i < iters - 1)
        hv = hv.squeeze(0)
        norm = float(hv.norm())
        if not math.isfinite(norm) or norm == 0.0:
            return norm if math.isfinite(norm) else math.inf
        converged = abs(norm - estimate) <= 1e-3 * norm
        estimate = norm
        v = hv / norm
        if converged:
            break
    return estimate
