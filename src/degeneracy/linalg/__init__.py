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

from degeneracy.linalg import eigen, integration, krylov
from degeneracy.linalg.eigen import *  # noqa: F403  (the names in eigen.__all__)
from degeneracy.linalg.integration import *  # noqa: F403
from degeneracy.linalg.krylov import *  # noqa: F403

__all__ = [*eigen.__all__, *integration.__all__, *krylov.__all__]
