"""Lazy exports: a package lists its public names with the modules that define them, and a module is
imported only when one of its names is first used (so that ``import degeneracy`` stays light).

>>> namespace = {"__name__": "demo", "__all__": ["sqrt"]}
>>> getattr_, dir_ = lazy_exports(namespace, {"sqrt": "math"})
>>> getattr_("sqrt")(4.0), "sqrt" in namespace, dir_()
(2.0, True, ['sqrt'])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` (PEP 562) of the package whose ``globals()`` is
    ``namespace``: ``exports`` maps each public name to the module that defines it; a name is imported
    on first use and then kept in ``namespace``; ``__dir__`` lists the package's ``__all__``.

    >>> namespace = {"__name__": "demo", "__all__": ["pi"]}
    >>> getattr_, _ = lazy_exports(namespace, {"pi": "math"})
    >>> round(getattr_("pi"), 2)
    3.14
    >>> try:
    ...     getattr_("tau")
    ... except AttributeError as err:
    ...     print(err)
    module 'demo' has no attribute 'tau'
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace["__all__"])

    return __getattr__, __dir__
