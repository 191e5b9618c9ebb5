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

__all__ = ["renamed_arguments", "renamed_fields", "deprecated_alias"]

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
    return _renamed_arguments(renames)


def _renamed_arguments(renames: dict[str, str], owner: str | None = None) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        name = owner or fn.__name__

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old!r} (deprecated) and {new!r}")
                    warnings.warn(
                        f"{name}({old}=...) is deprecated; use {new}=...",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


C = TypeVar("C", bound=type)


def renamed_fields(**renames: str) -> Callable[[C], C]:
    """Class decorator for renamed attributes (``old="new"``): each former name stays readable as a
    property that warns with the new name, and the constructor accepts it as a keyword (warning too).
    The mapping is kept as ``cls.RENAMED`` for loaders of old files. Put it above ``@dataclass``.

    >>> from dataclasses import dataclass
    >>> @renamed_fields(n_kept="num_kept")
    ... @dataclass
    ... class Curve:
    ...     num_kept: int
    >>> with warnings.catch_warnings(record=True):
    ...     warnings.simplefilter("always")
    ...     Curve(n_kept=3).n_kept
    3
    """

    def decorate(cls: C) -> C:
        for old, new in renames.items():

            def read(self: Any, old: str = old, new: str = new) -> Any:
                warnings.warn(
                    f"{type(self).__name__}.{old} is deprecated; use .{new}", DeprecationWarning, stacklevel=2
                )
                return getattr(self, new)

            setattr(cls, old, property(read, doc=f"Deprecated name of :attr:`{new}`."))
        cls.__init__ = _renamed_arguments(dict(renames), cls.__name__)(cls.__init__)  # type: ignore[misc]
        cls.RENAMED = {**getattr(cls, "RENAMED", {}), **renames}  # type: ignore[attr-defined]
        return cls

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
