"""Modular-addition analysis: Fourier labels of features and their alignment with modules.

A feature of a model of (a + b) mod p is a function g(a, b) on Z_p × Z_p. Its 2-D discrete Fourier
transform ĝ(u, v) over all p² pairs splits its (mean-removed) power over frequency pairs (u, v).
Folding u ~ −u (real features), the **frequency** of a feature is the k ∈ 1..⌊p/2⌋ that collects the
largest power over F_k = {(u, v) : |u|, |v| ∈ {0, k}} \\ {(0, 0)} (the components cos/sin of k·a,
k·b, k·(a+b) and k·(a−b), everything a single-frequency circuit produces), and its **power fraction**
is that power divided by the total non-constant power. The *kind* names the dominant component in
F_k: ``"a"`` (u ≠ 0 = v), ``"b"``, ``"a+b"`` or ``"a-b"`` (u = ±v).

For node layers with several positions (the embeddings [a, b, =]) the power spectra of a feature at
each position are added before the frequency is taken.

Alignment of modules with frequencies: the adjusted mutual information (scikit-learn) between the
module labels and the frequency labels of the same features, over all features and over the
"clean" ones (power fraction ≥ ``min_fraction``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.graph_result import RenamedKeys

FORMER_COUNT_KEYS = {"n": "num_features", "n_clean": "num_clean", "n_active": "num_active"}
"""The alignment dicts' former count keys (they still read, with a ``DeprecationWarning``)."""

__all__ = [
    "FourierLabels",
    "fourier_labels",
    "frequency_module_alignment",
    "modadd_feature_grid",
    "modadd_labels",
    "frequency_module_table",
]


@dataclass(frozen=True)
class FourierLabels:
    """Per feature: dominant frequency k (0 for a constant feature), its power fraction and kind.

    >>> a = torch.arange(7.0)
    >>> grid = torch.cos(2 * torch.pi * 3 * a / 7)[:, None, None].expand(7, 7, 1)  # cos(2π·3a/7)
    >>> labels = fourier_labels(grid)
    >>> len(labels), int(labels.frequency[0]), round(float(labels.fraction[0]), 6)
    (1, 3, 1.0)
    """

    frequency: Tensor  # (n_features,) int64
    fraction: Tensor  # (n_features,) float64
    kind: list[str]
    total_power: Tensor  # (n_features,) float64, non-constant power
    p: int

    def __len__(self) -> int:
        return int(self.frequency.numel())


def _fold(p: int) -> Tensor:
    u = torch.arange(p)
    return torch.minimum(u, p - u)


def fourier_labels(grid: Tensor, *, p: int | None = None) -> FourierLabels:
    """Fourier labels of features given on the full (a, b) grid.

    Args:
        grid: feature values of shape (p, p, n_features) or (p, p, positions, n_features), indexed by
            (a, b); float.
        p: the modulus (defaults to ``grid.shape[0]``).

    Returns:
        :class:`FourierLabels`.

    >>> a = torch.arange(7.0)
    >>> grid = torch.sin(2 * torch.pi * 2 * (a[:, None] + a[None, :]) / 7)[..., None]  # sin(2π·2(a+b)/7)
    >>> int(fourier_labels(grid).frequency[0])
    2
    """
    if grid.dim() == 3:
        grid = grid[:, :, None, :]
    if grid.dim() != 4 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"grid must be (p, p, [positions,] n_features), got {tuple(grid.shape)}")
    p = p or int(grid.shape[0])
    x = grid.to(torch.float64)
    energy = (x**2).sum(dim=(0, 1, 2))  # before the mean is removed
    x = x - x.mean(dim=(0, 1), keepdim=True)  # drop the (0, 0) component
    spec = torch.fft.fft2(x, dim=(0, 1))
    power = (spec.real**2 + spec.imag**2).sum(dim=2)  # (p, p, n) summed over positions
    fu, fv = _fold(p)[:, None].expand(p, p), _fold(p)[None, :].expand(p, p)
    n = power.shape[-1]
    half = p // 2
    per_k = torch.zeros(half + 1, n, dtype=torch.float64)
    for k in range(1, half + 1):
        sel = ((fu == k) | (fu == 0)) & ((fv == k) | (fv == 0)) & ((fu + fv) > 0)
        per_k[k] = power[sel].sum(0)
    total = power.sum(dim=(0, 1)) / (p * p)  # Parseval: Σ over the grid of the mean-removed x²
    total = torch.where(total > 1e-20 * energy, total, torch.zeros_like(total))  # constant up to round-off
    per_k = per_k / (p * p)
    best = per_k[1:].argmax(0) + 1
    frac = torch.where(total > 0, per_k.gather(0, best[None])[0] / total.clamp_min(1e-300), 0.0)
    frequency = torch.where(total > 0, best, torch.zeros_like(best))
    u = torch.arange(p)
    kinds = []
    for j in range(n):
        k = int(frequency[j])
        if k == 0:
            kinds.append("constant")
            continue
        pw = power[..., j]
        plus_k = (u == k) | (u == p - k)
        comps = {
            "a": float(pw[plus_k][:, 0].sum()),
            "b": float(pw[0][plus_k].sum()),
            "a+b": float(pw[k, k] + pw[p - k, p - k]),
            "a-b": float(pw[k, p - k] + pw[p - k, k]),
        }
        kinds.append(max(comps, key=lambda c: comps[c]))
    return FourierLabels(frequency.to(torch.int64), frac, kinds, total, p)


def frequency_module_alignment(
    module_labels: Mapping[int, int] | Sequence[int],
    labels: FourierLabels,
    *,
    features: Sequence[int] | None = None,
    min_fraction: float = 0.5,
) -> dict[str, float]:
    """Adjusted mutual information between module ids and dominant frequencies of the same features.

    Args:
        module_labels: ``feature_index -> module id`` (e.g. ``Modules.layer_labels(layer)``) or a list
            aligned with ``features``.
        labels: the features' :class:`FourierLabels`.
        features: feature indices to use (default: those in ``module_labels``).
        min_fraction: power fraction above which a feature counts as "clean".

    Returns:
        ``{"ami", "ami_clean", "num_features", "num_clean"}`` (the former keys ``n`` and ``n_clean``
        still read, with a ``DeprecationWarning``).

    >>> a = torch.arange(7.0)
    >>> grid = torch.stack([torch.cos(2 * torch.pi * k * a / 7)[:, None].expand(7, 7) for k in (1, 1, 2)], -1)
    >>> frequency_module_alignment({0: 0, 1: 0, 2: 1}, fourier_labels(grid))["ami"]
    1.0
    """
    from sklearn.metrics import adjusted_mutual_info_score

    if isinstance(module_labels, Mapping):
        feats = list(features if features is not None else sorted(module_labels))
        mods = [module_labels[j] for j in feats]
    else:
        if features is None:
            raise ValueError("features are needed when module labels are a sequence")
        feats, mods = list(features), list(module_labels)
    freqs = [int(labels.frequency[j]) for j in feats]
    clean = [i for i, j in enumerate(feats) if float(labels.fraction[j]) >= min_fraction]

    def ami(idx: list[int]) -> float:
        if len(idx) < 2:
            return float("nan")
        return float(adjusted_mutual_info_score([freqs[i] for i in idx], [mods[i] for i in idx]))

    values = {
        "ami": ami(list(range(len(feats)))),
        "ami_clean": ami(clean),
        "num_features": float(len(feats)),
        "num_clean": float(len(clean)),
    }
    return RenamedKeys(values, FORMER_COUNT_KEYS)


def modadd_labels(inputs: Tensor, p: int | None = None) -> Tensor:
    """Labels (a + b) mod p of modular-addition inputs [a, b, p] (p read from the last column).

    >>> modadd_labels(torch.tensor([[3, 5, 7], [6, 6, 7]])).tolist()
    [1, 5]
    """
    if inputs.dim() != 2 or inputs.shape[1] < 2:
        raise ValueError(f"expected inputs (n, 3) of tokens [a, b, =], got {tuple(inputs.shape)}")
    p = p or int(inputs[0, -1])
    return (inputs[:, 0] + inputs[:, 1]) % p


def modadd_feature_grid(
    model: nn.Module, basis: Any, layer: str, *, p: int = 113, batch_size: int = 4096
) -> Tensor:
    """Features f̂ of ``layer`` on every input [a, b, p], as a (p, p, positions, d̂) float64 grid.

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Embedding(6, 2), nn.Flatten(), nn.Linear(6, 5)).double()
    >>> tokens = torch.tensor([[a, b, 5] for a in range(5) for b in range(5)])  # p = 5
    >>> B = degeneracy.interaction_basis(model, tokens, ["1", "output"], method="pca", center=False,
    ...                                  progress=False)
    >>> grid = modadd_feature_grid(model, B, "1", p=5)  # the embeddings of [a, b, =]
    >>> grid.shape, torch.equal(grid[2, 0, 0], grid[2, 4, 0])  # position 0 depends on a only
    (torch.Size([5, 5, 3, 2]), True)
    """
    from degeneracy.capture import capture

    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    chunks = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size].to(device)
            acts = capture(model, x, basis.layers, [layer])[layer]
            chunks.append(basis.transform(layer, acts).cpu())
    f = torch.cat(chunks)
    return f.reshape(p, p, *f.shape[1:])


@dataclass(frozen=True)
class FrequencyModuleRow:
    """One line of the frequency/module table.

    >>> FrequencyModuleRow(0, {"mlp": 2}, {3: 2}, 3, 1.0).purity
    1.0
    """

    module: int
    layer_counts: dict[str, int]
    frequencies: dict[int, int]  # frequency -> number of features
    dominant_frequency: int
    purity: float  # share of the module's features at its dominant frequency
    extra: dict[str, Any] = field(default_factory=dict)


def frequency_module_table(
    modules: Any, labels_by_layer: Mapping[str, FourierLabels], *, min_fraction: float = 0.5
) -> tuple[list[FrequencyModuleRow], dict[str, float]]:
    """Per module: the frequencies of its features, and the AMI between modules and frequencies.

    Rows count the *active* features (those with an edge above ε, i.e. not in ``modules.isolated``)
    whose power fraction is at least ``min_fraction``; isolated features are attached to modules by a
    heuristic and do not carry computation at scale ε.

    Args:
        modules: a :class:`degeneracy.modules.Modules`.
        labels_by_layer: Fourier labels of the node layers to include.
        min_fraction: power fraction above which a feature counts as "clean".

    Returns:
        ``(rows, alignment)``: rows ordered by module id, and the AMI over the active features
        (``ami_active``, ``num_active``), over all included features (``ami``, ``num_features``) and
        over the clean ones (``ami_clean``, ``num_clean``); the former count keys ``n_active``, ``n``
        and ``n_clean`` still read, with a ``DeprecationWarning``.

    >>> from types import SimpleNamespace
    >>> a = torch.arange(7.0)
    >>> grid = torch.stack([torch.cos(2 * torch.pi * k * a / 7)[:, None].expand(7, 7) for k in (1, 1, 2, 3)],
    ...                    dim=-1)  # features of frequencies 1, 1, 2, 3
    >>> modules = SimpleNamespace(modules=[[("h", 0), ("h", 1)], [("h", 2), ("h", 3)]], isolated=[("h", 3)])
    >>> rows, alignment = frequency_module_table(modules, {"h": fourier_labels(grid)})
    >>> [(r.module, r.frequencies, r.dominant_frequency) for r in rows]  # isolated feature 3 not counted
    [(0, {1: 2}, 1), (1, {2: 1}, 2)]
    >>> alignment["ami_active"], alignment["num_active"], alignment["num_features"]
    (1.0, 3.0, 4.0)
    """
    from sklearn.metrics import adjusted_mutual_info_score

    isolated = set(getattr(modules, "isolated", ()))
    mods, freqs, clean, active = [], [], [], []
    rows = []
    for m, members in enumerate(modules.modules):
        counts: dict[str, int] = {}
        fcount: dict[int, int] = {}
        for name, j in members:
            if name not in labels_by_layer:
                continue
            lab = labels_by_layer[name]
            k, frac = int(lab.frequency[j]), float(lab.fraction[j])
            on = (name, j) not in isolated
            mods.append(m)
            freqs.append(k)
            clean.append(frac >= min_fraction)
            active.append(on)
            if on:
                counts[name] = counts.get(name, 0) + 1
                if frac >= min_fraction:
                    fcount[k] = fcount.get(k, 0) + 1
        if not counts:
            continue
        dom = max(fcount, key=lambda k: fcount[k]) if fcount else 0
        purity = fcount.get(dom, 0) / max(1, sum(fcount.values()))
        rows.append(FrequencyModuleRow(m, counts, dict(sorted(fcount.items())), dom, purity))

    def ami(idx: list[int]) -> float:
        if len(idx) < 2:
            return float("nan")
        return float(adjusted_mutual_info_score([freqs[i] for i in idx], [mods[i] for i in idx]))

    idx_all = list(range(len(mods)))
    idx_clean = [i for i in idx_all if clean[i]]
    idx_active = [i for i in idx_all if active[i]]
    alignment = {
        "ami_active": ami(idx_active),
        "num_active": float(len(idx_active)),
        "ami": ami(idx_all),
        "num_features": float(len(idx_all)),
        "ami_clean": ami(idx_clean),
        "num_clean": float(len(idx_clean)),
    }
    return rows, RenamedKeys(alignment, FORMER_COUNT_KEYS)
