"""Running a model with modified node layers: the metrics and the runner shared by node and edge ablations."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from degeneracy.basis import NodeLayerRun
from degeneracy.capture import NodeLayer, capture, forward
from degeneracy.cuts import check_basis_fits
from degeneracy.data import eval_mode, input_mask
from degeneracy.distributed import all_reduce_sum, sum_scalars
from degeneracy.run import full_precision, shard

__all__ = [
    "classification_metrics",
    "embedding_metrics",
    "mse_metrics",
    "METRICS",
    "MetricName",
    "resolve_metrics",
    "pooled",
    "finish_metrics",
    "default_schedule",
    "AblationRunner",
    "MODEL_OUTPUT",
    "Pair",
    "Metrics",
]

Pair = tuple[str, str]
Metrics = Callable[..., dict[str, float]]
"""``metrics(output, labels)`` or ``metrics(output, labels, mask=)`` (valid positions): per-batch sums
``{"correct", "loss", "count"}``."""
MODEL_OUTPUT = NodeLayer("__model_output__", ("output",))
EVALUATION_STEP = 128
"""Ablation evaluations run each batch in pieces of this many examples, so that the progress bar moves
within a batch (the accuracy is an exact count; sums of the loss change only by float64 round-off)."""


def _last_valid(x: Tensor, mask: Tensor | None) -> Tensor:
    """(b, P, d) → (b, d) at each example's last valid position (the last position without a mask)."""
    if mask is None or mask.shape[:2] != x.shape[:2]:
        return x[:, -1]
    last = (mask.long() * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]


def pooled(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The mean of (b, P, d) activations over each example's valid positions (``mask``, (b, P) bools;
    all without one), as (b, d) float64: the sentence embedding of mean-pooling encoders. (b, d) is
    returned as is.

    >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])
    >>> pooled(x, torch.tensor([[True, True, False]])).tolist()
    [[2.0]]
    """
    x = x.to(torch.float64)
    if x.dim() == 2:
        return x
    if mask is None or mask.shape[:2] != x.shape[:2]:
        return x.mean(1)
    w = mask.to(device=x.device, dtype=torch.float64)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def classification_metrics(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Summed correct predictions and cross-entropy over a batch (the last position of (b, P, V) logits,
    or each example's last valid position where ``mask`` marks padding).

    Returns ``{"correct": Σ 1[argmax = label], "loss": Σ CE, "count": b}`` (sums, so batches add up).

    >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # (batch, pos, classes)
    >>> m = classification_metrics(logits, torch.tensor([0, 0]))
    >>> m["correct"], round(m["loss"], 4)
    (1.0, 2.2539)
    """
    if logits.dim() == 3:
        logits = _last_valid(logits, mask)
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"classification metrics score one label per example (the last valid position of a sequence "
            f"output), got labels of shape {tuple(labels.shape)} for {logits.shape[0]} examples; pass "
            "labels of shape (examples,), or metrics=a function (logits, labels, mask) -> sums such as "
            "classification_metrics' for labels per position"
        )
    logits = logits.to(torch.float64)
    labels = labels.to(logits.device)
    return {
        "correct": float((logits.argmax(-1) == labels).sum()),
        "loss": float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
        "count": float(labels.shape[0]),
    }


def embedding_metrics(output: Tensor, reference: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Cosine similarity and squared error of the pooled embedding (:func:`pooled`, padding left out)
    against the ``reference`` (the unablated model's output, or given target embeddings).

    Returns ``{"correct": Σ cos, "loss": Σ mean-squared error, "count": b}``: after
    :func:`finish_metrics` the ``accuracy`` is the mean cosine similarity (1 when unchanged) and the
    ``loss`` the mean squared error per embedding entry.

    >>> out = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    >>> m = embedding_metrics(out, torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]]))
    >>> m["correct"], m["loss"], m["count"]
    (1.0, 4.0, 2.0)
    """
    a, b = pooled(output, mask), pooled(reference, mask).to(output.device)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    mse = (a - b).square().mean(-1)
    return {"correct": float(cos.sum()), "loss": float(mse.sum()), "count": float(a.shape[0])}


def mse_metrics(output: Tensor, targets: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Squared error of a regression output against ``targets`` (the unablated model's output by
    default), at the valid positions (``mask``) of (b, P, d) outputs.

    Returns ``{"correct": −Σ mse, "loss": Σ mse, "count": b}``, mse the mean over an example's valid
    entries: after :func:`finish_metrics` the ``loss`` is the MSE and the ``accuracy`` (the score that
    edge-ablation bisection keeps within ``delta``) is −MSE.

    >>> m = mse_metrics(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> m["loss"], m["correct"]
    (2.5, -2.5)
    """
    out = output.to(torch.float64)
    t = targets.to(device=out.device, dtype=torch.float64).reshape(out.shape)
    err = (out - t).square()
    if mask is not None and out.dim() == 3 and mask.shape[:2] == out.shape[:2]:
        w = mask.to(device=out.device, dtype=torch.float64)[..., None]
        per = (err * w).sum((1, 2)) / (w.sum((1, 2)) * out.shape[-1]).clamp_min(1.0)
    else:
        per = err.reshape(err.shape[0], -1).mean(1)
    return {"correct": -float(per.sum()), "loss": float(per.sum()), "count": float(out.shape[0])}


MetricName = Literal["classification", "embedding", "mse"]
METRICS: dict[str, Metrics] = {
    "classification": classification_metrics,
    "embedding": embedding_metrics,
    "mse": mse_metrics,
}
"""The ablation metrics by name: labels (classification), embeddings (cosine similarity of the pooled
embedding; MSE) and regression outputs (MSE). Those but ``"classification"`` compare with the unablated
model's own output when no labels are given."""


def resolve_metrics(metrics: MetricName | Metrics) -> Metrics:
    """The metric function of a name in :data:`METRICS`, or ``metrics`` itself if callable.

    >>> resolve_metrics("embedding") is embedding_metrics
    True
    """
    if callable(metrics):
        return metrics
    if metrics not in METRICS:
        raise ValueError(f"metrics must be one of {sorted(METRICS)} or a function, got {metrics!r}")
    return METRICS[metrics]


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
        metrics: MetricName | Metrics,
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
        last = self.layers[-1]  # the model output the basis reads (a named output), if it reads one
        key = last.output if last.is_output else None
        self.model_output = NodeLayer(MODEL_OUTPUT.name, ("output",), output=key)
        self.all_layers = self.layers + [self.model_output]
        self.basis = basis
        if labels is not None and isinstance(data, Tensor | Mapping):
            labels = shard(labels)  # aligned with this rank's share of the data (ModelRun shards it)
        self.labels = labels
        self.metrics = resolve_metrics(metrics)
        self.masked = "mask" in inspect.signature(self.metrics).parameters
        self.references: dict[tuple[int | None, int], Tensor] = {}  # unablated output by (step, piece)
        self.constant = bool(basis.config.has_constant)
        self.means: dict[str, Tensor] = {}
        self.widths: dict[str, list[int]] = {}
        self.progress = False  # a bar per pass over the data (examples, ETA) when in a terminal
        self.desc = "ablation"

    def batches(self, step: int | None = None) -> Iterator[tuple[Any, Tensor]]:
        offset = 0
        for i, batch in enumerate(self.run.batches(self.desc, self.progress, step=step)):
            inputs = batch.inputs
            if self.labels is not None:
                labels = self.labels[offset : offset + batch.size]
            elif batch.extras and isinstance(batch.extras[0], Tensor):
                labels = batch.extras[0]
            elif self.metrics is not classification_metrics:  # compare with the unablated model
                labels = self.references.get((step, i))
                if labels is None:
                    with torch.no_grad():
                        labels = forward(self.run.model, inputs, self.all_layers, capture=[MODEL_OUTPUT.name])
                    labels = labels[MODEL_OUTPUT.name]
                    if isinstance(self.run.data, Tensor | Mapping):  # the same batches every pass
                        self.references[(step, i)] = labels
            else:
                raise ValueError(
                    "ablations need labels: pass labels=..., or data batches (inputs, labels), or "
                    "metrics='embedding' / 'mse' to compare with the model's own output"
                )
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
        with torch.no_grad(), full_precision(), eval_mode(self.run.model):
            for inputs, _ in self.batches():
                acts = capture(self.run.model, inputs, self.layers, constant=self.constant)
                masks = self.run.masks(inputs, acts)
                for name, x in acts.items():
                    x = x if masks[name] is None else x[masks[name].to(x.device)]  # valid positions
                    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
                    sums[name] = sums.get(name, 0) + flat.sum(0)
                    count[name] = count.get(name, 0) + flat.shape[0]
        for name in sorted(sums):  # under torch.distributed: every rank's shard, in one order
            sums[name] = all_reduce_sum(sums[name])
            count[name] = int(all_reduce_sum(torch.tensor([float(count[name])], dtype=torch.float64)).item())
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
        with torch.no_grad(), full_precision(), eval_mode(self.run.model):
            for inputs, labels in self.batches(EVALUATION_STEP):  # the bar moves per piece of a batch
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
                extra = {"mask": input_mask(inputs)} if self.masked else {}
                for key, value in self.metrics(logits, labels, **extra).items():
                    sums[key] = sums.get(key, 0.0) + value
        return finish_metrics(sum_scalars(sums))  # summed over ranks: every rank decides alike
