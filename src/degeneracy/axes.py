"""The one glossary of tensor axis names used in jaxtyping annotations across the package.

Every shape string in a ``Float[Tensor, "..."]`` annotation is made of these names (a leading ``*``
marks a variable number of such axes, ``...`` any axes); ``tests/test_architecture.py`` checks it, and
the test suite runs every annotated function under jaxtyping + beartype, so a shape that contradicts its
annotation fails the tests.

>>> AXES["dhat"]
'retained basis dimension d̂ of a node layer (rows of C)'
"""

from __future__ import annotations

__all__ = ["AXES"]

AXES: dict[str, str] = {
    # data
    "batch": "examples (inputs, or sequences for sequence models) in a batch",
    "pos": "sequence positions of a node layer or output (1 for non-sequence layers)",
    "pos_in": "positions of the source node layer of a section f^l -> f^{l+1}",
    "pos_out": "positions of the target node layer of a section",
    "rows": "flattened (position, feature) rows of an output or Jacobian",
    "sources": "random ±1 source vectors over output positions (and output directions)",
    "out": "output axes after the example axis (summed by the behavioral loss)",
    # node layers and bases
    "d": "width of a node layer (including the constant coordinate when present)",
    "d1": "width of a node layer plus the constant coordinate (d + 1)",
    "d_raw": "width of a node layer without the constant coordinate",
    "d_in": "width of the source node layer of a section",
    "d_out": "width of the target node layer of a section",
    "dhat": "retained basis dimension d̂ of a node layer (rows of C)",
    "k": "kept (whitened) dimension after the PCA step, or a number of wanted eigenpairs",
    "g": "number of Gram eigenvalues of a node layer before truncation",
    "m": "rows of an output map (features of the target layer seen through its basis), or Krylov steps",
    # parameters and sampling
    "P": "number of (sampled) parameters, the length of a flat parameter vector θ",
    "chain": "leading chain axes of a flat parameter tensor",
    "chains": "SGLD chains",
    "draws": "recorded draws of a chain after burn-in",
    "burnin": "burn-in steps of a chain",
    "points": "points of a curve (ε or nβ values)",
}
