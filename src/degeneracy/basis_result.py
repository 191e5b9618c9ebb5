"""Interaction bases as results: the options that made them (:class:`BasisConfig`), one node layer's
basis (:class:`LayerBasis`), all of them (:class:`Basis`), and their file format
(:meth:`Basis.save` / :func:`load_basis`). :func:`degeneracy.interaction_basis` builds them.

>>> import torch
>>> b = LayerBasis("h", torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
...                torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), False, 1)
>>> b.transform(torch.tensor([[3.0, 4.0]])).tolist()
[[3.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

import degeneracy
from degeneracy.capture import NodeLayer
from degeneracy.deprecation import renamed_fields
from degeneracy.display import format_value, html_summary, text_summary
from degeneracy.io import load_tensors, save_tensors
from degeneracy.linalg import INTEGRATION_RULES
from degeneracy.run import DTYPES

__all__ = [
    "METHODS",
    "Method",
    "dtype_name",
    "config_from",
    "BasisConfig",
    "LayerBasis",
    "Basis",
    "save_result",
    "load_basis",
]

Method = Literal["lib", "global", "pca", "neuron"]
METHODS = ("lib", "global", "pca", "neuron")
T = TypeVar("T")


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """The name in :data:`degeneracy.run.DTYPES` of a dtype given as a name or a ``torch.dtype``
    (``None`` stays ``None``); a ``ValueError`` for any other.

    >>> dtype_name(torch.float64), dtype_name("float32")
    ('float64', 'float32')
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")
    return dtype


def config_from(cls: type[T], arguments: Mapping[str, Any], **overrides: Any) -> T:
    """The config dataclass ``cls`` from the entries of ``arguments`` named like its fields (a public
    function's ``locals()``), ``overrides`` taking precedence; the one place where a function's keyword
    arguments become its config.

    >>> config_from(BasisConfig, {"method": "pca", "progress": True}, center=False).method
    'pca'
    """
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    chosen = {k: v for k, v in arguments.items() if k in names and k not in overrides}
    return cls(**chosen, **overrides)


@renamed_fields(relative_thresholds="relative")
@dataclass(frozen=True)
class BasisConfig:
    """Options of :func:`degeneracy.interaction_basis` (see its docstring).

    >>> BasisConfig(method="pca", center=False).has_constant
    False
    """

    method: Method = "lib"
    center: bool = True
    constant_coordinate: bool | None = None
    gram_threshold: float = 1e-10
    interaction_threshold: float = 1e-10
    relative: bool = True
    rotate_final: bool = True
    integration_rule: str = "gradient"
    integration_steps: int = 1
    batch_size: int | None = 1024
    jacobian_mode: Literal["auto", "vjp", "jvp"] = "auto"
    max_elements: int = 2**20
    dtype: str | None = None
    check_cut: bool = True
    num_sources: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown basis method {self.method!r}; choose one of {METHODS}")
        if self.integration_rule not in INTEGRATION_RULES:
            raise ValueError(
                f"unknown integration rule {self.integration_rule!r}; choose one of {INTEGRATION_RULES}"
            )
        if self.center and self.constant_coordinate is False:
            raise ValueError(
                "center=True keeps the mean as a constant direction: it needs constant_coordinate"
            )
        if self.gram_threshold < 0 or self.interaction_threshold < 0:
            raise ValueError("truncation thresholds must be >= 0")
        dtype_name(self.dtype)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_sources is not None and self.num_sources < 1:
            raise ValueError(
                f"num_sources must be a positive number of ±1 sources (None: exact), got {self.num_sources}"
            )
        if self.num_sources is not None and self.jacobian_mode == "jvp":
            raise ValueError(
                "num_sources draws ±1 sources as cotangents of vector-Jacobian products: use "
                "jacobian_mode='vjp' or 'auto' with it, or num_sources=None for the exact JVP path"
            )

    @property
    def has_constant(self) -> bool:
        """Node-layer vectors carry a constant coordinate [f; 1] (``center`` or ``constant_coordinate``)."""
        return bool(self.center if self.constant_coordinate is None else self.constant_coordinate)


    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> BasisConfig:
        """The config saved as JSON (files written before ``relative`` was named ``relative_thresholds``
        load too).

        >>> BasisConfig.from_dict({"method": "pca", "relative_thresholds": False}).relative
        False
        """
        return cls(**{cls.RENAMED.get(k, k): v for k, v in options.items()})  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LayerBasis:
    """The basis of one node layer: features f̂ = C f (f augmented with a trailing 1 if ``has_constant``).

    Attributes:
        C: (d̂ × d) basis matrix; rows are the features (direction 0 is the constant if present).
        C_pinv: (d × d̂) its pseudo-inverse on the kept subspace, C C_pinv = I.
        eigenvalues: Λ for lib/global (E[f̂ f̂ᵀ] = diag(Λ)); the Gram eigenvalues for pca; the
            diagonal of the Gram for neuron. Index 0 is the constant direction when present.
        gram_eigenvalues: all eigenvalues of the (centred) Gram, before truncation.
        width: d, the node layer's width including the constant coordinate.
        positions: number of positions the node layer has.
        truncated_gram_mass, truncated_interaction_mass: fractions of eigenvalue mass dropped.
        eigenvalue_se: for bases built with ±1 sources (``num_sources``), the standard error of each
            eigenvalue from the spread of the independent sources (:mod:`degeneracy.probes`; 0 where
            M was exact, ``nan`` with one source); ``None`` for exact builds.

    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> b = LayerBasis("h", eye, eye, torch.ones(2, dtype=torch.float64), torch.ones(2), False, 1)
    >>> b.dim, b.inverse_transform(torch.tensor([1.0, 2.0])).tolist()
    (2, [1.0, 2.0])
    """

    name: str
    C: Float[Tensor, "dhat d"]
    C_pinv: Float[Tensor, "d dhat"]
    eigenvalues: Float[Tensor, " dhat"]
    gram_eigenvalues: Float[Tensor, " g"]
    has_constant: bool
    positions: int
    truncated_gram_mass: float = 0.0
    truncated_interaction_mass: float = 0.0
    eigenvalue_se: Float[Tensor, " dhat"] | None = None

    @property
    def width(self) -> int:
        return int(self.C.shape[1])

    @property
    def dim(self) -> int:
        return int(self.C.shape[0])

    def transform(self, activations: Float[Tensor, "... d_raw"]) -> Float[Tensor, "... dhat"]:
        """Features f̂ = C f of raw activations (the constant coordinate is appended here)."""
        x = activations.to(torch.float64)
        if self.has_constant:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        if x.shape[-1] != self.width:
            raise ValueError(
                f"node layer {self.name!r} has width {self.width - self.has_constant}, "
                f"got activations of shape {tuple(activations.shape)}"
            )
        return x @ self.C.T

    def inverse_transform(self, features: Float[Tensor, "... dhat"]) -> Float[Tensor, "... d_raw"]:
        """Activations C₊ f̂ (without the constant coordinate)."""
        x = features.to(torch.float64) @ self.C_pinv.T
        return x[..., :-1] if self.has_constant else x

    def __repr__(self) -> str:
        """One line: name, kept dimension, width and eigenvalue range (not the tensors).

        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> LayerBasis("h", eye, eye, torch.tensor([4.0, 1.0], dtype=torch.float64), torch.ones(2), False, 1)
        LayerBasis('h': 2 of 2 directions, 1 position(s), Λ 4 … 1)
        """
        ev = self.eigenvalues
        span = f", Λ {format_value(float(ev.max()))} … {format_value(float(ev.min()))}" if ev.numel() else ""
        where = f"{self.dim} of {self.width} directions, {self.positions} position(s)"
        return f"LayerBasis({self.name!r}: {where}{span})"


@dataclass
class Basis:
    """Bases of all node layers, in order, with the configuration and timings that produced them.

    >>> import degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> len(B), list(B.dims)
    (3, ['1', '2', 'output'])
    """

    layers: list[NodeLayer]
    bases: dict[str, LayerBasis]
    config: BasisConfig
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerBasis:
        if name not in self.bases:
            raise KeyError(f"no node layer {name!r}; node layers are {self.names}")
        return self.bases[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def dims(self) -> dict[str, int]:
        """Retained dimension d̂ per node layer."""
        return {name: self.bases[name].dim for name in self.names}

    def transform(self, name: str, activations: Tensor) -> Tensor:
        """Features of node layer ``name`` for raw activations of shape (..., d)."""
        return self[name].transform(activations)

    def _display(self) -> tuple[str, list[tuple[str, Any]], list[str], list[list[Any]]]:
        title = f"Basis: {self.config.method}, {'centred' if self.config.center else 'uncentred'}"
        facts: list[tuple[str, Any]] = [("node layers", len(self.names))]
        headers = ["node layer", "d̂ kept", "width d", "positions", "Λ max", "Λ min"]
        rows = []
        for name in self.names:
            b = self.bases[name]
            ev = b.eigenvalues
            top, low = (float(ev.max()), float(ev.min())) if ev.numel() else (None, None)
            rows.append([name, b.dim, b.width, b.positions, top, low])
        return title, facts, headers, rows

    def __repr__(self) -> str:
        """A table of the node layers (kept dimension, width, positions, eigenvalue range), not the
        tensors.

        >>> from degeneracy import interaction_basis
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()).double()
        >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> print(repr(interaction_basis(model, x, ["1", "output"], progress=False)).splitlines()[0])
        Basis: lib, centred
        """
        return text_summary(*self._display())

    def _repr_html_(self) -> str:
        return html_summary(*self._display())

    def summary(self) -> str:
        lines = [f"{self.config.method} basis ({'centred' if self.config.center else 'uncentred'})"]
        for name in self.names:
            b = self.bases[name]
            lines.append(f"  {name}: {b.dim} of {b.width} directions, {b.positions} position(s)")
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> Basis:
        """Read a file written by :meth:`save` (same as :func:`load_basis`)."""
        return load_basis(path)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON metadata) atomically."""
        tensors: dict[str, Tensor] = {}
        per_layer = {}
        for name, b in self.bases.items():
            tensors[f"{name}/C"] = b.C
            tensors[f"{name}/C_pinv"] = b.C_pinv
            tensors[f"{name}/eigenvalues"] = b.eigenvalues
            tensors[f"{name}/gram_eigenvalues"] = b.gram_eigenvalues
            if b.eigenvalue_se is not None:
                tensors[f"{name}/eigenvalue_se"] = b.eigenvalue_se
            per_layer[name] = {
                "has_constant": b.has_constant,
                "positions": b.positions,
                "truncated_gram_mass": b.truncated_gram_mass,
                "truncated_interaction_mass": b.truncated_interaction_mass,
            }
        return save_result(path, "basis", tensors, self.layers, self.config, self.info, per_layer=per_layer)


def save_result(
    path: str | Path,
    kind: str,
    tensors: dict[str, Tensor],
    layers: Sequence[NodeLayer],
    config: Any,
    info: dict[str, Any],
    **meta: Any,
) -> Path:
    """Write a node-layer result atomically: ``tensors`` and the metadata every such result carries
    (its ``kind``, the library version, the node ``layers``, the ``config`` dataclass and ``info``),
    plus the result's own ``meta``. Returns ``path`` as a :class:`~pathlib.Path`.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "r.safetensors"
    >>> _ = save_result(path, "basis", {"x": torch.zeros(1)}, [], BasisConfig(), {}, note=1)
    >>> load_tensors(path, kind="basis")[1]["note"]
    1
    """
    header = {"kind": kind, "version": degeneracy.__version__, "config": asdict(config)}
    layer_dicts = [layer.to_dict() for layer in layers]
    save_tensors(path, tensors, {**header, "layers": layer_dicts, **meta, "info": info})
    return Path(path)


def load_basis(path: str | Path) -> Basis:
    """Read a basis written by :meth:`Basis.save`; a clear ``ValueError`` for unreadable or partial files.

    >>> import tempfile, degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> path = Path(tempfile.mkdtemp()) / "basis.safetensors"
    >>> _ = B.save(path)
    >>> torch.equal(load_basis(path)["1"].C, B["1"].C)
    True
    """
    tensors, meta = load_tensors(path, kind="basis")
    try:
        layers = [NodeLayer.from_dict(d) for d in meta["layers"]]
        config = BasisConfig.from_dict(meta["config"])
        per_layer = meta["per_layer"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: basis metadata is incomplete ({err})") from err
    keys = [
        f"{layer.name}/{t}" for layer in layers for t in ("C", "C_pinv", "eigenvalues", "gram_eigenvalues")
    ]
    missing = [k for k in keys if k not in tensors]
    if missing or any(layer.name not in per_layer for layer in layers):
        raise ValueError(f"{path}: incomplete basis file, missing {missing or 'per-layer metadata'}")
    bases = {
        layer.name: LayerBasis(
            name=layer.name,
            C=tensors[f"{layer.name}/C"],
            C_pinv=tensors[f"{layer.name}/C_pinv"],
            eigenvalues=tensors[f"{layer.name}/eigenvalues"],
            gram_eigenvalues=tensors[f"{layer.name}/gram_eigenvalues"],
            eigenvalue_se=tensors.get(f"{layer.name}/eigenvalue_se"),
            **per_layer[layer.name],
        )
        for layer in layers
    }
    return Basis(layers, bases, config, meta.get("info", {}))
