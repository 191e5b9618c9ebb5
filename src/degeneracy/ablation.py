"""Node and edge ablations in any basis (the companion paper's ablation experiments).

**Node ablation** (one node layer l): features f̂ = C f are computed, the top-k features by importance
are kept and the others are replaced by their mean over the data (the constant direction, which is its
own mean, is always kept), and the activation C₊ f̂' is substituted into the model. Accuracy and loss
are recorded for a schedule of k.

**Edge ablation** (one layer pair l → l+1), as in the companion paper's code: output feature i of
layer l+1 is computed by running the section f^l ↦ f^{l+1} on an input in which the features j whose
edge E_ij was removed are *mean-ablated* (replaced by their mean over the data); every output feature
only receives its kept edges, exactly (no linear approximation). Output features that share the same
set of kept inputs are computed in one pass, and all such groups are batched together. Edges from the
constant direction are always kept and not counted (they carry the mean, not an interaction). With a
centred basis, mean ablation of a non-constant feature is zero ablation, which is what the companion
code does. The output of layer l+1 is then substituted into the model and evaluated.

**Bisection** finds the fewest edges (kept in order of decreasing E) whose accuracy is within δ of the
unablated model's, assuming accuracy grows with the number of kept edges (the midpoint is taken on a
logarithmic scale, as in the companion code).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from degeneracy.basis import NodeLayerRun
from degeneracy.capture import NodeLayer, capture, forward, section
from degeneracy.sections import Sections, extended, resolve_sections

__all__ = [
    "classification_metrics",
    "NodeAblationCurve",
    "node_ablation_curve",
    "node_ablation_curves",
    "EdgeAblationResult",
    "edge_ablation",
    "edge_mask",
    "bisect_edges",
    "default_schedule",
]

Pair = tuple[str, str]
Metrics = Callable[[Tensor, Tensor], dict[str, float]]
_OUTPUT = NodeLayer("__model_output__", ("output",))


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Summed correct predictions and cross-entropy over a batch (the last position of (b, P, V) logits).

    Returns ``{"correct": Σ 1[argmax = label], "loss": Σ CE, "count": b}`` (sums, so batches add up).

    >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # (batch, pos, classes)
    >>> m = classification_metrics(logits, torch.tensor([0, 0]))
    >>> m["correct"], round(m["loss"], 4)
    (1.0, 2.2539)
    """
    if logits.dim() == 3:
        logits = logits[:, -1]
    logits = logits.to(torch.float64)
    labels = labels.to(logits.device)
    return {
        "correct": float((logits.argmax(-1) == labels).sum()),
        "loss": float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
        "count": float(labels.shape[0]),
    }


def _finish(sums: Mapping[str, float]) -> dict[str, float]:
    n = max(sums.get("count", 0.0), 1.0)
    return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}


def default_schedule(n: int, num_points: int = 24) -> list[int]:
    """Numbers of kept features: 0, a geometric grid up to n, and n (sorted, unique).

    >>> default_schedule(5), default_schedule(100, num_points=6)
    ([0, 1, 2, 3, 4, 5], [0, 1, 3, 10, 32, 100])
    """
    if n <= num_points:
        return list(range(n + 1))
    grid = torch.logspace(0, math.log10(n), num_points - 1, dtype=torch.float64)
    return sorted({0, n, *(int(round(float(g))) for g in grid)})


# ---------------------------------------------------------------------------------------------------
# Running the model with modified node layers


class _Runner:
    """Model, node layers and labelled data of one ablation study (inputs cast like the basis build)."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        basis: Any,
        labels: Tensor | None,
        batch_size: int | None,
        dtype: str | None,
        metrics: Metrics,
    ) -> None:
        self.run = NodeLayerRun(
            model,
            data,
            basis.layers,
            dtype=dtype or basis.config.dtype,
            batch_size=batch_size or basis.config.batch_size,
        )
        self.layers = list(self.run.layers)
        self.all_layers = self.layers + [_OUTPUT]
        self.basis = basis
        self.labels = labels
        self.metrics = metrics
        self.constant = bool(basis.config.has_constant)
        self.means: dict[str, Tensor] = {}
        self.widths: dict[str, list[int]] = {}

    def batches(self) -> Iterator[tuple[Any, Tensor]]:
        offset = 0
        for batch in self.run.batches():
            inputs = batch.inputs
            if self.labels is not None:
                labels = self.labels[offset : offset + batch.size]
            elif batch.extras and isinstance(batch.extras[0], Tensor):
                labels = batch.extras[0]
            else:
                raise ValueError("ablations need labels: pass labels=..., or data batches (inputs, labels)")
            offset += batch.size
            if not self.widths:
                self.widths = self.run.learn_widths(inputs)
            yield inputs, labels

    def feature_means(self) -> dict[str, Tensor]:
        """E[f̂] of every node layer over the data (float64), the values mean ablation substitutes."""
        if self.means:
            return self.means
        sums: dict[str, Tensor] = {}
        count: dict[str, int] = {}
        with torch.no_grad():
            for inputs, _ in self.batches():
                acts = capture(self.run.model, inputs, self.layers, constant=self.constant)
                for name, x in acts.items():
                    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
                    sums[name] = sums.get(name, 0) + flat.sum(0)
                    count[name] = count.get(name, 0) + flat.shape[0]
        self.means = {
            name: (sums[name] / count[name]) @ self.basis[name].C.to(sums[name].device).T for name in sums
        }
        return self.means

    def to_activations(self, name: str, features: Tensor) -> Tensor:
        """Raw activations C₊ f̂ for substitution (divided by the constant coordinate if present)."""
        b = self.basis[name]
        x = features @ b.C_pinv.to(features.device).T
        if self.constant:
            c = x[..., -1:]
            x = x[..., :-1] / torch.where(c.abs() > 1e-12, c, torch.ones_like(c))
        return x.to(self.run.dtype)

    def evaluate(self, replace: Callable[[Any, Tensor], tuple[str, Tensor]] | None) -> dict[str, float]:
        """Metrics of the model when ``replace(inputs, labels)`` gives (layer, new activations)."""
        sums: dict[str, float] = {}
        with torch.no_grad():
            for inputs, labels in self.batches():
                if replace is None:
                    out = forward(self.run.model, inputs, self.all_layers, capture=[_OUTPUT.name])
                    logits = out[_OUTPUT.name]
                else:
                    name, acts = replace(inputs, labels)
                    layer = next(layer for layer in self.layers if layer.name == name)
                    if layer.is_output:
                        logits = acts
                    else:
                        out = forward(
                            self.run.model,
                            inputs,
                            self.all_layers,
                            capture=[_OUTPUT.name],
                            substitute={name: acts},
                            widths=self.widths,
                        )
                        logits = out[_OUTPUT.name]
                for key, value in self.metrics(logits, labels).items():
                    sums[key] = sums.get(key, 0.0) + value
        return _finish(sums)


# ---------------------------------------------------------------------------------------------------
# Node ablation


@dataclass(frozen=True)
class NodeAblationCurve:
    """Accuracy and loss when only the ``n_kept`` most important features of ``layer`` are kept.

    ``n_kept`` counts non-constant features; the constant direction (if any) is always kept.

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> labels = model(x).argmax(-1)
    >>> curve = node_ablation_curve(model, x, B, "2", labels=labels, n_kept=[0, B["2"].dim - 1])
    >>> curve.n_kept == [0, B["2"].dim - 1], curve.accuracy[-1] == curve.base_accuracy == 1.0
    (True, True)
    """

    layer: str
    basis_method: str
    importance: str
    n_features: int
    n_kept: list[int]
    accuracy: list[float]
    loss: list[float]
    base_accuracy: float
    base_loss: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _importance(basis: Any, layer: str, importance: str | Tensor, graph: Any | None) -> tuple[str, Tensor]:
    b = basis[layer]
    if isinstance(importance, Tensor):
        if importance.numel() != b.dim:
            raise ValueError(f"importance for {layer!r} must have {b.dim} entries, got {importance.numel()}")
        return "given", importance.to(torch.float64).flatten()
    if importance == "eigenvalues":
        return importance, b.eigenvalues.to(torch.float64)
    if importance == "edges":
        if graph is None:
            raise ValueError("importance='edges' needs graph=...")
        names = graph.names
        k = names.index(layer)
        total = torch.zeros(b.dim, dtype=torch.float64)
        if k + 1 < len(names):
            total += graph.edges[(layer, names[k + 1])].sum(0)
        if k > 0:
            total += graph.edges[(names[k - 1], layer)].sum(1)
        return importance, total
    raise ValueError(f"importance must be 'eigenvalues', 'edges' or a tensor, got {importance!r}")


def node_ablation_curve(
    model: nn.Module,
    data: Any,
    basis: Any,
    layer: str,
    *,
    labels: Tensor | None = None,
    n_kept: Sequence[int] | None = None,
    importance: str | Tensor = "eigenvalues",
    graph: Any | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    metrics: Metrics = classification_metrics,
    _runner: _Runner | None = None,
) -> NodeAblationCurve:
    """Keep the top-k features of ``layer`` by importance, mean-ablate the rest, and evaluate.

    Args:
        model, data, basis: as for :func:`degeneracy.interaction_graph`; ``labels`` aligned with a
            tensor ``data`` (or batches ``(inputs, labels)``).
        layer: the node layer to ablate (not the model output).
        n_kept: numbers of non-constant features to keep (default :func:`default_schedule`).
        importance: ``"eigenvalues"`` (Λ of LIB/global, variance of PCA), ``"edges"`` (total edge
            weight in and out, needs ``graph``) or a tensor of d̂ scores.
        metrics: per-batch sums ``{"correct", "loss", "count"}`` from (output, labels).

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> curve = node_ablation_curve(model, x, B, "1", labels=model(x).argmax(-1))
    >>> curve.layer, curve.n_kept[0], curve.base_accuracy
    ('1', 0, 1.0)
    """
    runner = _runner or _Runner(model, data, basis, labels, batch_size, dtype, metrics)
    start = time.perf_counter()
    kind, scores = _importance(basis, layer, importance, graph)
    b = basis[layer]
    offset = 1 if runner.constant else 0
    order = offset + torch.argsort(scores[offset:], descending=True)
    n_features = b.dim - offset
    schedule = sorted(set(n_kept if n_kept is not None else default_schedule(n_features)))
    if schedule and (schedule[0] < 0 or schedule[-1] > n_features):
        raise ValueError(f"n_kept must lie in [0, {n_features}] for layer {layer!r}")
    means = runner.feature_means()[layer]
    base = runner.evaluate(None)
    accs, losses = [], []
    for k in schedule:
        keep = torch.zeros(b.dim, dtype=torch.bool)
        keep[:offset] = True
        keep[order[:k]] = True

        def replace(inputs: Any, _: Tensor, keep: Tensor = keep) -> tuple[str, Tensor]:
            x = capture(runner.run.model, inputs, runner.layers, [layer], constant=runner.constant)[layer]
            f = x.to(torch.float64) @ b.C.to(x.device).T
            f = torch.where(keep.to(f.device), f, means.to(f.device))
            return layer, runner.to_activations(layer, f)

        result = runner.evaluate(replace)
        accs.append(result["accuracy"])
        losses.append(result["loss"])
    return NodeAblationCurve(
        layer,
        basis.config.method,
        kind,
        n_features,
        schedule,
        accs,
        losses,
        base["accuracy"],
        base["loss"],
        {"seconds": time.perf_counter() - start},
    )


def node_ablation_curves(
    model: nn.Module,
    data: Any,
    basis: Any,
    *,
    layers: Sequence[str] | None = None,
    labels: Tensor | None = None,
    importance: str = "eigenvalues",
    graph: Any | None = None,
    num_points: int = 24,
    batch_size: int | None = None,
    dtype: str | None = None,
    metrics: Metrics = classification_metrics,
) -> dict[str, NodeAblationCurve]:
    """:func:`node_ablation_curve` for every node layer except the model output (or ``layers``).

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> curves = node_ablation_curves(model, x, B, labels=model(x).argmax(-1), num_points=3)
    >>> sorted(curves)
    ['1', '2']
    """
    runner = _Runner(model, data, basis, labels, batch_size, dtype, metrics)
    names = layers or [layer.name for layer in runner.layers if not layer.is_output]
    out = {}
    for name in names:
        n = basis[name].dim - (1 if runner.constant else 0)
        out[name] = node_ablation_curve(
            model,
            data,
            basis,
            name,
            n_kept=default_schedule(n, num_points),
            importance=importance,
            graph=graph,
            metrics=metrics,
            _runner=runner,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Edge ablation


def edge_mask(edges: Tensor, n_kept: int, *, keep_constant: bool) -> Tensor:
    """Boolean mask of the ``n_kept`` largest edges (ties broken by position, so exactly n_kept).

    With ``keep_constant`` the column of the constant input direction (j = 0) is always kept and not
    counted.

    >>> edge_mask(torch.tensor([[0.0, 3.0], [2.0, 1.0]]), 2, keep_constant=False).tolist()
    [[False, True], [True, False]]
    """
    sub = edges[:, 1:] if keep_constant else edges
    flat = sub.flatten()
    if n_kept < 0 or n_kept > flat.numel():
        raise ValueError(f"n_kept must lie in [0, {flat.numel()}], got {n_kept}")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if n_kept > 0:
        keep[torch.argsort(flat, descending=True, stable=True)[:n_kept]] = True
    keep = keep.reshape(sub.shape)
    if keep_constant:
        keep = torch.cat([torch.ones(edges.shape[0], 1, dtype=torch.bool), keep], dim=1)
    return keep


@dataclass(frozen=True)
class EdgeAblationResult:
    """Bisection result for one layer pair.

    Attributes:
        n_edges: the number of candidate edges (constant-direction edges excluded).
        n_needed: the fewest kept edges whose accuracy is within ``delta`` of ``base_accuracy``.
        threshold: E of the smallest kept edge at ``n_needed`` (a natural ε for modules, METHOD §5).
        evaluations: ``{n_kept: accuracy}`` for every evaluated point.

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> G = degeneracy.interaction_graph(model, x, B, progress=False)
    >>> results = edge_ablation(model, x, B, G, labels=model(x).argmax(-1), delta=0.1)
    >>> r = results[("1", "2")]
    >>> r.pair, 0 <= r.n_needed <= r.n_edges
    (('1', '2'), True)
    """

    pair: Pair
    basis_method: str
    n_edges: int
    n_needed: int
    threshold: float
    delta: float
    base_accuracy: float
    target: float
    evaluations: dict[int, float]
    losses: dict[int, float]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pair"] = list(self.pair)
        return d


def _edge_replace(
    runner: _Runner,
    src: str,
    dst: str,
    mask: Tensor,
    max_elements: int,
    shortcut: Callable[[Any, Tensor], Tensor] | None = None,
) -> Callable[[Any, Tensor], tuple[str, Tensor]]:
    """New activations of ``dst`` when output feature i only receives its kept edges."""
    b_in, b_out = runner.basis[src], runner.basis[dst]
    means = runner.feature_means()[src]
    patterns, group = torch.unique(mask, dim=0, return_inverse=True)

    def replace(inputs: Any, _: Tensor) -> tuple[str, Tensor]:
        model, layers = runner.run.model, runner.layers
        x = capture(model, inputs, layers, [src], constant=runner.constant)[src]
        f = x.to(torch.float64) @ b_in.C.to(x.device).T  # (b, P_in, k)
        batch = f.shape[0]
        out = None
        per_group = max(1, max_elements // max(1, batch * f.shape[1] * max(f.shape[2], x.shape[2])))
        for start in range(0, patterns.shape[0], per_group):
            pats = patterns[start : start + per_group].to(f.device)  # (g, k)
            g = pats.shape[0]
            ablated = torch.where(pats[:, None, None, :], f[None], means.to(f.device))  # (g, b, P, k)
            xa = (ablated @ b_in.C_pinv.to(f.device).T).reshape(g * batch, *x.shape[1:])
            if isinstance(inputs, Mapping):
                rep: Any = {key: v.repeat(g, *([1] * (v.dim() - 1))) for key, v in inputs.items()}
            else:
                rep = inputs.repeat(g, *([1] * (inputs.dim() - 1)))
            if shortcut is not None:
                fn = extended(shortcut, rep, runner.constant)
            else:
                fn = section(model, rep, layers, src, dst, constant=runner.constant, widths=runner.widths)
            y = fn(xa.to(runner.run.dtype)).to(torch.float64) @ b_out.C.to(f.device).T  # (g·b, P_out, m)
            y = y.reshape(g, batch, *y.shape[1:])
            if out is None:
                out = torch.zeros(batch, y.shape[2], b_out.dim, dtype=torch.float64, device=f.device)
            for local in range(g):
                rows = (group == start + local).to(f.device)
                out[:, :, rows] = y[local][:, :, rows]
        assert out is not None
        dst_layer = next(layer for layer in layers if layer.name == dst)
        if dst_layer.is_output:
            acts = out @ b_out.C_pinv.to(out.device).T
            acts = acts[..., :-1] if runner.constant else acts
            return dst, acts
        return dst, runner.to_activations(dst, out)

    return replace


def bisect_edges(
    score: Callable[[int], dict[str, float]],
    n_total: int,
    target: float,
    scaling: Literal["logarithmic", "linear"] = "logarithmic",
) -> tuple[int, dict[int, dict[str, float]]]:
    """The smallest n in [0, n_total] with ``score(n)["accuracy"] >= target``, by bisection.

    Assumes ``score(n_total)`` meets the target and accuracy grows with n; returns the answer and
    every evaluated point. The answer's lower neighbour n − 1 is always among the evaluated points
    (unless the answer is 0).

    >>> n, evaluated = bisect_edges(lambda n: {"accuracy": float(n >= 13)}, 100, target=1.0)
    >>> n, 12 in evaluated
    (13, True)
    """
    evaluated: dict[int, dict[str, float]] = {0: score(0)}
    if evaluated[0]["accuracy"] >= target:
        return 0, evaluated
    lo, hi = 0, n_total  # accuracy(lo) < target <= accuracy(hi)
    while hi - lo > 1:
        if scaling == "logarithmic":
            mid = int(math.exp(0.5 * (math.log(max(lo, 1)) + math.log(hi))))
        elif scaling == "linear":
            mid = (lo + hi) // 2
        else:
            raise ValueError(f"scaling must be 'logarithmic' or 'linear', got {scaling!r}")
        mid = min(max(mid, lo + 1), hi - 1)
        evaluated[mid] = score(mid)
        if evaluated[mid]["accuracy"] >= target:
            hi = mid
        else:
            lo = mid
    return hi, evaluated


def edge_ablation(
    model: nn.Module,
    data: Any,
    basis: Any,
    graph: Any,
    *,
    labels: Tensor | None = None,
    delta: float = 0.001,
    pairs: Sequence[Pair] | None = None,
    scaling: Literal["logarithmic", "linear"] = "logarithmic",
    batch_size: int | None = None,
    dtype: str | None = None,
    max_elements: int = 2**23,
    metrics: Metrics = classification_metrics,
    sections: Sections = "auto",
    progress: bool = False,
) -> dict[Pair, EdgeAblationResult]:
    """Bisect, per layer pair, for the fewest edges that keep accuracy within ``delta`` of the model.

    Args:
        model, data, basis, graph: the graph must have been computed in ``basis``.
        labels: aligned with a tensor ``data`` (or batches ``(inputs, labels)``).
        delta: allowed accuracy drop (absolute; 0.001 = 0.1 %).
        pairs: layer pairs to study (default: all).
        scaling: bisection midpoint on a ``"logarithmic"`` (default) or ``"linear"`` scale.
        max_elements: bounds the batched group passes (entries of one stacked activation tensor).
        sections: section shortcuts as for :func:`degeneracy.interaction_graph` (``"auto"``,
            ``None`` or a mapping; checked against the model on the first batch before use).

    Returns:
        ``{pair: EdgeAblationResult}``.

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> G = degeneracy.interaction_graph(model, x, B, progress=False)
    >>> results = edge_ablation(model, x, B, G, labels=model(x).argmax(-1))
    >>> list(results)
    [('1', '2'), ('2', 'output')]
    """
    if delta < 0:
        raise ValueError("delta must be >= 0")
    if list(graph.names) != list(basis.names):
        raise ValueError("the graph and the basis have different node layers")
    runner = _Runner(model, data, basis, labels, batch_size, dtype, metrics)
    shortcuts = {}
    if sections is not None:
        inputs, _ = next(iter(runner.batches()))
        with torch.no_grad():
            acts = capture(runner.run.model, inputs, runner.layers, constant=runner.constant)
            shortcuts, _ = resolve_sections(
                runner.run.model,
                runner.layers,
                inputs,
                acts,
                sections,
                constant=runner.constant,
                widths=runner.widths,
            )
    base = runner.evaluate(None)
    target = base["accuracy"] - delta
    results = {}
    for pair in pairs or graph.pairs:
        start = time.perf_counter()
        src, dst = pair
        E = graph.edges[pair]
        keep_constant = graph.has_constant
        n_total = E[:, 1:].numel() if keep_constant else E.numel()
        accs: dict[int, float] = {n_total: base["accuracy"]}
        losses: dict[int, float] = {n_total: base["loss"]}

        def score(n: int, src: str = src, dst: str = dst, E: Tensor = E, kc: bool = keep_constant) -> dict:
            mask = edge_mask(E, n, keep_constant=kc)
            replace = _edge_replace(runner, src, dst, mask, max_elements, shortcuts.get((src, dst)))
            res = runner.evaluate(replace)
            if progress:
                print(f"  {src}->{dst}: {n} edges kept, accuracy {res['accuracy']:.5f}")
            return res

        needed, evaluated = bisect_edges(score, n_total, target, scaling)
        for n, res in evaluated.items():
            accs[n], losses[n] = res["accuracy"], res["loss"]
        sub = E[:, 1:] if keep_constant else E
        ordered = sub.flatten().sort(descending=True).values
        threshold = float(ordered[needed - 1]) if needed > 0 else float(ordered[0]) * 1.0000001
        results[pair] = EdgeAblationResult(
            pair,
            basis.config.method,
            n_total,
            needed,
            threshold,
            delta,
            base["accuracy"],
            target,
            dict(sorted(accs.items())),
            dict(sorted(losses.items())),
            {"seconds": time.perf_counter() - start, "evaluations": len(accs) - 1},
        )
    return results
