"""Moved to :mod:`degeneracy.adapters.transformer_lens.forward` (kept for old imports).

>>> from degeneracy.accounting.fast_forward import last_position_logits
>>> last_position_logits.__module__
'degeneracy.adapters.transformer_lens.forward'
"""

from __future__ import annotations

import warnings

from degeneracy.adapters.transformer_lens.forward import last_position_logits, supports_last_position_logits

__all__ = ["last_position_logits", "supports_last_position_logits"]

warnings.warn(
    "degeneracy.accounting.fast_forward is deprecated; "
    "import from degeneracy.adapters.transformer_lens.forward",
    DeprecationWarning,
    stacklevel=2,
)
