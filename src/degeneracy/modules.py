"""Modules of the interaction graph (METHOD §5, paper §5).

A connection of squared strength E only matters at loss scale ε if E > ε, and interactions through
independent mediating nodes add logarithmically (eq 34–35), so every edge gets the
**cut-off-normalised log strength** s_ij = max(0, log(E_ij / ε)). A module partition minimises the
total s between modules; in practice Leiden community detection (``leidenalg``, the
RB-configuration quality with resolution γ) on the undirected graph weighted by s, whose nodes are
the features (layer, index) of every node layer. The report gives the modules, the inter-module
Σ s of the partition found and its modularity Q (igraph, same γ).

ε (per layer pair, since edge scales differ between pairs) is

* a number (the same ε for all pairs) or a mapping ``{(layer_in, layer_out): ε}``;
* an edge-ablation result (``{pair: EdgeAblationResult}`` from :func:`degeneracy.ablation.edge_ablation`):
  the smallest edge kept at the bisection threshold (the companion paper's choice);
* ``quantile=q``: the q-quantile of the pair's non-constant edges;
* by default, ``epsilon_fraction`` (1e-9) times the pair's largest non-constant edge: every edge that is not
  numerically zero next to the strongest interaction counts, weighted by its log strength. This
  recovers exactly-planted modules (where cross edges are at the round-off floor); on a trained
  network, prefer ε from the edge-ablation threshold or from a loss scale.

Conventions: the constant direction (feature 0 of every layer of a centred basis) carries the mean,
not an interaction; it connects to everything and is **left out** of the partition and of ``labels``
(listed in ``constant_nodes``). A feature all of whose edges are below ε is *isolated* (listed in
``isolated``); it is labelled with the module of the neighbour it has the largest raw edge E to, so
that every feature has a label (a component with no edges at all becomes its own module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from degeneracy.deprecation import renamed_arguments, renamed_fields
from degeneracy.display import html_summary, text_summary
from degeneracy.fingerprint import check_same_model, recorded_fingerprint, tensors_fingerprint
from degeneracy.io import JsonResult

__all__ = ["log_strengths", "resolve_epsilon", "Modules", "find_modules", "load_modules"]

Node = tuple[str, int]
Pair = tuple[str, str]


def log_strengths(edges: Tensor, epsilon: float) -> Tensor:
    """s = max(0, log(E / ε)) (natural log), float64.

    >>> log_strengths(torch.tensor([[1.0, 1e-3]]), epsilon=1e-2).tolist()
    [[4.605170185988092, 0.0]]
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    e = edges.to(torch.float64).clamp_min(0)
    return torch.log(torch.clamp_min(e / epsilon, 1.0))


def _candidates(graph: Any, pair: Pair) -> Tensor:
    e = graph.edges[pair]
    return e[1:, 1:] if graph.has_constant else e


@renamed_arguments(relative="epsilon_fraction")
def resolve_epsilon(
    graph: Any, epsilon: Any = None, *, quantile: float | None = None, epsilon_fraction: float = 1e-9
) -> dict[Pair, float]:
    """ε per layer pair from a number, a mapping, an edge-ablation result, a quantile of E, or
    ``epsilon_fraction`` × the largest edge (see the module docstring).

    >>> from types import SimpleNamespace
    >>> edges = {("a", "b"): torch.tensor([[1.0, 4.0], [2.0, 3.0]])}
    >>> G = SimpleNamespace(pairs=[("a", "b")], edges=edges, has_constant=False)
    >>> resolve_epsilon(G, 1e-3), resolve_epsilon(G, quantile=0.5), resolve_epsilon(G, epsilon_fraction=0.1)
    ({('a', 'b'): 0.001}, {('a', 'b'): 2.5}, {('a', 'b'): 0.4})
    """
    if epsilon is not None and quantile is not None:
        raise ValueError("give either epsilon or quantile, not both")
    out: dict[Pair, float] = {}
    for pair in graph.pairs:
        if epsilon is None and quantile is not None:
            if not 0.0 <= quantile < 1.0:
                raise ValueError(f"quantile must lie in [0, 1), got {quantile}")
            e = _candidates(graph, pair).flatten()
            e = e[e > 0]
            value = float(torch.quantile(e, quantile)) if e.numel() else 1.0
        elif epsilon is None:
            if not epsilon_fraction > 0:
                raise ValueError(f"epsilon_fraction must be positive, got {epsilon_fraction}")
            top = float(_candidates(graph, pair).max()) if _candidates(graph, pair).numel() else 0.0
            value = epsilon_fraction * top if top > 0 else 1.0
        elif isinstance(epsilon, Mapping):
            if pair not in epsilon:
                raise ValueError(f"epsilon has no entry for layer pair {pair}; pairs are {graph.pairs}")
            item = epsilon[pair]
            value = float(getattr(item, "threshold", item))
        else:
            value = float(epsilon)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"epsilon for {pair} must be a positive finite number, got {value}")
        out[pair] = value
    return out


@renamed_fields(n_modules="num_modules")
@dataclass(frozen=True)
class Modules(JsonResult):
    """A partition of the features of an interaction graph into modules.

    Attributes:
        labels: ``(layer_name, feature_index) -> module id`` for every non-constant feature; module ids
            are 0..n−1, ordered by decreasing total strength.
        modules: the members of each module.
        epsilon: ε per layer pair.
        inter_module_strength: Σ s over edges between different modules (paper §5's criterion).
        intra_module_strength: Σ s over edges inside modules.
        modularity: Q of the partition (igraph, weights s, same resolution).
        resolution, seed: the Leiden parameters.
        constant_nodes: features left out (constant directions).
        isolated: features with no edge above ε.

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> M = find_modules(degeneracy.interaction_graph(model, x, B, progress=False), epsilon=1e-3)
    >>> M.num_modules == len(M.modules), sorted({layer for layer, _ in M.labels})
    (True, ['1', '2', 'output'])
    """

    KIND: ClassVar[str] = "modules"

    labels: dict[Node, int]
    modules: list[list[Node]]
    epsilon: dict[Pair, float]
    inter_module_strength: float
    intra_module_strength: float
    modularity: float
    resolution: float
    seed: int
    constant_nodes: list[Node] = field(default_factory=list)
    isolated: list[Node] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        """How many modules there are (``n_modules`` is its former, deprecated name)."""
        return len(self.modules)


    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Modules:
        """The partition :meth:`to_dict` described (labels rebuilt from the members; the constant nodes,
        which ``to_dict`` leaves out, are left empty). ``save``/``load`` write and read it as JSON.

        >>> saved = {"modules": [[["fc1", 0], ["fc2", 1]], [["fc1", 1]]], "epsilon": {"fc1->fc2": 0.1},
        ...          "inter_module_strength": 0.0, "intra_module_strength": 2.0, "modularity": 0.5,
        ...          "resolution": 1.0, "seed": 0}
        >>> found = Modules.from_dict(saved)
        >>> found.num_modules, found.labels[("fc2", 1)], found.epsilon
        (2, 0, {('fc1', 'fc2'): 0.1})
        """
        members = [[(str(name), int(i)) for name, i in module] for module in d["modules"]]
        return cls(
            labels={node: k for k, module in enumerate(members) for node in module},
            modules=members,
            epsilon={tuple(key.split("->", 1)): float(e) for key, e in d["epsilon"].items()},
            inter_module_strength=float(d["inter_module_strength"]),
            intra_module_strength=float(d["intra_module_strength"]),
            modularity=float(d["modularity"]),
            resolution=float(d["resolution"]),
            seed=int(d["seed"]),
            isolated=[(str(name), int(i)) for name, i in d.get("isolated", [])],
            info=dict(d.get("info", {})),  # files written before the fingerprint have none
        )

    def layer_labels(self, layer: str) -> dict[int, int]:
        """``feature_index -> module id`` of one node layer."""
        return {i: m for (name, i), m in self.labels.items() if name == layer}

    def _display(self) -> tuple[str, list[tuple[str, Any]], list[str], list[list[Any]]]:
        title = f"Modules: {self.num_modules} (Leiden, resolution {self.resolution}, seed {self.seed})"
        facts: list[tuple[str, Any]] = [
            ("modularity Q", self.modularity),
            ("inter-module Σ s", self.inter_module_strength),
            ("intra-module Σ s", self.intra_module_strength),
            ("isolated features (no edge above ε)", len(self.isolated)),
        ]
        layers = list(dict.fromkeys(name for members in self.modules for name, _ in members))
        rows = []
        for k, members in enumerate(self.modules):
            per_layer = [sum(1 for name, _ in members if name == layer) for layer in layers]
            rows.append([k, len(members), *per_layer])
        return title, facts, ["module", "features", *layers], rows

    def __repr__(self) -> str:
        """Modularity, strengths and a table of the modules' sizes per node layer (not every label).

        >>> M = Modules({("fc1", 1): 0, ("fc2", 0): 0}, [[("fc1", 1), ("fc2", 0)]], {}, 0.0, 1.0, 0.5, 1.0, 0)
        >>> print(M)
        Modules: 1 (Leiden, resolution 1.0, seed 0)
          modularity Q: 0.5
          inter-module Σ s: 0
          intra-module Σ s: 1
          isolated features (no edge above ε): 0
          module  features  fc1  fc2
               0         2    1    1
        """
        return text_summary(*self._display())

    def _repr_html_(self) -> str:
        return html_summary(*self._display())

    def summary(self) -> str:
        lines = [
            f"{self.num_modules} modules (resolution {self.resolution}, seed {self.seed}): "
            f"inter-module sum s = {self.inter_module_strength:.4g}, "
            f"intra = {self.intra_module_strength:.4g}, modularity Q = {self.modularity:.4f}"
        ]
        for k, members in enumerate(self.modules):
            per_layer: dict[str, int] = {}
            for name, _ in members:
                per_layer[name] = per_layer.get(name, 0) + 1
            lines.append(f"  module {k}: {len(members)} features " + str(per_layer))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The partition as JSON-ready values (the labels follow from ``modules``; constant nodes are
        left out).

        >>> M = Modules({("fc1", 1): 0}, [[("fc1", 1)]], {("fc1", "fc2"): 0.1}, 0.0, 1.0, 0.0, 1.0, 0)
        >>> M.to_dict()["num_modules"], M.to_dict()["modules"]
        (1, [[['fc1', 1]]])
        """
        return {
            "num_modules": self.num_modules,
            "modules": [[[name, i] for name, i in members] for members in self.modules],
            "epsilon": {f"{a}->{b}": e for (a, b), e in self.epsilon.items()},
            "inter_module_strength": self.inter_module_strength,
            "intra_module_strength": self.intra_module_strength,
            "modularity": self.modularity,
            "resolution": self.resolution,
            "seed": self.seed,
            "isolated": [[name, i] for name, i in self.isolated],
            "info": self.info,
        }


@renamed_arguments(relative="epsilon_fraction")
def find_modules(
    graph: Any,
    *,
    epsilon: Any = None,
    resolution: float = 1.0,
    seed: int = 0,
    quantile: float | None = None,
    epsilon_fraction: float = 1e-9,
    allow_other_model: bool = False,
) -> Modules:
    """Leiden modules of an interaction graph on cut-off-normalised log strengths (METHOD §5).

    Args:
        graph: an :class:`degeneracy.edges.InteractionGraph`.
        epsilon: the loss scale ε (see the module docstring): a number, ``{pair: ε}`` or an
            edge-ablation result; ``None`` uses ``quantile`` if given, else ``epsilon_fraction``.
        resolution: the resolution γ of the RB-configuration quality (larger: more, smaller modules).
        seed: Leiden's random seed (results are deterministic for a given seed).
        quantile: ε = this quantile of each pair's non-constant edges.
        epsilon_fraction: ε = this fraction of each pair's largest non-constant edge (the default rule;
            ``relative=`` is its former, deprecated name).
        allow_other_model: use edge-ablation results (``epsilon``) computed on another model or basis
            than ``graph`` with a warning instead of a ``ModelMismatchError``
            (:func:`degeneracy.fingerprint.check_same_model`).

    Returns:
        :class:`Modules` with ``.labels[(layer, feature)]``, the inter-module Σ s and the modularity Q.

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> M = find_modules(degeneracy.interaction_graph(model, x, B, progress=False), quantile=0.5)
    >>> sorted(M.epsilon), all(0 <= m < M.num_modules for m in M.labels.values())
    ([('1', '2'), ('2', 'output')], True)
    """
    try:
        import igraph as ig
        import leidenalg
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("find_modules needs igraph and leidenalg: pip install degeneracy[modules]") from err
    if isinstance(epsilon, Mapping):  # edge-ablation results must come from the graph's model and basis
        for item in epsilon.values():
            check_same_model(graph, item, what="the graph and its edge-ablation epsilon",
                             allow_other_model=allow_other_model)
    eps = resolve_epsilon(graph, epsilon, quantile=quantile, epsilon_fraction=epsilon_fraction)
    start = 1 if graph.has_constant else 0
    nodes: list[Node] = []
    index: dict[Node, int] = {}
    constant_nodes: list[Node] = []
    for name in graph.names:
        dim = graph.dims[name]
        if start:
            constant_nodes.append((name, 0))
        for i in range(start, dim):
            index[(name, i)] = len(nodes)
            nodes.append((name, i))
    src_idx: list[Tensor] = []
    dst_idx: list[Tensor] = []
    weights: list[Tensor] = []
    raw: list[Tensor] = []
    for pair in graph.pairs:
        a, b = pair
        e = graph.edges[pair][start:, start:].to(torch.float64)
        s = log_strengths(e, eps[pair])
        rows, cols = torch.meshgrid(torch.arange(e.shape[0]), torch.arange(e.shape[1]), indexing="ij")
        src_idx.append(torch.tensor([index[(a, int(j) + start)] for j in cols.flatten()]))
        dst_idx.append(torch.tensor([index[(b, int(i) + start)] for i in rows.flatten()]))
        weights.append(s.flatten())
        raw.append(e.flatten())
    n = len(nodes)
    if src_idx:
        u, v, w, r = torch.cat(src_idx), torch.cat(dst_idx), torch.cat(weights), torch.cat(raw)
    else:
        u = v = torch.zeros(0, dtype=torch.long)
        w = r = torch.zeros(0, dtype=torch.float64)
    strong = w > 0
    g = ig.Graph(n=n, edges=list(zip(u[strong].tolist(), v[strong].tolist(), strict=True)))
    g.es["weight"] = w[strong].tolist()
    if g.ecount():
        partition = leidenalg.find_partition(
            g,
            leidenalg.RBConfigurationVertexPartition,
            weights="weight",
            resolution_parameter=resolution,
            seed=seed,
            n_iterations=-1,
        )
        membership = list(partition.membership)
    else:
        membership = list(range(n))
    degree = torch.zeros(n, dtype=torch.float64)
    degree.index_add_(0, u[strong], w[strong])
    degree.index_add_(0, v[strong], w[strong])
    isolated = [i for i in range(n) if degree[i] == 0]
    # isolated features join the module of their strongest (raw E) non-isolated neighbour
    pending = set(isolated)
    while pending:
        progressed = False
        for i in sorted(pending):
            nbr = torch.cat([v[u == i], u[v == i]])
            val = torch.cat([r[u == i], r[v == i]])
            ok = torch.tensor([int(j) not in pending for j in nbr.tolist()], dtype=torch.bool)
            if ok.any() and float(val[ok].max()) > 0:
                membership[i] = membership[int(nbr[ok][torch.argmax(val[ok])])]
                pending.discard(i)
                progressed = True
        if not progressed:
            for i in sorted(pending):  # no positive edge to a labelled node: its own module
                membership[i] = max(membership) + 1 if membership else 0
            break
    # relabel by decreasing total strength (ties: first member)
    strength: dict[int, float] = {}
    for i, m in enumerate(membership):
        strength[m] = strength.get(m, 0.0) + float(degree[i])
    order = sorted(strength, key=lambda m: (-strength[m], membership.index(m)))
    relabel = {m: k for k, m in enumerate(order)}
    membership = [relabel[m] for m in membership]
    labels = {node: membership[i] for i, node in enumerate(nodes)}
    modules: list[list[Node]] = [[] for _ in order]
    for node, m in labels.items():
        modules[m].append(node)
    same = torch.tensor([membership[a] == membership[b] for a, b in zip(u.tolist(), v.tolist(), strict=True)])
    inter = float(w[~same].sum()) if w.numel() else 0.0
    intra = float(w[same].sum()) if w.numel() else 0.0
    if g.ecount():
        q = float(g.modularity(membership, weights="weight", resolution=resolution))
    else:
        q = 0.0
    return Modules(
        labels,
        modules,
        eps,
        inter,
        intra,
        q,
        resolution,
        seed,
        constant_nodes,
        [nodes[i] for i in isolated],
        {"fingerprint": _fingerprint(graph)},
    )


def _fingerprint(graph: Any) -> dict[str, Any]:
    """The graph's model and data fingerprints (copied, not recomputed) and a hash of its edges."""
    found = dict(recorded_fingerprint(graph) or {})
    edges = {f"{a}->{b}": graph.edges[(a, b)] for a, b in graph.pairs}
    keep = {k: found[k] for k in ("format", "model", "data", "basis") if k in found}
    return {**keep, "graph": tensors_fingerprint(edges)}


def load_modules(path: str | Path) -> Modules:
    """Read modules written by :meth:`Modules.save` (same as ``Modules.load``; the kind is checked).

    >>> import tempfile
    >>> M = Modules({("fc1", 1): 0}, [[("fc1", 1)]], {("fc1", "fc2"): 0.1}, 0.0, 1.0, 0.0, 1.0, 0)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     load_modules(M.save(Path(folder) / "modules.json")).modules
    [[('fc1', 1)]]
    """
    return Modules.load(path)
