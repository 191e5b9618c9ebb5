"""Explicit free directions in the flat parameter space, and the dimension of their span.

Each source of :mod:`degeneracy.accounting.sources` has explicit first-order free directions: rows of a
(k × N) matrix in θ ∈ R^N (``named_parameters`` order, see :class:`degeneracy.run.ParamLayout`). The
report stacks them and takes the rank of the stack (:func:`union_rank`): the number of distinct
directions the sources explain.

>>> from degeneracy.accounting.structure import Site, node_at
>>> site = Site("fc", node_at("fc", "input"), node_at("fc", "output"), 2, 1, torch.tensor([[0, 1]]), None)
>>> activation_directions(site, torch.tensor([[1.0, -1.0]], dtype=torch.float64), 2).tolist()
[[1.0, -1.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from degeneracy.accounting.structure import AttentionLayer, NeuronLayer, Site
from degeneracy.deprecation import renamed_arguments
from degeneracy.linalg import eigh_descending

__all__ = [
    "Directions",
    "activation_directions",
    "bias_directions",
    "block_directions",
    "gated_directions",
    "head_directions",
    "jacobian_directions",
    "translation_directions",
    "union_rank",
]


@renamed_arguments(n_params="num_parameters")
def gated_directions(site: Site, neuron: int, null_vectors: Tensor, num_parameters: int) -> Tensor:
    """δ[W|b][neuron] = aᵀ for each null vector a of the neuron's gated Gram.

    >>> from degeneracy.accounting.structure import Site, node_at
    >>> site = Site("fc", node_at("fc", "input"), node_at("fc", "output"), 2, 2,
    ...             torch.tensor([[0, 1], [2, 3]]), torch.tensor([4, 5]))
    >>> gated_directions(site, 1, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), 6).tolist()
    [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    """
    index = site.augmented_index()
    rows = []
    for a in null_vectors:
        v = torch.zeros(num_parameters, dtype=torch.float64)
        v[index[neuron]] = a
        rows.append(v)
    return torch.stack(rows) if rows else torch.zeros(0, num_parameters, dtype=torch.float64)


@dataclass
class Directions:
    """Free directions of one source as rows of a (k × N) matrix in the flat parameter space.

    >>> Directions("fc/activation", torch.zeros(0, 4)).params
    set()
    """

    key: str
    vectors: Tensor
    params: set[int] = field(default_factory=set)  # indices of parameter tensors touched


@renamed_arguments(n_params="num_parameters")
def activation_directions(site: Site, null_vectors: Tensor, num_parameters: int) -> Tensor:
    """δ[W|b] = e_i cᵀ for every output i and null vector c of G: (d_out·a) × N.

    >>> from degeneracy.accounting.structure import Site, node_at
    >>> site = Site("fc", node_at("fc", "input"), node_at("fc", "output"), 2, 2,
    ...             torch.tensor([[0, 1], [2, 3]]), torch.tensor([4, 5]))
    >>> activation_directions(site, torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64), 6).tolist()
    [[1.0, 0.0, 0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, -1.0]]
    """
    index = site.augmented_index()  # (d_out, d_in_aug)
    rows = []
    for c in null_vectors:
        for i in range(site.d_out):
            v = torch.zeros(num_parameters, dtype=torch.float64)
            v[index[i]] = c
            rows.append(v)
    return torch.stack(rows) if rows else torch.zeros(0, num_parameters, dtype=torch.float64)


@renamed_arguments(n_params="num_parameters")
def jacobian_directions(site: Site, null_vectors: Tensor, num_parameters: int) -> Tensor:
    """δ[W|b] = u e_jᵀ for every input coordinate j (bias included) and null vector u of K.

    >>> from degeneracy.accounting.structure import Site, node_at
    >>> site = Site("fc", node_at("fc", "input"), node_at("fc", "output"), 2, 2,
    ...             torch.tensor([[0, 1], [2, 3]]), torch.tensor([4, 5]))
    >>> jacobian_directions(site, torch.tensor([[1.0, 1.0]], dtype=torch.float64), 6).shape
    torch.Size([3, 6])
    """
    index = site.augmented_index()
    rows = []
    for u in null_vectors:
        for j in range(site.d_in_aug):
            v = torch.zeros(num_parameters, dtype=torch.float64)
            v[index[:, j]] = u
            rows.append(v)
    return torch.stack(rows) if rows else torch.zeros(0, num_parameters, dtype=torch.float64)


def block_directions(layer: NeuronLayer, block: list[int], flat: Tensor) -> Tensor:
    """d/dt of W_in[S] → (I + tE) W_in[S], W_out[:, S] → W_out[:, S](I − tE) for E = e_a e_bᵀ, a, b ∈ S.

    A neuron is read by the columns :meth:`~degeneracy.accounting.structure.NeuronLayer.columns` of
    W_out (a channel's kernel taps, or its pixels after a flatten): column k of neuron b gains column
    k of neuron a.

    >>> import torch
    >>> from degeneracy.accounting.structure import discover
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> layer = discover(model, torch.randn(3, 1)).neuron_layers[0]
    >>> block_directions(layer, [0, 1], torch.ones(7, dtype=torch.float64)).shape
    torch.Size([4, 7])
    """
    assert layer.in_site is not None and layer.out_site is not None
    num_parameters = flat.numel()
    w_in = layer.in_site.augmented_weight(flat)  # (d, d_in_aug)
    in_index = layer.in_site.augmented_index()
    w_out = flat[layer.out_site.weight_index]  # (d_out, d)
    out_index = layer.out_site.weight_index
    cols = layer.columns()
    rows = []
    for a in block:
        for b in block:
            v = torch.zeros(num_parameters, dtype=torch.float64)
            v[in_index[a]] += w_in[b]  # row a of E W_in
            v[out_index[:, cols[b]]] -= w_out[:, cols[a]]  # column b of W_out E
            rows.append(v)
    return torch.stack(rows)


def translation_directions(layer: NeuronLayer, block: list[int], flat: Tensor) -> Tensor:
    """δb_in[a] = 1, δb_out = −slope·W_out[:, a] for each neuron a of a linear block (always on: slope 1;
    a neuron read by several columns of W_out, e.g. a channel, moves them all: their sum).

    >>> import torch
    >>> from degeneracy.accounting.structure import discover
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> layer = discover(model, torch.randn(3, 1)).neuron_layers[0]
    >>> translation_directions(layer, [1], torch.arange(7, dtype=torch.float64)).tolist()
    [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -5.0]]
    """
    assert layer.in_site is not None and layer.out_site is not None
    assert layer.in_site.bias_index is not None and layer.out_site.bias_index is not None
    w_out = flat[layer.out_site.weight_index]
    cols = layer.columns()
    rows = []
    for a in block:
        v = torch.zeros(flat.numel(), dtype=torch.float64)
        v[layer.in_site.bias_index[a]] = 1.0
        v[layer.out_site.bias_index] = -w_out[:, cols[a]].sum(1)
        rows.append(v)
    return torch.stack(rows)


def head_directions(
    attn: AttentionLayer,
    spec_index: dict[str, Tensor],
    flat: Tensor,
    pairs: list[tuple[int, int]],
    which: str,
) -> Tensor:
    """OV (or QK) directions between heads (h_to, h_from); h_to == h_from gives the generic ones.

    OV: v_to += v_from E (W_V[to] += W_V[from] E, b_V likewise), W_O[from] −= E W_O[to].
    QK: W_Q[h] → W_Q[h](I + tE), W_K[h] → W_K[h](I − tEᵀ) (generic only). ``spec_index`` maps
    parameter names to their flat positions (see :func:`degeneracy.accounting.structure.parameter_index`).

    >>> from degeneracy.adapters.transformer_lens.structure import AttentionLayer, hook_output
    >>> attn = AttentionLayer("a", hook_output("p"), hook_output("v"), hook_output("z"), 1, 1, "a.")
    >>> index = {"a.W_V": torch.tensor([[[0]]]), "a.W_O": torch.tensor([[[1]]])}
    >>> head_directions(attn, index, torch.tensor([2.0, 3.0], dtype=torch.float64), [(0, 0)], "ov").tolist()
    [[2.0, -3.0]]
    """
    p = attn.prefix
    # Each side: index tensors laid out (head, ..., coordinate), and the bias (head, coordinate) or None.
    if which == "ov":  # W_O's rows are its head coordinates: read them as the columns of its transpose
        gains = (spec_index[f"{p}W_V"], spec_index.get(f"{p}b_V"))
        loses = (spec_index[f"{p}W_O"].transpose(-1, -2), None)
    else:
        gains = (spec_index[f"{p}W_Q"], spec_index.get(f"{p}b_Q"))
        loses = (spec_index[f"{p}W_K"], spec_index.get(f"{p}b_K"))
        pairs = [(h, h) for h, _ in pairs]
    rows = []
    for to, frm in pairs:
        for i in range(attn.d_head):
            for j in range(attn.d_head):
                v = torch.zeros(flat.numel(), dtype=torch.float64)
                # E = e_i e_jᵀ: coordinate j of head `to` gains coordinate i of head `frm` (W_V E, W_Q E);
                # coordinate i of `frm` loses coordinate j of `to` (E W_O, W_K Eᵀ)
                _shift(v, flat, gains, (to, j), (frm, i), 1.0)
                _shift(v, flat, loses, (frm, i), (to, j), -1.0)
                rows.append(v)
    return torch.stack(rows) if rows else torch.zeros(0, flat.numel(), dtype=torch.float64)


def _shift(
    v: Tensor,
    flat: Tensor,
    side: tuple[Tensor, Tensor | None],
    target: tuple[int, int],
    source: tuple[int, int],
    sign: float,
) -> None:
    """v[weight[head][..., k]] += sign · θ[weight[head'][..., k']] (and the bias entries) for
    ``target = (head, k)`` and ``source = (head', k')``."""
    weight, bias = side
    (h, k), (h_src, k_src) = target, source
    v[weight[h][..., k]] += sign * flat[weight[h_src][..., k_src]]
    if bias is not None:
        v[bias[h][k]] += sign * flat[bias[h_src][k_src]]


def bias_directions(attn: AttentionLayer, spec_index: dict[str, Tensor], flat: Tensor) -> Tensor:
    """The exact bias symmetries of an attention layer: every b_K entry alone (q·b_K is the same for
    every key), then b_V[h, j] += t with b_O −= t·W_O[h, j] (pattern rows sum to 1); (k × N).

    >>> from degeneracy.adapters.transformer_lens.structure import AttentionLayer, hook_output
    >>> attn = AttentionLayer("a", hook_output("p"), hook_output("v"), hook_output("z"), 1, 1, "a.")
    >>> index = {"a.W_O": torch.tensor([[[0]]]), "a.b_V": torch.tensor([[1]]), "a.b_O": torch.tensor([2])}
    >>> bias_directions(attn, index, torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)).tolist()
    [[0.0, 1.0, -3.0]]
    """
    p = attn.prefix
    rows = []
    if f"{p}b_K" in spec_index:
        for i in spec_index[f"{p}b_K"].reshape(-1).tolist():
            v = torch.zeros(flat.numel(), dtype=torch.float64)
            v[i] = 1.0
            rows.append(v)
    if f"{p}b_V" in spec_index and f"{p}b_O" in spec_index:
        w_o, b_v, b_o = spec_index[f"{p}W_O"], spec_index[f"{p}b_V"], spec_index[f"{p}b_O"]
        for h in range(attn.n_heads):
            for j in range(attn.d_head):
                v = torch.zeros(flat.numel(), dtype=torch.float64)
                v[b_v[h, j]] = 1.0
                v[b_o] = -flat[w_o[h, j]]
                rows.append(v)
    return torch.stack(rows) if rows else torch.zeros(0, flat.numel(), dtype=torch.float64)


def union_rank(matrices: list[Tensor], *, rtol: float = 1e-9) -> int:
    """dim of the sum of the row spaces (rows normalised first; relative eigenvalue tolerance).

    >>> e = torch.eye(3, dtype=torch.float64)
    >>> union_rank([e[:2], e[0:1] + e[1:2]])
    2
    """
    rows = [m for m in matrices if m.shape[0]]
    if not rows:
        return 0
    stacked = torch.cat(rows, dim=0)
    cols = torch.nonzero(stacked.abs().sum(0) > 0).flatten()
    stacked = stacked[:, cols]
    norms = stacked.norm(dim=1, keepdim=True)
    stacked = stacked[norms.flatten() > 0] / norms[norms.flatten() > 0]
    if stacked.shape[0] == 0:
        return 0
    small = stacked @ stacked.T if stacked.shape[0] <= stacked.shape[1] else stacked.T @ stacked
    values = eigh_descending(small, one_thread_if_small=True).values
    top = float(values.max())
    return int((values > top * max(rtol, small.shape[0] * float(torch.finfo(torch.float64).eps))).sum())
