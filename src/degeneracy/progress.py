"""The one progress bar of the package: tqdm on stderr with a rate and an ETA, shown only when asked
(``progress=True``), on rank 0 under ``torch.distributed``, and when stderr is a terminal (logs, pipes
and CI stay clean).

:class:`ExampleBar` counts examples and moves *within* a batch: a pass over the data begins each batch
(:meth:`ExampleBar.begin`), the work on it reports the share done (:meth:`ExampleBar.within`: after
each Jacobian block, node-layer pair or moment update), and the bar stands at the batch's start plus
that share of its examples (whole examples), so a batch of 1,024 examples does not hold the bar still
while it is worked on. The numbers computed are not touched: only the bar moves.

>>> bar = ExampleBar(20, "demo", progress=False)
>>> for size in (8, 8, 4):
...     bar.begin(size)
...     bar.within(1, 2)  # half of this batch's work done
...     bar.finish()
>>> bar.position, bar.updates
(20, [4, 4, 4, 4, 2, 2])
>>> bar.close()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from degeneracy.distributed import is_main

__all__ = ["progress_bar", "ExampleBar"]


def progress_bar(
    total: int | None, desc: str, progress: bool, *, unit: str = "ex", iterable: Iterable[Any] | None = None
) -> Any:
    """A tqdm bar of ``total`` units with a rate and an ETA: shown when ``progress``, on rank 0, and
    stderr is a terminal (tqdm's ``disable=None``); otherwise a bar that prints nothing. With
    ``iterable``, the bar iterates it, one unit per item (a sampler's steps).

    >>> bar = progress_bar(3, "steps", progress=False, unit="step")
    >>> bar.disable, bar.total
    (True, 3)
    >>> bar.close()
    >>> list(progress_bar(2, "steps", progress=False, iterable=range(2)))
    [0, 1]
    """
    shown = progress and is_main()
    options = {"desc": desc, "unit": unit, "disable": None if shown else True, "leave": False}
    return tqdm(iterable, total=total, dynamic_ncols=True, **options)


class ExampleBar:
    """A bar over ``total`` examples that moves within each batch as its work is done (see the module).

    ``updates`` records every step the bar made (in examples), ``position`` where it stands.

    >>> bar = ExampleBar(10, "M[fc1]", progress=False)
    >>> bar.begin(10)
    >>> for block in range(1, 4):
    ...     bar.within(block, 3)  # three Jacobian blocks of one batch
    >>> bar.updates
    [3, 3, 4]
    >>> bar.close()
    """

    def __init__(self, total: int | None, desc: str, progress: bool) -> None:
        self.bar = progress_bar(total, desc, progress)
        self.position = 0
        self.updates: list[int] = []
        self._start = 0
        self._size = 0

    def begin(self, size: int) -> None:
        """Start a batch of ``size`` examples (the previous one is counted in full).

        >>> bar = ExampleBar(4, "", progress=False)
        >>> bar.begin(2); bar.begin(2); bar.finish()
        >>> bar.updates
        [2, 2]
        """
        self.finish()
        self._start, self._size = self.position, int(size)

    def within(self, done: int, parts: int) -> None:
        """``done`` of the current batch's ``parts`` equal parts of work are finished: the bar moves to
        the batch's start plus that share of its examples (never back).

        >>> bar = ExampleBar(8, "", progress=False)
        >>> bar.begin(8); bar.within(1, 4); bar.within(1, 4); bar.within(3, 4)
        >>> bar.updates, bar.position
        ([2, 4], 6)
        """
        if parts <= 0:
            return
        target = self._start + self._size * min(done, parts) // parts
        if target > self.position:
            self.updates.append(target - self.position)
            self.bar.update(target - self.position)
            self.position = target

    def finish(self) -> None:
        """Count the rest of the current batch.

        >>> bar = ExampleBar(3, "", progress=False)
        >>> bar.begin(3); bar.finish(); bar.finish()
        >>> bar.updates
        [3]
        """
        self.within(1, 1)

    def close(self) -> None:
        """Close the bar (after counting the current batch in full).

        >>> ExampleBar(1, "", progress=False).close()
        """
        self.finish()
        self.bar.close()
