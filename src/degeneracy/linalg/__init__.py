"""Pure linear algebra (float64 throughout): eigendecompositions, Krylov methods, integration rules.

* :mod:`degeneracy.linalg.eigen`: the package's one eigh (:func:`eigh_descending`), truncation,
  whitening, centring maps, PSD spectra and rank counts;
* :mod:`degeneracy.linalg.krylov`: Lanczos, block Lanczos, stochastic Lanczos quadrature and
  Hutchinson's trace on an operator given by its products;
* :mod:`degeneracy.linalg.integration`: integration rules on [0, 1] for integrated gradients.

Functions take tensors (or product callables) and return tensors; nothing here knows about models.

>>> import torch
>>> rank_at(eigh_descending(torch.diag(torch.tensor([2.0, 1.0, 0.0]))).values)
2
"""

from __future__ import annotations

from degeneracy.linalg.eigen import (
    SINGLE_THREAD_EIGH,
    Eigh,
    centering_maps,
    eigh_descending,
    intra_op_threads,
    psd_eigenvalues,
    rank_at,
    truncate,
    whitening,
)
from degeneracy.linalg.integration import (
    INTEGRATION_RULES,
    IntegrationRule,
    homogeneous_rule,
    integration_rule,
)
from degeneracy.linalg.krylov import (
    block_krylov_top,
    hutchinson_trace,
    lanczos_top,
    lanczos_tridiagonal,
    slq_nodes,
    slq_nodes_batched,
    slq_rank,
    tridiagonal,
)

__all__ = [
    "Eigh",
    "eigh_descending",
    "intra_op_threads",
    "SINGLE_THREAD_EIGH",
    "truncate",
    "whitening",
    "IntegrationRule",
    "integration_rule",
    "INTEGRATION_RULES",
    "homogeneous_rule",
    "centering_maps",
    "psd_eigenvalues",
    "rank_at",
    "lanczos_tridiagonal",
    "tridiagonal",
    "lanczos_top",
    "block_krylov_top",
    "slq_nodes",
    "slq_nodes_batched",
    "slq_rank",
    "hutchinson_trace",
]
