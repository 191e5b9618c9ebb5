"""Stochastic sources: random ±1 probes in place of exact sums over Jacobian rows (METHOD §2.2, §4).

The basis Gram of a section (the un-normalised M of LIB, or the global basis's Gram) sums, per
example and input position s, over every output row (t, i) — output position t, output direction i:

    M = Σ_b Σ_s Σ_(t,i) J_b[(t,i), s]ᵀ J_b[(t,i), s],

one vector-Jacobian product per row: P_out · m backward passes per example. With ±1 sources
r_(t,i) (independent, E[r r'] = δ), one backward pass per source gives g_s = Σ_(t,i) r_(t,i) J[(t,i), s]
(cotangent Σ_i r_(t,i) C[i] at every output position t), and E_r[Σ_s g_sᵀ g_s] = M: the estimate
averages R sources per example, R backward passes instead of P_out · m (the companion paper's
approach for language models). For the edges E_ij each output feature i is kept apart, so there the
sources run over output positions only (see :mod:`degeneracy.edges`).

Every source gives its own unbiased estimate M_r (edges E_r); they are independent given the data,
so the reported standard error of the average is std_r / √R (R ≥ 2; ``nan`` for R = 1). For an
eigenvalue λ_j = v_jᵀ M v_j the first-order (delta-method) error is v_jᵀ (M_r − M) v_j
(:func:`eigenvalue_se`); eigenvalues of the averaged M are not themselves unbiased (the top ones err
upwards at second order), only M is.

Sources come from a :data:`SignSource`: :func:`rademacher_sources` (seeded, reproducible, drawn per
example from its global index, so that one process and several draw the same signs) or
:func:`pattern_sources`, which hands every example every sign pattern (the exact average, for tests).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import vjp

from degeneracy.jacobian import choose_mode, integrated_vjp
from degeneracy.linalg import IntegrationRule

__all__ = [
    "SignSource",
    "rademacher_sources",
    "RademacherSources",
    "example_seed",
    "draw_signs",
    "every_sign_pattern",
    "pattern_sources",
    "resolve_sources",
    "source_gram",
    "source_mean_and_se",
    "eigenvalue_se",
    "exact_products",
    "log_cost",
    "build_cost",
    "LONG_BUILD_PRODUCTS",
]

SignSource = Callable[[tuple[int, ...]], Tensor]
"""``draw(shape)``: a float64 tensor of ±1 of that shape, axes (batch, sources, *rows)."""

LONG_BUILD_PRODUCTS = 10**6
"""Exact builds needing more Jacobian products than this log a warning with the stochastic alternative."""

logger = logging.getLogger("degeneracy")


def example_seed(seed: int, stream: str, example: int) -> int:
    """The 64-bit seed of one example's signs: BLAKE2b of ``seed``, the draw's ``stream`` label and the
    example's global index, so that it depends on nothing else (not on the batches or the ranks).

    >>> example_seed(0, "M[mix]", 5) == example_seed(0, "M[mix]", 5) != example_seed(0, "M[mix]", 6)
    True
    """
    digest = hashlib.blake2b(f"{seed}|{stream}|{example}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RademacherSources:
    """Independent ±1 signs keyed by example: the signs of example g in the draw labelled ``stream``
    are ``2 · torch.randint(0, 2, (R, *rows)) − 1`` from a ``torch.Generator`` seeded with
    :func:`example_seed` (seed, stream, g). A build therefore draws the same signs for an example
    whatever the batches and however many ``torch.distributed`` processes share the data (the
    library passes each example's global index and a label of the layer pair): a build with
    ``num_sources`` is the same on one process and on several.

    Called as a plain :data:`SignSource` ``draw(shape)``, the examples are 0 … batch − 1 and the stream
    is the number of earlier plain calls (successive calls give new signs).

    >>> draw = RademacherSources(seed=1)
    >>> a = draw.keyed((2, 3, 4), torch.tensor([7, 9]), "M[mix]")
    >>> b = draw.keyed((1, 3, 4), torch.tensor([9]), "M[mix]")
    >>> torch.equal(a[1:], b), torch.equal(draw((2, 3)), draw((2, 3)))
    (True, False)
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self, shape: tuple[int, ...]) -> Tensor:
        """Signs of shape (batch, sources, *rows) for examples 0 … batch − 1 in a stream of their own."""
        stream = f"call {self.calls}"
        self.calls += 1
        return self.keyed(shape, torch.arange(shape[0]), stream)

    def keyed(self, shape: tuple[int, ...], examples: Tensor, stream: str) -> Tensor:
        """Signs of shape (batch, sources, *rows), row b drawn for the example with global index
        ``examples[b]`` in the draw labelled ``stream`` (float64, on the CPU)."""
        if len(examples) != shape[0]:
            raise ValueError(f"{len(examples)} example indices for a draw of {shape[0]} examples")
        signs = torch.empty(shape, dtype=torch.float64)
        for b, g in enumerate(examples.tolist()):
            generator = torch.Generator().manual_seed(example_seed(self.seed, stream, int(g)))
            signs[b] = 2 * torch.randint(0, 2, shape[1:], generator=generator) - 1
        return signs


def rademacher_sources(seed: int = 0) -> SignSource:
    """Independent ±1 signs, each +1 or −1 with probability ½, reproducible from ``seed``: a
    :class:`RademacherSources`, which the library draws per example (keyed by the example's global
    index, so the number of processes does not change them).

    >>> draw = rademacher_sources(seed=3)
    >>> signs = draw((2, 4, 5))
    >>> again = rademacher_sources(seed=3)((2, 4, 5))
    >>> signs.shape, sorted(set(signs.flatten().tolist())), torch.equal(signs, again)
    (torch.Size([2, 4, 5]), [-1.0, 1.0], True)
    """
    return RademacherSources(seed)


def draw_signs(draw: SignSource, shape: tuple[int, ...], examples: Tensor, stream: str) -> Tensor:
    """``draw``'s signs for a batch whose examples have global indices ``examples`` (see
    :func:`degeneracy.distributed.global_indices`): keyed by example for :class:`RademacherSources`,
    a plain ``draw(shape)`` for any other source.

    >>> draw_signs(rademacher_sources(0), (1, 2), torch.tensor([4]), "x").equal(
    ...     draw_signs(rademacher_sources(0), (2, 2), torch.tensor([3, 4]), "x")[1:])
    True
    """
    if isinstance(draw, RademacherSources):
        return draw.keyed(shape, examples, stream)
    return draw(shape)


def every_sign_pattern(n: int) -> Float[Tensor, "sources rows"]:
    """All 2ⁿ vectors of n signs, one per row (in ``itertools.product`` order, −1 first).

    >>> every_sign_pattern(2).tolist()
    [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    """
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64).reshape(-1, n)


def pattern_sources() -> SignSource:
    """A deterministic :data:`SignSource` for shapes (batch, R, *rows) with R = 2^(number of rows):
    every example gets every sign pattern once, so the average over its sources is the exact
    expectation over Rademacher signs (the check that an estimator is unbiased).

    >>> pattern_sources()((1, 4, 2))[0].tolist()
    [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    >>> pattern_sources()((1, 3, 2))
    Traceback (most recent call last):
    ...
    ValueError: pattern_sources enumerates all 4 sign patterns of 2 rows: ask for num_sources=4, got 3
    """

    def draw(shape: tuple[int, ...]) -> Tensor:
        batch, count, *rows = shape
        n = math.prod(rows)
        if count != 2**n:
            raise ValueError(
                f"pattern_sources enumerates all {2**n} sign patterns of {n} rows: "
                f"ask for num_sources={2**n}, got {count}"
            )
        return every_sign_pattern(n).reshape(count, *rows).expand(batch, count, *rows).clone()

    return draw


def resolve_sources(sources: str | SignSource, seed: int) -> SignSource:
    """The :data:`SignSource` named by a ``sources=`` option: ``"rademacher"`` (seeded with ``seed``)
    or a callable ``draw(shape)`` of your own (e.g. :func:`pattern_sources`).

    >>> resolve_sources("rademacher", seed=0)((1, 2)).abs().tolist()
    [[1.0, 1.0]]
    >>> resolve_sources("gaussian", seed=0)
    Traceback (most recent call last):
    ...
    ValueError: sources must be 'rademacher' or a callable draw(shape) returning ±1 signs, got 'gaussian'
    """
    if callable(sources):
        return sources
    if sources == "rademacher":
        return rademacher_sources(seed)
    raise ValueError(
        f"sources must be 'rademacher' or a callable draw(shape) returning ±1 signs, got {sources!r}"
    )


def source_gram(
    fn: Callable[[Tensor], Tensor],
    x: Float[Tensor, "batch pos_in d_in"],
    in_map: Float[Tensor, "d_in k"],
    out_map: Float[Tensor, "m d_out"],
    rule: IntegrationRule,
    signs: Float[Tensor, "batch sources pos_out m"],
    *,
    max_elements: int = 2**20,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
    advance: Callable[[int, int], None] | None = None,
) -> Float[Tensor, "sources k k"]:
    """Per source r, Σ_b Σ_s g_{r,b,s}ᵀ g_{r,b,s} with g = Σ_(t,i) r_{b,t,i} J_b[(t,i), s] (float64).

    J is the integrated basis Jacobian of :func:`degeneracy.jacobian.jacobian_blocks` (same ``fn``,
    ``x``, ``in_map`` R₊, ``out_map`` C_out, ``rule``): one vector-Jacobian product per source and
    example, with cotangent Σ_i r_{b,t,i} C_out[i] at output position t. Each slice estimates
    :func:`degeneracy.jacobian.jacobian_gram` without bias; their mean over every sign pattern is it.
    ``in_mask`` (batch, pos_in) and ``out_mask`` (batch, pos_out): valid (unpadded) positions; padded
    output positions draw no source and padded input positions add nothing (``None``: all valid).
    ``advance(done, count)`` is told after each chunk of sources (a progress bar).

    >>> from degeneracy.linalg import integration_rule
    >>> x, eye = torch.ones(1, 1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> signs = every_sign_pattern(2).reshape(1, 4, 1, 2)
    >>> source_gram(lambda z: 3 * z, x, eye, eye, integration_rule("gradient"), signs).mean(0).tolist()
    [[9.0, 0.0], [0.0, 9.0]]
    """
    batch, p_in, d_in = x.shape
    k = in_map.shape[1]
    count = signs.shape[1]
    out_model = out_map.to(device=x.device, dtype=x.dtype)
    sgn = signs.to(device=x.device, dtype=x.dtype)
    if out_mask is not None:
        sgn = sgn * out_mask.to(sgn)[:, None, :, None]
    valid_in = None if in_mask is None else in_mask.to(device=x.device, dtype=x.dtype)[None, :, :, None]
    pullbacks = [(vjp(fn, alpha * x)[1], w) for alpha, w in zip(rule.points, rule.weights, strict=True)]
    chunk = max(1, max_elements // max(1, batch * p_in * max(d_in, k)))
    total = torch.zeros(count, k, k, dtype=torch.float64, device=x.device)
    for start in range(0, count, chunk):
        cot = torch.einsum("bctm,md->cbtd", sgn[:, start : start + chunk], out_model)
        g = integrated_vjp(pullbacks, cot, in_map)  # (c, batch, p_in, k)
        if valid_in is not None:
            g = g * valid_in
        total[start : start + g.shape[0]] = torch.einsum("cbsa,cbsh->cah", g, g)
        if advance is not None:
            advance(start + g.shape[0], count)
    return total


def source_mean_and_se(per_source: Float[Tensor, " sources *rows"]) -> tuple[Tensor, Tensor]:
    """The mean over independent per-source estimates and its standard error std / √R (``nan`` for
    R = 1, where the spread is unknown).

    >>> mean, se = source_mean_and_se(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    >>> mean.tolist(), se.tolist()
    ([2.0], [1.0])
    """
    count = per_source.shape[0]
    mean = per_source.mean(0)
    if count < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, per_source.std(0, correction=1) / count**0.5


def eigenvalue_se(
    per_source: Float[Tensor, "sources k k"], vectors: Float[Tensor, "k dhat"]
) -> Float[Tensor, " dhat"]:
    """Standard errors of the eigenvalues λ_j = v_jᵀ M v_j of M = mean_r M_r (delta method: to first
    order a change δM moves λ_j by v_jᵀ δM v_j, for eigenvalues apart from the rest), from the
    independent per-source estimates M_r and the eigenvectors v_j (columns of ``vectors``).

    >>> M = torch.stack([torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([2.0, 1.0]))]).double()
    >>> eigenvalue_se(M, torch.eye(2, dtype=torch.float64)).tolist()
    [1.0, 0.0]
    """
    quad = torch.einsum("ak,rab,bk->rk", vectors, per_source, vectors)
    return source_mean_and_se(quad)[1]


def exact_products(
    n: int, out_positions: int, out_rows: int, in_positions: int, in_directions: int, points: int, mode: str
) -> tuple[int, str]:
    """Jacobian products an exact pass needs, and which kind: one VJP per output row (position ×
    direction) or one JVP per input (position × direction) (``mode="auto"``: the fewer), per example
    and integration point.

    >>> exact_products(64, 32, 385, 32, 385, 1, "auto")
    (788480, 'VJP')
    """
    rows, dirs = out_positions * out_rows, in_positions * in_directions
    kind = choose_mode(rows, dirs) if mode == "auto" else mode
    return n * points * (rows if kind == "vjp" else dirs), kind.upper()


def log_cost(what: str, exact: int, kind: str, per_source: int, num_sources: int | None) -> str:
    """Log (``logging.getLogger("degeneracy")``) what an exact build costs and what the stochastic
    alternative would; a warning when the exact build needs more than :data:`LONG_BUILD_PRODUCTS`
    products, else at INFO. ``per_source`` is the products one source costs over the whole data.
    Returns the message.

    >>> log_cost("LIB M", 788480, "VJP", 64, None)
    'exact LIB M: about 788,480 VJPs; num_sources=R would need 64·R VJPs (R=8: 512), with standard errors'
    """
    if num_sources is not None:
        message = f"{what} with num_sources={num_sources}: about {per_source * num_sources:,} VJPs"
        message += f" (exact: {exact:,} {kind}s)"
        logger.info(message)
        return message
    message = (
        f"exact {what}: about {exact:,} {kind}s; num_sources=R would need {per_source:,}·R VJPs "
        f"(R=8: {8 * per_source:,}), with standard errors"
    )
    logger.log(logging.WARNING if exact > LONG_BUILD_PRODUCTS else logging.INFO, message)
    return message


def build_cost(
    what: str,
    n: int,
    shapes: list[tuple[int, int, int, int, int]],
    points: int,
    mode: str,
    num_sources: int | None,
) -> dict[str, int]:
    """The Jacobian products of a build over ``n`` examples, logged (:func:`log_cost`) before it runs.

    ``shapes`` holds, per layer pair that is differentiated, (output positions, output rows, input
    positions, input directions) as for :func:`exact_products`, and the VJPs one source costs per
    example (1 for the basis Grams, whose sources mix the output rows; d̂_out for the edges, whose
    sources mix output positions only). Returns ``{"exact_products", "products_per_source"}``.

    >>> build_cost("LIB M", 64, [(32, 385, 32, 385, 1)], 1, "auto", None)
    {'exact_products': 788480, 'products_per_source': 64}
    """
    exact, per_source, kind = 0, 0, "VJP"
    for out_positions, out_rows, in_positions, in_directions, source_rows in shapes:
        products, kind = exact_products(n, out_positions, out_rows, in_positions, in_directions, points, mode)
        exact += products
        per_source += n * points * source_rows
    if exact:
        log_cost(what, exact, kind, per_source, num_sources)
    return {"exact_products": exact, "products_per_source": per_source}
