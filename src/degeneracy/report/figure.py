"""The one place that imports matplotlib (lazily, with the non-interactive Agg backend) and saves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from degeneracy.distributed import writes_enabled

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    >>> plt = pyplot()
    >>> plt.get_backend().lower()
    'agg'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120, close: bool = True, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path`` (parent folders created) and close it unless ``close=False``.

    >>> import tempfile
    >>> fig, ax = pyplot().subplots(figsize=(2, 2))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_figure(fig, Path(folder) / "new" / "plot.png")
    ...     path.name, path.stat().st_size > 0, pyplot().fignum_exists(fig.number)
    ('plot.png', True, False)
    """
    path = Path(path)
    if not writes_enabled():  # a rank > 0 under main_writes()
        if close:
            pyplot().close(fig)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **kwargs)
    if close:
        pyplot().close(fig)
    return path
