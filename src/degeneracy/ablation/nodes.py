"""Node ablation curves (package docstring of :mod:`degeneracy.ablation`)."""


from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.ablation.runner import (
    AblationRunner,
    MetricName,
    Metrics,
    classification_metrics,
    default_schedule,
)
from degeneracy.capture import capture
from degeneracy.deprecation import renamed_arguments, renamed_fields
from degeneracy.fingerprint import basis_fingerprint, check_model, check_same_basis, result_fingerprint

__all__ = ["NodeAblationCurve", "node_ablation_curve", "node_ablation_curves"]

# ---------------------------------------------------------------------------------------------------
# Node ablation


@renamed_fields(n_features="num_features", n_kept="num_kept")
@dataclass(frozen=True)
class NodeAblationCurve:
    """Accuracy and loss when only the ``num_kept`` most important features of ``layer`` are kept.

    ``num_kept`` counts non-constant features (``num_features`` of them); the constant direction (if
    any) is always kept. ``n_features`` and ``n_kept`` are the former, deprecated names (as attributes
    and constructor keywords; :meth:`from_dict` reads dicts with either key).

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> labels = model(x).argmax(-1)
    >>> curve = node_ablation_curve(model, x, B, "2", labels=labels, num_kept=[0, B["2"].dim - 1])
    >>> curve.num_kept == [0, B["2"].dim - 1], curve.accuracy[-1] == curve.base_accuracy == 1.0
    (True, True)
    >>> NodeAblationCurve.from_dict(curve.to_dict()) == curve
    True
    """


    layer: str
    basis_method: str
    importance: str
    num_features: int
    num_kept: list[int]
    accuracy: list[float]
    loss: list[float]
    base_accuracy: float
    base_loss: float
    info: dict[str, Any] = field(default_factory=dict)



    def to_dict(self) -> dict[str, Any]:
        """The curve as JSON-ready values.

        >>> c = NodeAblationCurve("fc1", "lib", "eigenvalues", 3, [0, 3], [0.5, 1.0], [1.0, 0.0], 1.0, 0.0)
        >>> c.to_dict()["num_kept"]
        [0, 3]
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeAblationCurve:
        """The curve of a :meth:`to_dict`; dicts written before the ``num_*`` names (``n_features``,
        ``n_kept``) load too.

        >>> old = {"layer": "fc1", "basis_method": "lib", "importance": "eigenvalues", "n_features": 3,
        ...        "n_kept": [0, 3], "accuracy": [0.5, 1.0], "loss": [1.0, 0.0], "base_accuracy": 1.0,
        ...        "base_loss": 0.0}
        >>> c = NodeAblationCurve.from_dict(old)
        >>> c.num_features, c.num_kept
        (3, [0, 3])
        """
        return cls(**{cls.RENAMED.get(k, k): v for k, v in d.items()})



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


@renamed_arguments(n_kept="num_kept")
def node_ablation_curve(
    model: nn.Module,
    data: Any,
    basis: Any,
    layer: str,
    *,
    labels: Tensor | None = None,
    num_kept: Sequence[int] | None = None,
    importance: str | Tensor = "eigenvalues",
    graph: Any | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    metrics: MetricName | Metrics = classification_metrics,
    _runner: AblationRunner | None = None,
    allow_other_model: bool = False,
) -> NodeAblationCurve:
    """Keep the top-k features of ``layer`` by importance, mean-ablate the rest, and evaluate.

    Args:
        model, data, basis: as for :func:`degeneracy.interaction_graph`; ``labels`` aligned with a
            tensor ``data`` (or batches ``(inputs, labels)``).
        layer: the node layer to ablate (not the model output).
        num_kept: numbers of non-constant features to keep (default :func:`default_schedule`;
            ``n_kept=`` is its former, deprecated name).
        importance: ``"eigenvalues"`` (Λ of LIB/global, variance of PCA), ``"edges"`` (total edge
            weight in and out, needs ``graph``) or a tensor of d̂ scores.
        metrics: per-batch sums ``{"correct", "loss", "count"}`` from (output, labels), or a name:
            ``"classification"`` (default), ``"embedding"`` (accuracy = cosine similarity of the pooled
            embedding, loss = its MSE) or ``"mse"`` (regression; accuracy = −MSE); the last two compare
            with the unablated model's output when no labels are given. Padded positions are left out.
        allow_other_model: use a basis built on another model (with a warning) instead of a
            ``ModelMismatchError`` (:func:`degeneracy.fingerprint.check_model`).

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> curve = node_ablation_curve(model, x, B, "1", labels=model(x).argmax(-1))
    >>> curve.layer, curve.num_kept[0], curve.base_accuracy
    ('1', 0, 1.0)
    """
    if _runner is None:
        check_model(basis, model, allow_other_model=allow_other_model)
        if graph is not None:  # importance="edges": the graph must come from this basis
            check_same_basis(graph, basis, allow_other_model=allow_other_model)
    runner = _runner or AblationRunner(model, data, basis, labels, batch_size, dtype, metrics)
    start = time.perf_counter()
    kind, scores = _importance(basis, layer, importance, graph)
    b = basis[layer]
    offset = 1 if runner.constant else 0
    order = offset + torch.argsort(scores[offset:], descending=True)
    num_features = b.dim - offset
    schedule = sorted(set(num_kept if num_kept is not None else default_schedule(num_features)))
    if schedule and (schedule[0] < 0 or schedule[-1] > num_features):
        raise ValueError(f"num_kept must lie in [0, {num_features}] for layer {layer!r}")
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
    info: dict[str, Any] = {"seconds": time.perf_counter() - start}
    if _runner is None:  # node_ablation_curves records it once for all its curves
        info["fingerprint"] = result_fingerprint(model, data, basis=basis_fingerprint(basis))
    return NodeAblationCurve(
        layer,
        basis.config.method,
        kind,
        num_features,
        schedule,
        accs,
        losses,
        base["accuracy"],
        base["loss"],
        info,
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
    metrics: MetricName | Metrics = classification_metrics,
    allow_other_model: bool = False,
    progress: bool = False,
) -> dict[str, NodeAblationCurve]:
    """:func:`node_ablation_curve` for every node layer except the model output (or ``layers``);
    ``allow_other_model`` as there; ``progress`` shows a bar per evaluation (examples, with an ETA).

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> curves = node_ablation_curves(model, x, B, labels=model(x).argmax(-1), num_points=3)
    >>> sorted(curves)
    ['1', '2']
    """
    check_model(basis, model, allow_other_model=allow_other_model)
    if graph is not None:  # importance="edges": the graph must come from this basis
        check_same_basis(graph, basis, allow_other_model=allow_other_model)
    runner = AblationRunner(model, data, basis, labels, batch_size, dtype, metrics)
    runner.progress = progress
    names = layers or [layer.name for layer in runner.layers if not layer.is_output]
    out = {}
    for name in names:
        n = basis[name].dim - (1 if runner.constant else 0)
        runner.desc = f"ablate {name}"
        out[name] = node_ablation_curve(
            model,
            data,
            basis,
            name,
            num_kept=default_schedule(n, num_points),
            importance=importance,
            graph=graph,
            metrics=metrics,
            _runner=runner,
        )
    recorded = result_fingerprint(model, data, basis=basis_fingerprint(basis))  # model + data + basis
    for curve in out.values():
        curve.info["fingerprint"] = recorded
    return out


