"""Edge ablation by bisection (package docstring of :mod:`degeneracy.ablation`)."""


from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from degeneracy.ablation.runner import AblationRunner, MetricName, Metrics, Pair, classification_metrics
from degeneracy.capture import capture, section
from degeneracy.deprecation import renamed_arguments, renamed_fields
from degeneracy.distributed import is_main
from degeneracy.fingerprint import basis_fingerprint, check_model, check_same_basis, result_fingerprint
from degeneracy.sections import Sections, extended, resolve_sections

logger = logging.getLogger("degeneracy")

__all__ = ["EdgeAblationResult", "edge_ablation", "edge_mask", "bisect_edges"]

# ---------------------------------------------------------------------------------------------------
# Edge ablation


@renamed_arguments(n_kept="num_kept")
def edge_mask(edges: Tensor, num_kept: int, *, keep_constant: bool) -> Tensor:
    """Boolean mask of the ``num_kept`` largest edges (ties broken by position, so exactly num_kept).

    With ``keep_constant`` the column of the constant input direction (j = 0) is always kept and not
    counted. ``n_kept=`` is the former, deprecated name of ``num_kept``.

    >>> edge_mask(torch.tensor([[0.0, 3.0], [2.0, 1.0]]), 2, keep_constant=False).tolist()
    [[False, True], [True, False]]
    """
    sub = edges[:, 1:] if keep_constant else edges
    flat = sub.flatten()
    if num_kept < 0 or num_kept > flat.numel():
        raise ValueError(f"num_kept must lie in [0, {flat.numel()}], got {num_kept}")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if num_kept > 0:
        keep[torch.argsort(flat, descending=True, stable=True)[:num_kept]] = True
    keep = keep.reshape(sub.shape)
    if keep_constant:
        keep = torch.cat([torch.ones(edges.shape[0], 1, dtype=torch.bool), keep], dim=1)
    return keep


@renamed_fields(n_edges="num_edges", n_needed="num_needed")
@dataclass(frozen=True)
class EdgeAblationResult:
    """Bisection result for one layer pair.

    Attributes:
        num_edges: the number of candidate edges (constant-direction edges excluded).
        num_needed: the fewest kept edges whose accuracy is within ``delta`` of ``base_accuracy``.
        threshold: E of the smallest kept edge at ``num_needed`` (a natural ε for modules, METHOD §5).
        evaluations: ``{num_kept: accuracy}`` for every evaluated point.

    ``n_edges`` and ``n_needed`` are the former, deprecated names of ``num_edges`` and ``num_needed``
    (as attributes and constructor keywords; :meth:`from_dict` reads dicts with either key).

    >>> r = EdgeAblationResult(("1", "2"), "lib", num_edges=4, num_needed=1, threshold=0.5, delta=0.1,
    ...                        base_accuracy=1.0, target=0.9, evaluations={0: 0.5, 1: 0.95, 4: 1.0},
    ...                        losses={0: 1.0, 1: 0.1, 4: 0.0})
    >>> r.num_needed <= r.num_edges and r.evaluations[r.num_needed] >= r.target
    True
    >>> EdgeAblationResult.from_dict(r.to_dict()) == r
    True
    """


    pair: Pair
    basis_method: str
    num_edges: int
    num_needed: int
    threshold: float
    delta: float
    base_accuracy: float
    target: float
    evaluations: dict[int, float]
    losses: dict[int, float]
    info: dict[str, Any] = field(default_factory=dict)



    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (the pair as a list).

        >>> r = EdgeAblationResult(("1", "2"), "lib", 4, 1, 0.5, 0.1, 1.0, 0.9, {0: 0.5}, {0: 1.0})
        >>> r.to_dict()["num_needed"], r.to_dict()["pair"]
        (1, ['1', '2'])
        """
        d = dataclasses.asdict(self)
        d["pair"] = list(self.pair)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EdgeAblationResult:
        """The result of a :meth:`to_dict` (after a JSON round trip: string keys, lists); dicts written
        before the ``num_*`` names (``n_edges``, ``n_needed``) load too.

        >>> old = {"pair": ["1", "2"], "basis_method": "lib", "n_edges": 4, "n_needed": 1,
        ...        "threshold": 0.5, "delta": 0.1, "base_accuracy": 1.0, "target": 0.9,
        ...        "evaluations": {"0": 0.5, "1": 0.95}, "losses": {"0": 1.0, "1": 0.1}}
        >>> r = EdgeAblationResult.from_dict(old)
        >>> r.pair, r.num_edges, r.num_needed, r.evaluations
        (('1', '2'), 4, 1, {0: 0.5, 1: 0.95})
        """
        values = {cls.RENAMED.get(k, k): v for k, v in d.items()}
        values["pair"] = tuple(values["pair"])
        values["evaluations"] = {int(k): v for k, v in values["evaluations"].items()}
        values["losses"] = {int(k): v for k, v in values["losses"].items()}
        return cls(**values)



def _edge_replace(
    runner: AblationRunner,
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
                where = next(lay.positions for lay in layers if lay.name == src)
                fn = extended(shortcut, rep, runner.constant, where)
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


@renamed_arguments(n_total="num_total")
def bisect_edges(
    score: Callable[[int], dict[str, float]],
    num_total: int,
    target: float,
    scaling: Literal["logarithmic", "linear"] = "logarithmic",
) -> tuple[int, dict[int, dict[str, float]]]:
    """The smallest n in [0, num_total] with ``score(n)["accuracy"] >= target``, by bisection.

    Assumes ``score(num_total)`` meets the target and accuracy grows with n; returns the answer and
    every evaluated point. The answer's lower neighbour n − 1 is always among the evaluated points
    (unless the answer is 0). ``n_total=`` is the former, deprecated name of ``num_total``.

    >>> n, evaluated = bisect_edges(lambda n: {"accuracy": float(n >= 13)}, 100, target=1.0)
    >>> n, 12 in evaluated
    (13, True)
    """
    evaluated: dict[int, dict[str, float]] = {0: score(0)}
    if evaluated[0]["accuracy"] >= target:
        return 0, evaluated
    lo, hi = 0, num_total  # accuracy(lo) < target <= accuracy(hi)
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
    metrics: MetricName | Metrics = classification_metrics,
    sections: Sections = "auto",
    progress: bool = False,
    allow_other_model: bool = False,
) -> dict[Pair, EdgeAblationResult]:
    """Bisect, per layer pair, for the fewest edges that keep accuracy within ``delta`` of the model.

    Args:
        model, data, basis, graph: the graph must have been computed in ``basis``.
        labels: aligned with a tensor ``data`` (or batches ``(inputs, labels)``).
        delta: allowed accuracy drop (absolute; 0.001 = 0.1 %).
        metrics: as for :func:`~degeneracy.ablation.node_ablation_curve` (``"classification"``,
            ``"embedding"``, ``"mse"`` or a function); bisection keeps its ``accuracy`` within ``delta``.
        pairs: layer pairs to study (default: all).
        scaling: bisection midpoint on a ``"logarithmic"`` (default) or ``"linear"`` scale.
        max_elements: bounds the batched group passes (entries of one stacked activation tensor).
        sections: section shortcuts as for :func:`degeneracy.interaction_graph` (``"auto"``,
            ``None`` or a mapping; checked against the model on the first batch before use).
        allow_other_model: use a basis (or graph) built on another model or basis, with a warning,
            instead of a ``ModelMismatchError`` (:func:`degeneracy.fingerprint.check_model`).

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
    check_model(basis, model, allow_other_model=allow_other_model)
    check_same_basis(graph, basis, allow_other_model=allow_other_model)
    runner = AblationRunner(model, data, basis, labels, batch_size, dtype, metrics)
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
    runner.progress = progress  # a bar per evaluation (examples, ETA) when in a terminal (not the probe)
    base = runner.evaluate(None)
    target = base["accuracy"] - delta
    recorded = result_fingerprint(model, data, basis=basis_fingerprint(basis))  # in every result's info
    results = {}
    for pair in pairs or graph.pairs:
        start = time.perf_counter()
        src, dst = pair
        E = graph.edges[pair]
        keep_constant = graph.has_constant
        num_total = E[:, 1:].numel() if keep_constant else E.numel()
        accs: dict[int, float] = {num_total: base["accuracy"]}
        losses: dict[int, float] = {num_total: base["loss"]}

        def score(n: int, src: str = src, dst: str = dst, E: Tensor = E, kc: bool = keep_constant) -> dict:
            runner.desc = f"{src}->{dst}: {n} edges"
            mask = edge_mask(E, n, keep_constant=kc)
            replace = _edge_replace(runner, src, dst, mask, max_elements, shortcuts.get((src, dst)))
            res = runner.evaluate(replace)
            line = f"{src}->{dst}: {n} edges kept, accuracy {res['accuracy']:.5f}"
            logger.info(line)  # the degeneracy logger; on a terminal also a line above the bars (stderr)
            if progress and is_main() and sys.stderr.isatty():
                tqdm.write("  " + line, file=sys.stderr)
            return res

        needed, evaluated = bisect_edges(score, num_total, target, scaling)
        for n, res in evaluated.items():
            accs[n], losses[n] = res["accuracy"], res["loss"]
        sub = E[:, 1:] if keep_constant else E
        ordered = sub.flatten().sort(descending=True).values
        threshold = float(ordered[needed - 1]) if needed > 0 else float(ordered[0]) * 1.0000001
        results[pair] = EdgeAblationResult(
            pair,
            basis.config.method,
            num_total,
            needed,
            threshold,
            delta,
            base["accuracy"],
            target,
            dict(sorted(accs.items())),
            dict(sorted(losses.items())),
            {"seconds": time.perf_counter() - start, "evaluations": len(accs) - 1, "fingerprint": recorded},
        )
    return results
