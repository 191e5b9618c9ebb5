"""Sources of free directions (paper §3, METHOD §6), as pure functions on collected statistics.

* **Activation rank** (§3.1.1): each eigenvalue of the site's input Gram G (eq 14, over [f; 1]) at or
  below ε gives d_out free directions δ[W|b] = b cᵀ (c the null vector). Exact.
* **Jacobian rank** (§3.1.2): each eigenvalue of the Jacobian Gram K of the site output (eq 15) at or
  below ε gives d_in + 1 (bias included, footnote 6) Hessian-null directions δ[W|b] = u aᵀ; an upper
  bound on truly free directions (higher orders may lift them). The two families of one site share
  a·j directions (u cᵀ), subtracted once.
* **Synchronised neurons** (§3.2): firing patterns r_i(x) = 1[p_i(x) > 0] (eq 17; the identity layer
  fires everywhere); blocks S_a of equal patterns (transitively, union–find); s_a = dim span{p_k :
  k ∈ S_a} over D (eq 21). The paper's count is N = Σ_a s_a² (eq 22). This module also computes
  t_a = rank of K restricted to S_a (the block's Jacobian rank), and counts **s_a·t_a** per block:
  the dimension of the block transformations W_in[S] → C W_in[S], W_out[:, S] → W_out[:, S] C⁻¹ left
  after removing the directions already counted by activation and Jacobian rank drops (inclusion–
  exclusion; it equals s_a² when t_a = s_a, and |S_a|² at full rank). Singleton blocks (s = t = 1) are
  the generic per-neuron rescalings. Dead neurons (never firing) have t = 0 and count nothing here:
  their freedom is in the activation/Jacobian rows.
* **Gated activation rank** (not in the paper's list; it generalises dead neurons): a ReLU neuron's
  incoming weights only see the inputs on which it fires, so each drop of rank of its input Gram
  over that set, beyond the global activation rank drops, is one more free direction (exact).
* **Approximate synchronisation** (eq 20): the paper's residual compares r_i p_i with r_i' p_i',
  which vanishes only for equal post-activations; we implement its intent (firing patterns that
  differ on a few, small pre-activations): ρ_ii' = 1/m Σ_x (r_i − r_i')² (p_i² + p_i'²) ≤ ε.
* **Synchronised attention heads** (§3.2): heads of one layer whose patterns agree on D (max |Δ| ≤ ε)
  form blocks. Per head the generic OV freedom W_V → W_V E, W_O → E⁻¹ W_O has d_head² directions;
  a block of m synchronised heads acts as one head of width m·d_head, so it adds (m² − m)·d_head²
  (2·d_head² for a synchronised pair). With ranks: s = rank of the block's values, t = rank of its
  z-Jacobian; block total s·t, generic Σ_h s_h t_h.
* Other exact attention symmetries, not in the paper's list but counted separately so that Hessian
  nullities can be explained: W_Q → W_Q B, W_K → W_K B⁻ᵀ (d_head² per head), b_K (a key shift adds
  the same score to every key: d_head per head) and b_V (pattern rows sum to one, so b_V W_O can move
  to b_O: d_head per head).

Rank convention everywhere: eigenvalue λ ≤ max(ε (or ε·λ_max with ``relative``), floor) counts as
zero, with floor = λ_max · max(d·eps64, 100·d·eps_src²) for a float64 Gram of dimension d built from
``eps_src``-precise values (see :func:`gram_floor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from degeneracy.accounting.records import record
from degeneracy.deprecation import renamed_arguments
from degeneracy.linalg import eigh_descending

__all__ = [
    "check_epsilon",
    "RankInfo",
    "gram_floor",
    "gram_rank",
    "NeuronSync",
    "HeadSync",
    "neuron_sync",
    "head_sync",
    "union_find_blocks",
    "firing_patterns",
    "identical_columns",
    "pattern_residuals",
    "gated_ranks",
]


@dataclass
class RankInfo:
    """Rank of a Gram matrix at a threshold, with its null space.

    >>> RankInfo(3, 2, 0.0, torch.tensor([2.0, 1.0, 0.0]), torch.zeros(1, 3)).drops
    1
    """

    dim: int
    rank: int
    threshold: float
    eigenvalues: Tensor  # descending
    null_vectors: Tensor  # (dim - rank, dim), rows

    @property
    def drops(self) -> int:
        return self.dim - self.rank


@renamed_arguments(samples="num_samples")
def gram_floor(largest: float, dim: int, num_samples: int, src_dtype: torch.dtype) -> float:
    """Numerical zero of a float64 Gram of ``dim`` coordinates built from ``src_dtype`` values.

    λ_max · max(dim·eps64, 100·dim·eps_src²): the rounding of the float64 eigensolver, and the Gram
    of rounding errors of relative size eps_src (with a safety factor of 100 for errors accumulated
    through the layers). ``num_samples`` is kept for the signature (the rule does not depend on it).

    >>> gram_floor(1.0, 10, 100, torch.float64) == 10 * torch.finfo(torch.float64).eps
    True
    """
    del num_samples
    eps_src = float(torch.finfo(src_dtype).eps) if src_dtype.is_floating_point else 0.0
    eps64 = float(torch.finfo(torch.float64).eps)
    return largest * max(dim * eps64, 100.0 * dim * eps_src**2)


@renamed_arguments(samples="num_samples")
def gram_rank(
    gram: Tensor,
    epsilon: float = 0.0,
    *,
    relative: bool = False,
    num_samples: int = 1,
    src_dtype: torch.dtype = torch.float64,
) -> RankInfo:
    """Rank of a symmetric PSD matrix at ε (see the module docstring for the convention).

    >>> info = gram_rank(torch.diag(torch.tensor([4.0, 1.0, 1e-3], dtype=torch.float64)), 1e-2)
    >>> info.rank, info.drops, info.null_vectors.abs().tolist()
    (2, 1, [[0.0, 0.0, 1.0]])
    """
    dim = gram.shape[0]
    if dim == 0:
        return RankInfo(0, 0, 0.0, gram.new_zeros(0), gram.new_zeros(0, 0))
    if dim == 1:
        value = max(float(gram[0, 0]), 0.0)
        threshold = max(
            epsilon * value if relative else epsilon, gram_floor(value, 1, num_samples, src_dtype)
        )
        rank = int(value > threshold and value > 0)
        one = torch.ones(1, 1, dtype=torch.float64)
        return RankInfo(1, rank, threshold, torch.tensor([value], dtype=torch.float64), one[:, rank:].T)
    eig = eigh_descending(gram, one_thread_if_small=True)
    values, vectors = eig.values, eig.vectors
    top = max(float(values[0]), 0.0)
    threshold = max(epsilon * top if relative else epsilon, gram_floor(top, dim, num_samples, src_dtype))
    rank = int((values > threshold).sum()) if top > 0 else 0
    return RankInfo(dim, rank, threshold, values, vectors[:, rank:].T.contiguous())


def union_find_blocks(size: int, pairs: Tensor) -> list[list[int]]:
    """Connected components of {0..size-1} under the (k, 2) index pairs, sorted by first index.

    >>> union_find_blocks(4, torch.tensor([[3, 1], [1, 0]]))
    [[0, 1, 3], [2]]
    """
    parent = list(range(size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(size):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


# ---------------------------------------------------------------------------------------------------
# Neurons


@dataclass
class NeuronSync:
    """Synchronised blocks of one neuron layer (paper §3.2).

    >>> sync = neuron_sync(torch.tensor([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]]), "relu")
    >>> sync.blocks, sync.block_ranks, sync.paper_count, sync.synchronised_count
    ([[0, 1], [2]], [1, 1], 2, 1)
    """

    layer: str
    activation: str
    blocks: list[list[int]]  # a partition of all neurons, singletons included
    dead: list[int]  # neurons that never fire (ReLU)
    block_ranks: list[int]  # s_a (eq 21)
    jacobian_ranks: list[int] | None  # t_a, or None when no Jacobian was computed
    max_residual: list[float]  # largest pairwise residual (eq 20, see module docstring) inside each block
    epsilon: float
    num_samples: int
    patterns: list[str] | None = None  # per block: "on" (always fires), "off" (never), "mixed"

    def _live(self) -> list[int]:
        dead = set(self.dead)
        return [a for a, b in enumerate(self.blocks) if not set(b) <= dead]

    @property
    def paper_count(self) -> int:
        """N^{l+1} = Σ_a s_a² over blocks that fire (paper eq 22)."""
        return sum(self.block_ranks[a] ** 2 for a in self._live())

    def block_count(self, a: int) -> int:
        """s_a·t_a: free directions of block a beyond activation/Jacobian rank drops."""
        t = self.jacobian_ranks[a] if self.jacobian_ranks is not None else self.block_ranks[a]
        return self.block_ranks[a] * t

    @property
    def generic_count(self) -> int:
        """Per-neuron rescalings: live singleton blocks."""
        return sum(self.block_count(a) for a in self._live() if len(self.blocks[a]) == 1)

    @property
    def synchronised_count(self) -> int:
        """Σ s_a·t_a over live blocks of two or more neurons (for an identity layer: all of them)."""
        return sum(self.block_count(a) for a in self._live() if len(self.blocks[a]) > 1)

    def linear_blocks(self) -> list[int]:
        """Indices of blocks that never switch: always firing, or never firing for a LeakyReLU.

        Such a block is affine on D, so it can also be translated (p → p + u, b_out → b_out − W_out u).
        """
        out = []
        for a in range(len(self.blocks)):
            pattern = self.patterns[a] if self.patterns is not None else None
            if pattern == "on" or (pattern == "off" and self.activation == "leaky_relu"):
                out.append(a)
        return out

    def block_count_translation(self, a: int) -> int:
        """t_a translations of a linear block beyond Jacobian rank drops (|S_a| without Jacobians)."""
        if self.jacobian_ranks is not None:
            return self.jacobian_ranks[a]
        return len(self.blocks[a])

    @property
    def synchronised_blocks(self) -> list[list[int]]:
        """Live blocks with more than one neuron."""
        return [self.blocks[a] for a in self._live() if len(self.blocks[a]) > 1]

    def to_dict(self) -> dict[str, Any]:
        """Fields (but ``num_samples``) and the three counts, for the report's ``neuron_layers``.

        >>> neuron_sync(torch.tensor([[1.0, 2.0]]), "relu").to_dict()["paper_count"]
        1
        """
        return record(
            self, derived=("paper_count", "generic_count", "synchronised_count"), omit=("num_samples",)
        )


def firing_patterns(pre: Tensor, activation: str) -> Tensor:
    """r_i(x) as booleans (m, d): p > 0 for ReLU/LeakyReLU (eq 17 up to the slope), all True for identity.

    >>> firing_patterns(torch.tensor([[1.0, -1.0]]), "relu").tolist()
    [[True, False]]
    """
    if activation == "identity":
        return torch.ones_like(pre, dtype=torch.bool)
    return pre > 0


def identical_columns(fires: Tensor) -> list[list[int]]:
    """Blocks of columns of a boolean (m, d) matrix that are identical, sorted by first index.

    >>> identical_columns(torch.tensor([[True, False, True], [False, True, False]]))
    [[0, 2], [1]]
    """
    packed = np.packbits(fires.T.contiguous().numpy(), axis=1)
    groups: dict[bytes, list[int]] = {}
    for i, row in enumerate(packed):
        groups.setdefault(row.tobytes(), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def pattern_residuals(pre: Tensor, fires: Tensor) -> Tensor:
    """ρ_ii' = 1/m Σ_x (r_i − r_i')² (p_i² + p_i'²) for all pairs (d, d), float64.

    >>> pre = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    >>> pattern_residuals(pre, pre > 0)[0, 1].item()
    5.0
    """
    r = fires.to(torch.float64)
    q = pre.to(torch.float64).pow(2)
    m = max(pre.shape[0], 1)
    a = (r * q).sum(0)  # Σ r_i q_i
    rq = r.T @ q  # Σ r_i q_i'
    rrq = (r * q).T @ r  # Σ r_i q_i r_i'
    total = a[:, None] + a[None, :] + rq + rq.T - 2 * rrq - 2 * rrq.T
    return total.clamp_min(0.0) / m


def check_epsilon(epsilon: float, relative: bool) -> None:
    """``ValueError`` unless ε is a usable noise scale: finite and ≥ 0 (below 1 when ``relative``, where
    it multiplies the largest eigenvalue).

    >>> check_epsilon(1e-3, relative=True)
    >>> check_epsilon(-1.0, relative=False)
    Traceback (most recent call last):
    ...
    ValueError: epsilon must be a finite number >= 0 (the noise scale ε), got -1.0
    """
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0 (the noise scale ε), got {epsilon}")
    if relative and epsilon >= 1:
        raise ValueError(
            f"a relative epsilon multiplies the largest eigenvalue and must be below 1, got {epsilon}"
        )


def neuron_sync(
    pre: Tensor,
    activation: str,
    *,
    layer: str = "",
    epsilon: float = 0.0,
    relative: bool = False,
    jacobian_gram: Tensor | None = None,
    src_dtype: torch.dtype = torch.float64,
) -> NeuronSync:
    """Blocks, s_a, t_a of one layer from its pre-activations ``pre`` (m samples × d neurons).

    ε = 0: neurons with identical firing patterns on all samples. ε > 0: pairs with residual ρ ≤ ε
    (``relative``: ρ ≤ ε·max_i mean p_i²), blocks by transitivity. s_a and t_a are ranks at the same ε.

    >>> pre = torch.tensor([[1.0, 1.0, -1.0], [2.0, 2.0, 1.0], [-1.0, 0.01, -2.0]], dtype=torch.float64)
    >>> neuron_sync(pre, "relu").blocks, neuron_sync(pre, "relu", epsilon=0.5).blocks
    ([[0], [1], [2]], [[0, 1], [2]])
    """
    check_epsilon(epsilon, relative)
    pre = pre.to(torch.float64)
    m, d = pre.shape
    fires = firing_patterns(pre, activation)
    residuals = pattern_residuals(pre, fires) if epsilon > 0 else None
    scale = float(pre.pow(2).mean(0).max()) if d else 0.0
    if epsilon == 0.0:
        blocks = identical_columns(fires)
    else:
        assert residuals is not None
        threshold = epsilon * scale if relative else epsilon
        pairs = torch.nonzero(residuals <= threshold)
        blocks = union_find_blocks(d, pairs)
    dead = [] if activation != "relu" else torch.nonzero(~fires.any(0)).flatten().tolist()
    gram = pre.T @ pre / max(m, 1)
    s_ranks, t_ranks, max_res = [], [] if jacobian_gram is not None else None, []
    kinds: list[str] = []
    for block in blocks:
        idx = torch.tensor(block)
        s_ranks.append(
            gram_rank(gram[idx][:, idx], epsilon, relative=relative, num_samples=m, src_dtype=src_dtype).rank
        )
        if t_ranks is not None and jacobian_gram is not None:
            t_ranks.append(
                gram_rank(
                    jacobian_gram[idx][:, idx], epsilon, relative=relative, num_samples=m, src_dtype=src_dtype
                ).rank
            )
        max_res.append(
            float(residuals[idx][:, idx].max()) if len(block) > 1 and residuals is not None else 0.0
        )
        block_fires = fires[:, idx]
        kinds.append("on" if bool(block_fires.all()) else "off" if not bool(block_fires.any()) else "mixed")
    return NeuronSync(layer, activation, blocks, dead, s_ranks, t_ranks, max_res, epsilon, m, kinds)


def gated_ranks(
    inputs: Tensor,
    fires: Tensor,
    epsilon: float = 0.0,
    *,
    relative: bool = False,
    src_dtype: torch.dtype = torch.float64,
    chunk: int = 64,
) -> list[RankInfo]:
    """Rank of each ReLU neuron's input Gram over the examples on which it fires.

    ``inputs``: (m, d_in) inputs of the linear map feeding the layer, with the constant 1 appended
    when it has a bias; ``fires``: (m, d) firing patterns. G_i = 1/m Σ_x r_i(x) f̃(x) f̃(x)ᵀ. The incoming
    weights of neuron i only ever see inputs where it fires, so every direction a with G_i a = 0
    (δW[i] = aᵀ) leaves the outputs unchanged on D to first order — a dead neuron is the extreme
    case (G_i = 0). Directions already null for the global Gram are the activation rank drops.

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> [info.rank for info in gated_ranks(x, torch.tensor([[True], [False], [False]]))]
    [1]
    """
    x = inputs.to(torch.float64)
    r = fires.to(torch.float64)
    m = max(x.shape[0], 1)
    out: list[RankInfo] = []
    for start in range(0, r.shape[1], chunk):
        weighted = r[:, start : start + chunk, None] * x[:, None, :]  # (m, c, d)
        grams = (weighted.reshape(x.shape[0], -1).T @ x).reshape(-1, x.shape[1], x.shape[1]) / m
        out.extend(
            gram_rank(g, epsilon, relative=relative, num_samples=m, src_dtype=src_dtype) for g in grams
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Attention heads


@dataclass
class HeadSync:
    """Synchronised heads of one attention layer (paper §3.2, "Attention").

    >>> sync = head_sync(torch.tensor([[0.5, 0.5, 0.5, 0.5, 1.0, 0.0]]), 3, 2)
    >>> sync.blocks, sync.synchronised_count, sync.generic_count
    ([[0, 1], [2]], 8, 12)
    """

    layer: str
    n_heads: int
    d_head: int
    blocks: list[list[int]]
    max_difference: list[list[float]]  # (h, h) max |pattern difference|
    head_value_ranks: list[int]  # s_h
    head_jacobian_ranks: list[int]  # t_h
    block_value_ranks: list[int]  # s_S
    block_jacobian_ranks: list[int]  # t_S
    epsilon: float

    @property
    def generic_count(self) -> int:
        """Σ_h s_h t_h (= n_heads·d_head² at full rank): W_V → W_V E, W_O → E⁻¹ W_O."""
        return sum(s * t for s, t in zip(self.head_value_ranks, self.head_jacobian_ranks, strict=True))

    @property
    def synchronised_count(self) -> int:
        """Σ_S (s_S t_S − Σ_{h∈S} s_h t_h) (= (m² − m)·d_head² per block at full rank)."""
        total = 0
        for a, block in enumerate(self.blocks):
            if len(block) > 1:
                own = sum(self.head_value_ranks[h] * self.head_jacobian_ranks[h] for h in block)
                total += self.block_value_ranks[a] * self.block_jacobian_ranks[a] - own
        return total

    @property
    def paper_synchronised_count(self) -> int:
        """(m² − m)·d_head² per block of m heads (2·d_head² for a synchronised pair)."""
        return sum((len(b) ** 2 - len(b)) * self.d_head**2 for b in self.blocks)

    @property
    def synchronised_blocks(self) -> list[list[int]]:
        return [b for b in self.blocks if len(b) > 1]

    def to_dict(self) -> dict[str, Any]:
        """Fields and the three counts, for the report's ``attention_layers``.

        >>> head_sync(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 2, 1).to_dict()["paper_synchronised_count"]
        2
        """
        return record(self, derived=("generic_count", "synchronised_count", "paper_synchronised_count"))


@renamed_arguments(samples="num_samples")
def head_sync(
    patterns: Tensor,
    n_heads: int,
    d_head: int,
    *,
    layer: str = "",
    epsilon: float = 0.0,
    relative: bool = False,
    value_gram: Tensor | None = None,
    z_jacobian_gram: Tensor | None = None,
    num_samples: int = 1,
    src_dtype: torch.dtype = torch.float64,
) -> HeadSync:
    """Blocks of heads with equal attention patterns (max |Δ| ≤ max(ε, 16·eps(src))) and their ranks.

    ``patterns``: (m, n_heads·n_keys) rows of (example, query position); ``value_gram``: Gram of the
    concatenated values (h·d_head square); ``z_jacobian_gram``: Jacobian Gram w.r.t. z (same shape).
    Missing Grams count as full rank (d_head per head).

    >>> head_sync(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 2, 1).blocks
    [[0, 1]]
    """
    check_epsilon(epsilon, relative)
    p = patterns.to(torch.float64).reshape(patterns.shape[0], n_heads, -1)
    diff = torch.zeros(n_heads, n_heads, dtype=torch.float64)
    for h in range(n_heads):
        diff[h] = (p - p[:, h : h + 1]).abs().amax(dim=(0, 2))
    tol = max(epsilon, 16 * float(torch.finfo(src_dtype).eps))
    blocks = union_find_blocks(n_heads, torch.nonzero(diff <= tol))

    def rank(gram: Tensor | None, heads: list[int]) -> int:
        if gram is None:
            return d_head * len(heads)
        idx = torch.cat([torch.arange(h * d_head, (h + 1) * d_head) for h in heads])
        return gram_rank(
            gram[idx][:, idx], epsilon, relative=relative, num_samples=num_samples, src_dtype=src_dtype
        ).rank

    return HeadSync(
        layer=layer,
        n_heads=n_heads,
        d_head=d_head,
        blocks=blocks,
        max_difference=diff.tolist(),
        head_value_ranks=[rank(value_gram, [h]) for h in range(n_heads)],
        head_jacobian_ranks=[rank(z_jacobian_gram, [h]) for h in range(n_heads)],
        block_value_ranks=[rank(value_gram, b) for b in blocks],
        block_jacobian_ranks=[rank(z_jacobian_gram, b) for b in blocks],
        epsilon=epsilon,
    )
