"""Running a model with modified node layers: the metrics and the runner shared by node and edge ablations."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.basis import NodeLayerRun
from degeneracy.capture import NodeLayer, capture, forward
from degeneracy.checks import check_basis_fits

__all__ = [
    "classification_metrics",
    "finish_metrics",
    "default_schedule",
    "AblationRunner",
    "MODEL_OUTPUT",
    "Pair",
    "Metrics",
]

Pair = tuple[str, str]
Metrics = Callable[[Tensor, Tensor], dict[str, float]]
MODEL_OUTPUT = NodeLayer("__model_output__", ("output",))


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


def finish_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Accuracy and mean loss from the summed metrics of :func:`classification_metrics` (``count`` ≥ 1).

    >>> finish_metrics({"correct": 3.0, "loss": 1.5, "count": 4.0})
    {'accuracy': 0.75, 'loss': 0.375}
    """
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


class AblationRunner:
    """Model, node layers and labelled data of one ablation study (inputs cast like the basis build).

    >>> import degeneracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    >>> x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> B = degeneracy.interaction_basis(model, x, ["1", "output"], method="pca", progress=False)
    >>> runner = AblationRunner(model, x, B, model(x).argmax(-1), None, None, classification_metrics)
    >>> metrics = runner.evaluate(None)  # nothing replaced: the model itself, scored on its own argmax
    >>> [layer.name for layer in runner.layers], metrics["accuracy"], runner.feature_means()["1"].shape
    (['1', 'output'], 1.0, torch.Size([3]))
    """

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
        if self.run.probe is not None:
            check_basis_fits(self.run.model, self.run.probe, self.run.layers, basis)
        self.layers = list(self.run.layers)
        self.all_layers = self.layers + [MODEL_OUTPUT]
        self.basis = basis
        self.labels = labels
        self.metrics = metrics
        self.constant = bool(basis.config.has_constant)
        self.means: dict[str, Tensor] = {}
        self.widths: dict[str, list[int]] = {}
        self.progress = False  # a bar per pass over the data (examples, ETA) when in a terminal
        self.desc = "ablation"

    def batches(self) -> Iterator[tuple[Any, Tensor]]:
        offset = 0
        for batch in self.run.batches(self.desc, self.progress):
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
                    out = forward(self.run.model, inputs, self.all_layers, capture=[MODEL_OUTPUT.name])
                    logits = out[MODEL_OUTPUT.name]
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
                            capture=[MODEL_OUTPUT.name],
                            substitute={name: acts},
                            widths=self.widths,
                        )
                        logits = out[MODEL_OUTPUT.name]
                for key, value in self.metrics(logits, labels).items():
                    sums[key] = sums.get(key, 0.0) + value
        return finish_metrics(sums)
