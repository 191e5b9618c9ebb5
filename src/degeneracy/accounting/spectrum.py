"""The result of :func:`degeneracy.accounting.hessian_spectrum`: the behavioral-loss Hessian's spectrum.

**Rank at ε** (METHOD §6): eigenvalues λ ≤ ε count as zero (``relative=True``: λ ≤ ε·λ_max), and a
numerical floor always applies (:func:`degeneracy.accounting.gauss_newton.numerical_floor`). When only
the top k eigenvalues are known (Lanczos), the rank at small ε comes from the stochastic Lanczos
quadrature density (:meth:`HessianSpectrum.rank_estimate`).

Saved as JSON (``spectrum.save(path)``, :meth:`HessianSpectrum.load` or :func:`load_hessian_spectrum`),
with ``"result": "hessian_spectrum"`` checked on load.

>>> import torch
>>> values = torch.tensor([4.0, 1.0, 1e-3, 0.0], dtype=torch.float64)
>>> spectrum = HessianSpectrum(values, 4, "exact", "mse", 10, 0.0)
>>> spectrum.rank(), spectrum.rank(1e-2), spectrum.nullity(0.1, relative=True)
(3, 2, 2)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from degeneracy.io import JsonResult, ResultFileError
from degeneracy.linalg import slq_rank

__all__ = ["HessianSpectrum", "load_hessian_spectrum", "RESULT"]

RESULT = "hessian_spectrum"
"""The ``"result"`` field of a saved spectrum (checked on load)."""


@dataclass(repr=False)
class HessianSpectrum(JsonResult):
    """The spectrum of the behavioral-loss Hessian at θ* (float64, descending).

    Attributes:
        eigenvalues: all N eigenvalues (``method="exact"``) or the top k (``"lanczos"``).
        num_parameters: N, the nominal parameter count.
        method: ``"exact"`` or ``"lanczos"``.
        kind: ``"mse"`` or ``"kl"`` (the behavioral loss whose Hessian this is).
        num_examples: n.
        floor: numerical zero: eigenvalues at or below it count as zero at every ε.
        trace: exact trace (exact path) or Hutchinson's estimate; ``trace_stderr`` its standard error.
        residuals: Lanczos residual bounds of the top-k Ritz values.
        density: SLQ nodes and weights per probe (for :meth:`rank_estimate`).
        gram_side: ``"parameters"`` (JᵀJ) or ``"outputs"`` (J Jᵀ) for the exact path.
        matvecs: Hessian-vector products spent by the Lanczos path.
        timings: seconds per stage.
        config: the arguments of the call.

    >>> spectrum = HessianSpectrum(torch.tensor([2.0, 0.0]).double(), 2, "exact", "mse", 5, 0.0)
    >>> spectrum
    HessianSpectrum(exact, mse, N=2, n=5, 2 eigenvalues, largest 2, rank 1 above the floor 0)
    """

    KIND: ClassVar[str] = RESULT

    eigenvalues: Float[Tensor, " k"]
    num_parameters: int
    method: str
    kind: str
    num_examples: int
    floor: float
    trace: float | None = None
    trace_stderr: float | None = None
    residuals: Tensor | None = None
    density: list[tuple[Tensor, Tensor]] | None = None
    gram_side: str | None = None
    matvecs: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every eigenvalue is known (exact path).

        >>> HessianSpectrum(torch.ones(1, dtype=torch.float64), 3, "lanczos", "mse", 5, 0.0).complete
        False
        """
        return self.eigenvalues.numel() == self.num_parameters

    def threshold(self, epsilon: float = 0.0, *, relative: bool = False) -> float:
        """The eigenvalue below which directions count as free: max(ε or ε·λ_max, floor).

        >>> spectrum = HessianSpectrum(torch.tensor([4.0, 0.0]).double(), 2, "exact", "mse", 5, 1e-9)
        >>> spectrum.threshold(0.5, relative=True)
        2.0
        """
        top = float(self.eigenvalues.max()) if self.eigenvalues.numel() else 0.0
        return max(epsilon * top if relative else epsilon, self.floor)

    def rank(self, epsilon: float = 0.0, *, relative: bool = False) -> int:
        """Number of eigenvalues above ε (``relative``: above ε·λ_max), and above the numerical floor.

        Needs every eigenvalue unless the k-th one is already below the threshold; otherwise use
        :meth:`rank_estimate`.

        >>> HessianSpectrum(torch.tensor([4.0, 1.0, 0.0]).double(), 3, "exact", "mse", 5, 0.0).rank(2.0)
        1
        """
        threshold = self.threshold(epsilon, relative=relative)
        count = int((self.eigenvalues > threshold).sum())
        if not self.complete and count == self.eigenvalues.numel():
            raise ValueError(
                f"only the top {self.eigenvalues.numel()} eigenvalues are known and all exceed "
                f"{threshold:g}; "
                "use rank_estimate() (stochastic, needs num_rank_probes > 0) or method='exact'"
            )
        return count

    def nullity(self, epsilon: float = 0.0, *, relative: bool = False) -> int:
        """N − rank: the number of free directions of the quadratic approximation at scale ε.

        >>> HessianSpectrum(torch.tensor([4.0, 1.0, 0.0]).double(), 3, "exact", "mse", 5, 0.0).nullity()
        1
        """
        return self.num_parameters - self.rank(epsilon, relative=relative)

    def rank_estimate(self, epsilon: float = 0.0, *, relative: bool = False) -> tuple[float, float]:
        """(rank, standard error) at ε: exact when complete, else from the SLQ density.

        The estimate is never below the number of known eigenvalues above the threshold.

        >>> HessianSpectrum(torch.tensor([4.0, 0.0]).double(), 2, "exact", "mse", 5, 0.0).rank_estimate()
        (1.0, 0.0)
        """
        if self.complete:
            return float(self.rank(epsilon, relative=relative)), 0.0
        if not self.density:
            raise ValueError("no stochastic density was computed: pass num_rank_probes > 0")
        threshold = self.threshold(epsilon, relative=relative)
        mean, stderr = slq_rank(self.density, threshold, self.num_parameters)
        lower = int((self.eigenvalues > threshold).sum())
        return max(mean, float(lower)), stderr

    def __len__(self) -> int:
        return int(self.eigenvalues.numel())

    def __getitem__(self, index: Any) -> Tensor:
        """``spectrum[i]``: the eigenvalues (``hessian_spectrum`` returned them as a bare tensor before;
        indexing still works, other tensor methods warn, see :meth:`__getattr__`).

        >>> HessianSpectrum(torch.tensor([3.0, 1.0]), 2, "exact", "mse", 4, 0.0)[0].item()
        3.0
        """
        return self.eigenvalues[index]

    def __getattr__(self, name: str) -> Any:
        """Tensor methods and attributes (``.sum()``, ``.shape``, ``.tolist()``, ...) of the eigenvalues,
        with a ``DeprecationWarning``: ``hessian_spectrum`` returned the eigenvalue tensor before it
        returned this object; use ``.eigenvalues``."""
        if name.startswith("_") or name == "eigenvalues" or not hasattr(Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(
            f"hessian_spectrum now returns a HessianSpectrum; use .eigenvalues.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self.eigenvalues, name)

    def __repr__(self) -> str:
        top = float(self.eigenvalues[0]) if self.eigenvalues.numel() else 0.0
        known = int((self.eigenvalues > self.floor).sum())
        rank = f"rank {known}" if self.complete else f"{known} known"
        return (
            f"HessianSpectrum({self.method}, {self.kind}, N={self.num_parameters}, n={self.num_examples}, "
            f"{len(self)} eigenvalues, largest {top:.6g}, {rank} above the floor {self.floor:.3g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what :meth:`save` writes).

        >>> HessianSpectrum(torch.zeros(1).double(), 1, "exact", "mse", 1, 0.0).to_dict()["result"]
        'hessian_spectrum'
        """
        return {
            "result": RESULT,
            "eigenvalues": self.eigenvalues.tolist(),
            "num_parameters": self.num_parameters,
            "method": self.method,
            "kind": self.kind,
            "num_examples": self.num_examples,
            "floor": self.floor,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "residuals": None if self.residuals is None else self.residuals.tolist(),
            "density": None
            if self.density is None
            else [{"nodes": v.tolist(), "weights": w.tolist()} for v, w in self.density],
            "gram_side": self.gram_side,
            "matvecs": self.matvecs,
            "timings": self.timings,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HessianSpectrum:
        """The spectrum :meth:`to_dict` described (files written before the ``"result"`` field load too).

        >>> s = HessianSpectrum(torch.ones(2, dtype=torch.float64), 2, "exact", "kl", 3, 0.0)
        >>> HessianSpectrum.from_dict(s.to_dict()).kind
        'kl'
        """
        result = d.get("result", RESULT)
        if result != RESULT:
            raise ResultFileError(f"holds a {result!r} result, expected {RESULT!r}")
        missing = [
            k
            for k in ("eigenvalues", "num_parameters", "method", "kind", "num_examples", "floor")
            if k not in d
        ]
        if missing:
            raise ResultFileError(f"incomplete {RESULT} data, missing {missing}")
        f64 = torch.float64
        return cls(
            eigenvalues=torch.tensor(d["eigenvalues"], dtype=f64),
            num_parameters=int(d["num_parameters"]),
            method=d["method"],
            kind=d["kind"],
            num_examples=int(d["num_examples"]),
            floor=float(d["floor"]),
            trace=d.get("trace"),
            trace_stderr=d.get("trace_stderr"),
            residuals=None if d.get("residuals") is None else torch.tensor(d["residuals"], dtype=f64),
            density=None
            if d.get("density") is None
            else [
                (torch.tensor(p["nodes"], dtype=f64), torch.tensor(p["weights"], dtype=f64))
                for p in d["density"]
            ],
            gram_side=d.get("gram_side"),
            matvecs=d.get("matvecs"),
            timings=dict(d.get("timings", {})),
            config=dict(d.get("config", {})),
        )


def load_hessian_spectrum(path: str | Path) -> HessianSpectrum:
    """:meth:`HessianSpectrum.load` as a function (``degeneracy.load_*`` convention).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     spectrum = HessianSpectrum(torch.ones(1, dtype=torch.float64), 1, "exact", "mse", 1, 0.0)
    ...     path = spectrum.save(pathlib.Path(tmp) / "h.json")
    ...     load_hessian_spectrum(path).num_parameters
    1
    """
    return HessianSpectrum.load(path)
