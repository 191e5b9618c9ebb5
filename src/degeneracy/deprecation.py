"""Renamed entry points keep working for a while and warn with the new name (as devinterp does).

>>> @renamed_arguments(position="positions")
... def f(*, positions=None):
...     return positions
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     f(position=-1), caught[0].category.__name__
(-1, 'DeprecationWarning')
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed_arguments", "deprecated_alias"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Accept the old keyword ``old=`` of a function whose argument is now ``new`` (``old="new"``),
    with a ``DeprecationWarning``; passing both is a ``TypeError``.

    >>> import warnings
    >>> @renamed_arguments(position="positions")
    ... def f(*, positions=None):
    ...     return positions
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     f(position=-1), caught[0].category.__name__
    (-1, 'DeprecationWarning')
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old!r} (deprecated) and {new!r}")
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is deprecated; use {new}=...",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def deprecated_alias(fn: F, old_name: str) -> F:
    """``fn`` under its old name ``old_name``, warning with the new name on each call.

    >>> def new():
    ...     return 1
    >>> old = deprecated_alias(new, "old")
    >>> with warnings.catch_warnings(record=True):
    ...     warnings.simplefilter("always")
    ...     old()
    1
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"{old_name} is deprecated; use {fn.__module__}.{fn.__name__}",
            DeprecationWarning,
            stacklevel=2,
        )
        return fn(*args, **kwargs)

    wrapper.__name__ = old_name
    return wrapper  # type: ignore[return-value]
