"""Interaction graphs as results: the edge options (:class:`EdgeConfig`), the edges between adjacent
node layers with their self-checks (:class:`InteractionGraph`), their file format
(:meth:`InteractionGraph.save` / :func:`load_graph`) and how sparse they are (:func:`sparsity`,
:func:`gini`). :func:`degeneracy.interaction_graph` computes them.

>>> gini(torch.tensor([0.0, 0.0, 1.0]))
0.6666666666666666
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from degeneracy.basis_result import dtype_name, save_result
from degeneracy.capture import NodeLayer
from degeneracy.display import html_summary, text_summary
from degeneracy.io import ResultFileError, load_tensors
from degeneracy.linalg import INTEGRATION_RULES

__all__ = ["Mode", "EdgeConfig", "InteractionGraph", "load_graph", "sparsity", "gini", "RenamedKeys"]

Mode = Literal["auto", "vjp", "jvp"]
Pair = tuple[str, str]


@dataclass(frozen=True)
class EdgeConfig:
    """Options of :func:`interaction_graph` (see its docstring).

    >>> EdgeConfig(integration_rule="trapezoid", integration_steps=4).num_sources is None
    True
    """

    integration_rule: str = "gradient"
    integration_steps: int = 1
    num_sources: int | None = None
    seed: int = 0
    batch_size: int | None = None
    jacobian_mode: Mode = "auto"
    max_elements: int = 2**21
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.integration_rule not in INTEGRATION_RULES:
            raise ValueError(
                f"unknown integration rule {self.integration_rule!r}; choose one of {INTEGRATION_RULES}"
            )
        if self.integration_rule != "gradient" and self.integration_steps < 1:
            raise ValueError("integration_steps must be >= 1")
        if self.num_sources is not None and self.num_sources < 1:
            raise ValueError(f"num_sources must be a positive number of ±1 sources, got {self.num_sources}")
        if self.jacobian_mode not in ("auto", "vjp", "jvp"):
            raise ValueError(f"jacobian_mode must be 'auto', 'vjp' or 'jvp', got {self.jacobian_mode!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_elements < 1:
            raise ValueError("max_elements must be positive")
        dtype_name(self.dtype)


@dataclass(frozen=True)
class InteractionGraph:
    """Edges between adjacent node layers, with the basis facts and self-checks behind them.

    Attributes:
        layers: the node layers, in order.
        edges: ``edges[(layer_in, layer_out)]`` is E (d̂_out × d̂_in, float64, ≥ 0): E_ij is the edge
            from feature j of ``layer_in`` to feature i of ``layer_out``.
        basis_method: ``"lib"``, ``"global"``, ``"pca"`` or ``"neuron"``.
        has_constant: feature 0 of every layer is the constant direction.
        eigenvalues: the basis importance Λ of every node layer (d̂,), from the basis.
        completeness: per layer pair, max_x,t,i |Σ_j A − (f̂^{l+1}(f) − f̂^{l+1}(0))| divided by the output
            scale max |f̂^{l+1}(f) − f̂^{l+1}(0)|.
        config: the :class:`EdgeConfig` used.
        info: timings (seconds per layer pair and total), number of examples, modes, library version.
        edge_se: with ±1 sources (``num_sources``), ``edge_se[pair]`` is the standard error of each edge
            (spread of the independent sources / √R, :mod:`degeneracy.probes`; 0 for pairs computed
            exactly, ``nan`` with one source); empty for exact graphs.

    >>> import degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> G = degeneracy.interaction_graph(model, x, B, progress=False)
    >>> G.pairs, G["1", "2"].shape == (B["2"].dim, B["1"].dim)
    ([('1', '2'), ('2', 'output')], True)
    """

    layers: tuple[NodeLayer, ...]
    edges: dict[Pair, Tensor]
    basis_method: str
    has_constant: bool
    eigenvalues: dict[str, Tensor]
    completeness: dict[Pair, float]
    config: EdgeConfig
    info: dict[str, Any] = field(default_factory=dict)
    edge_se: dict[Pair, Tensor] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def pairs(self) -> list[Pair]:
        names = self.names
        return list(zip(names[:-1], names[1:], strict=True))

    @property
    def dims(self) -> dict[str, int]:
        """Number of features d̂ per node layer."""
        return {name: int(self.eigenvalues[name].numel()) for name in self.names}

    def subgraph(self, first: str, last: str) -> InteractionGraph:
        """The graph of the node layers ``first`` … ``last`` (a contiguous range), e.g. to find modules
        without an unrotated output layer."""
        names = self.names
        if first not in names or last not in names or names.index(first) > names.index(last):
            raise ValueError(f"{first!r} … {last!r} is not a range of the node layers {names}")
        keep = names[names.index(first) : names.index(last) + 1]
        pairs = list(zip(keep[:-1], keep[1:], strict=True))
        return dataclasses.replace(
            self,
            layers=tuple(layer for layer in self.layers if layer.name in keep),
            edges={p: self.edges[p] for p in pairs},
            eigenvalues={n: self.eigenvalues[n] for n in keep},
            completeness={p: self.completeness[p] for p in pairs},
            edge_se={p: self.edge_se[p] for p in pairs if p in self.edge_se},
        )

    def __getitem__(self, pair: Pair) -> Tensor:
        if pair not in self.edges:
            raise KeyError(f"no edges {pair}; layer pairs are {self.pairs}")
        return self.edges[pair]

    def _display(self) -> tuple[str, list[tuple[str, Any]], list[str], list[list[Any]]]:
        title = f"InteractionGraph: {self.basis_method} basis, rule {self.config.integration_rule}"
        facts: list[tuple[str, Any]] = [
            ("node layers", len(self.names)),
            ("features", sum(self.dims.values())),
            ("edges (nonzero)", sum(int((e > 0).sum()) for e in self.edges.values())),
        ]
        headers = ["layer pair", "shape (out × in)", "nonzero edges", "Σ E", "max E", "completeness residual"]
        rows = []
        for pair in self.pairs:
            e = self.edges[pair]
            total, top = (float(e.sum()), float(e.max())) if e.numel() else (0.0, 0.0)
            shape = f"{e.shape[0]} × {e.shape[1]}"
            nonzero = int((e > 0).sum())
            rows.append([f"{pair[0]} → {pair[1]}", shape, nonzero, total, top, self.completeness[pair]])
        return title, facts, headers, rows

    def __repr__(self) -> str:
        """A table of the layer pairs (shape, nonzero edges, total and largest edge, completeness), not
        the tensors.

        >>> import degeneracy
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()).double()
        >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> B = degeneracy.interaction_basis(model, x, ["1", "output"], progress=False)
        >>> print(repr(degeneracy.interaction_graph(model, x, B, progress=False)).splitlines()[:2])
        ['InteractionGraph: lib basis, rule gradient', '  node layers: 2']
        """
        return text_summary(*self._display())

    def _repr_html_(self) -> str:
        return html_summary(*self._display())

    def summary(self) -> str:
        lines = [f"interaction graph ({self.basis_method} basis, rule {self.config.integration_rule})"]
        for pair in self.pairs:
            e = self.edges[pair]
            lines.append(
                f"  {pair[0]} -> {pair[1]}: {e.shape[0]} x {e.shape[1]} edges, total {float(e.sum()):.4g}, "
                f"completeness residual {self.completeness[pair]:.2e}"
            )
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> InteractionGraph:
        """Read a file written by :meth:`save` (same as :func:`load_graph`)."""
        return load_graph(path)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (edges, eigenvalues + JSON metadata) atomically."""
        tensors: dict[str, Tensor] = {}
        for k, pair in enumerate(self.pairs):
            tensors[f"edges/{k}"] = self.edges[pair]
            if pair in self.edge_se:
                tensors[f"edge_se/{k}"] = self.edge_se[pair]
        for k, name in enumerate(self.names):
            tensors[f"eigenvalues/{k}"] = self.eigenvalues[name]
        completeness = [self.completeness[pair] for pair in self.pairs]
        return save_result(
            path,
            "graph",
            tensors,
            self.layers,
            self.config,
            self.info,
            basis_method=self.basis_method,
            has_constant=self.has_constant,
            completeness=completeness,
        )


def load_graph(path: str | Path) -> InteractionGraph:
    """Read a graph written by :meth:`InteractionGraph.save`.

    Raises :class:`degeneracy.io.ResultFileError` (a ``ValueError``) for missing, unreadable, foreign or
    incomplete files.

    >>> import tempfile, degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> G = degeneracy.interaction_graph(model, x, B, progress=False)
    >>> path = Path(tempfile.mkdtemp()) / "graph.safetensors"
    >>> _ = G.save(path)
    >>> torch.equal(load_graph(path)["1", "2"], G["1", "2"])
    True
    """
    tensors, meta = load_tensors(path, kind="graph")
    try:
        layers = tuple(NodeLayer.from_dict(d) for d in meta["layers"])
        config = EdgeConfig(**meta["config"])
        completeness_list = list(meta["completeness"])
        basis_method = str(meta["basis_method"])
        has_constant = bool(meta["has_constant"])
    except (KeyError, TypeError, ValueError) as err:
        raise ResultFileError(f"{path}: graph metadata is incomplete ({err})") from err
    names = [layer.name for layer in layers]
    pairs = list(zip(names[:-1], names[1:], strict=True))
    keys = [f"edges/{k}" for k in range(len(pairs))] + [f"eigenvalues/{k}" for k in range(len(names))]
    missing = [k for k in keys if k not in tensors]
    if missing or len(completeness_list) != len(pairs):
        raise ResultFileError(f"{path}: incomplete graph file, missing {missing or 'completeness entries'}")
    edges = {pair: tensors[f"edges/{k}"] for k, pair in enumerate(pairs)}
    eigenvalues = {name: tensors[f"eigenvalues/{k}"] for k, name in enumerate(names)}
    for (a, b), e in edges.items():
        if e.shape != (eigenvalues[b].numel(), eigenvalues[a].numel()):
            raise ResultFileError(f"{path}: edges {a}->{b} have shape {tuple(e.shape)}, inconsistent")
    completeness = {pair: float(c) for pair, c in zip(pairs, completeness_list, strict=True)}
    edge_se = {pair: tensors[f"edge_se/{k}"] for k, pair in enumerate(pairs) if f"edge_se/{k}" in tensors}
    info = meta.get("info", {})
    return InteractionGraph(
        layers, edges, basis_method, has_constant, eigenvalues, completeness, config, info, edge_se
    )


# ---------------------------------------------------------------------------------------------------
# Sparsity


def gini(values: Tensor) -> float:
    """Gini coefficient of non-negative values (0: all equal, → 1: all mass on one entry).

    >>> gini(torch.ones(4)), gini(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    (0.0, 0.75)
    """
    v = values.flatten().to(torch.float64).clamp_min(0).sort().values
    n = v.numel()
    total = float(v.sum())
    if n == 0 or total == 0.0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * v).sum() / (n * total))


class RenamedKeys(dict):  # type: ignore[type-arg]
    """A result dict whose keys were renamed: reading a former key (``[key]`` or ``.get``) still gives
    the value, with a ``DeprecationWarning`` naming the new key; the dict itself (and its JSON) holds
    the new keys only.

    >>> row = RenamedKeys({"num_edges": 4.0}, {"n_edges": "num_edges"})
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     row["n_edges"], list(row), caught[0].category.__name__
    (4.0, ['num_edges'], 'DeprecationWarning')
    """

    def __init__(self, values: Mapping[str, Any], renamed: Mapping[str, str]) -> None:
        super().__init__(values)
        self.renamed = dict(renamed)

    def _former(self, key: Any) -> Any:
        new = self.renamed[key]
        warnings.warn(f"result key {key!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        return self[new]

    def __missing__(self, key: Any) -> Any:
        if key in getattr(self, "renamed", {}):
            return self._former(key)
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        """``self[key]`` (a former key warns), or ``default`` when there is no such key."""
        if key not in self and key in self.renamed and self.renamed[key] in self:
            return self._former(key)
        return super().get(key, default)


def sparsity(
    graph: InteractionGraph,
    fractions: Sequence[float] = (0.9, 0.99, 0.999),
    *,
    exclude_constant: bool = True,
) -> dict[Pair, dict[str, float]]:
    """Per layer pair: how many edges hold each fraction of the total edge weight, and the Gini.

    With ``exclude_constant`` (default) edges from or to the constant direction are left out (they
    carry the mean, not an interaction). Returns ``{pair: {"num_edges", "num_90", "num_99", "num_99.9",
    "gini"}}`` (keys ``num_<100·fraction>``; the former keys ``n_edges``, ``n_<100·fraction>`` still
    read, with a ``DeprecationWarning``: :class:`RenamedKeys`).

    >>> import degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> G = degeneracy.interaction_graph(model, x, B, progress=False)
    >>> sorted(sparsity(G)[("1", "2")])
    ['gini', 'num_90', 'num_99', 'num_99.9', 'num_edges']
    """
    out: dict[Pair, dict[str, float]] = {}
    for pair in graph.pairs:
        e = graph.edges[pair]
        if exclude_constant and graph.has_constant:
            e = e[1:, 1:]
        flat = e.flatten().clamp_min(0).sort(descending=True).values
        total = float(flat.sum())
        row: dict[str, float] = {"num_edges": float(flat.numel()), "gini": gini(flat)}
        cum = flat.cumsum(0)
        for frac in fractions:
            key = f"num_{100 * frac:g}"
            if total == 0.0:
                row[key] = 0.0
            else:
                row[key] = float(int((cum < frac * total * (1 - 1e-12)).sum()) + 1)
        out[pair] = RenamedKeys(row, {"n" + key[3:]: key for key in row if key.startswith("num_")})
    return out
