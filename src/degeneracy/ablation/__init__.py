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

from degeneracy.ablation.edges import EdgeAblationResult, bisect_edges, edge_ablation, edge_mask
from degeneracy.ablation.nodes import NodeAblationCurve, node_ablation_curve, node_ablation_curves
from degeneracy.ablation.runner import (
    METRICS,
    classification_metrics,
    default_schedule,
    embedding_metrics,
    mse_metrics,
    pooled,
)

__all__ = [
    "classification_metrics",
    "embedding_metrics",
    "mse_metrics",
    "METRICS",
    "pooled",
    "NodeAblationCurve",
    "node_ablation_curve",
    "node_ablation_curves",
    "EdgeAblationResult",
    "edge_ablation",
    "edge_mask",
    "bisect_edges",
    "default_schedule",
]
