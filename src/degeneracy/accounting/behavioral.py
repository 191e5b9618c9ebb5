"""The behavioral loss lives in :mod:`degeneracy.behavioral` (one definition for the whole package;
kept here for old imports). The accounting's convention, the sum over output positions, is that
module's.

>>> from degeneracy.accounting.behavioral import behavioral_loss
>>> behavioral_loss.__module__
'degeneracy.behavioral'
"""

from __future__ import annotations

import warnings

from degeneracy.behavioral import (
    KINDS,
    LossKind,
    behavioral_loss,
    behavioral_loss_function,
    check_kind,
    whiten_outputs,
)

__all__ = ["behavioral_loss", "behavioral_loss_function", "whiten_outputs", "LossKind", "KINDS", "check_kind"]

warnings.warn(
    "degeneracy.accounting.behavioral is deprecated; import from degeneracy.behavioral",
    DeprecationWarning,
    stacklevel=2,
)
