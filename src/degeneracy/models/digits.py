"""The bundled digits MLP: a small ReLU network on scikit-learn's 8x8 handwritten digits.

``DigitsMLP`` is a plain ``torch.nn.Module`` with named submodules ``fc1 -> act1 -> fc2 -> act2 -> out``
(64 -> 32 -> 32 -> 10, ReLU; 3,466 parameters), so node layers can be named ``"fc1"``, ``"act1"``,
``"fc2"``, ``"act2"``, ``"out"`` or ``"output"``. Inputs are the 64 pixel intensities divided by 16
(so they lie in [0, 1]), float.

The weights shipped in ``weights/digits_mlp.safetensors`` were trained by ``scripts/train_digits.py``;
its recipe and accuracies are in the JSON sidecar ``weights/digits_mlp.json``. The data come with
scikit-learn (``pip install degeneracy[digits]``); no download is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.models.shipped import WEIGHTS_DIR, read_sidecar, read_weights, split_indices

__all__ = [
    "DigitsMLP",
    "digits_all_inputs",
    "digits_dataset",
    "digits_split_indices",
    "load_digits_mlp",
    "load_digits_mlp_metadata",
    "DIGITS_WEIGHTS",
    "DIGITS_METADATA",
]

DIGITS_WEIGHTS = WEIGHTS_DIR / "digits_mlp.safetensors"
DIGITS_METADATA = WEIGHTS_DIR / "digits_mlp.json"

_SKLEARN_MISSING = (
    "the digits data come with scikit-learn; install it with `pip install degeneracy[digits]` "
    "(or `pip install scikit-learn`)"
)


class DigitsMLP(nn.Module):
    """``fc1 -> act1 -> fc2 -> act2 -> out``: a ReLU MLP from 64 pixels to 10 class logits.

    >>> DigitsMLP()(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """

    def __init__(self, d_in: int = 64, d_hidden: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(d_hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(batch, n_classes)`` of inputs ``(batch, d_in)`` scaled to [0, 1]."""
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


def digits_all_inputs(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1,797 digits in scikit-learn's order: inputs ``(1797, 64)`` in [0, 1] and int64 labels.

    >>> inputs, labels = digits_all_inputs()
    >>> tuple(inputs.shape), labels.dtype, float(inputs.max())
    ((1797, 64), torch.int64, 1.0)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_SKLEARN_MISSING) from err
    data = load_digits()
    inputs = torch.as_tensor(data.data, dtype=torch.float64).div(16.0).to(dtype)
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    return inputs, labels


def digits_split_indices(n: int = 1797, frac_train: float = 0.8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of the training and test digits: a ``torch.randperm`` seeded by ``seed``, first part trains.

    >>> train, test = digits_split_indices()
    >>> len(train), len(test)
    (1437, 360)
    """
    return split_indices(n, frac_train, seed)


def digits_dataset(
    seed: int = 0, frac_train: float = 0.8, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_inputs, train_labels, test_inputs, test_labels)`` of the digits, split by ``seed``.

    >>> train_x, train_y, test_x, test_y = digits_dataset()
    >>> tuple(train_x.shape), tuple(test_y.shape)
    ((1437, 64), (360,))
    """
    inputs, labels = digits_all_inputs(dtype)
    train_idx, test_idx = digits_split_indices(inputs.shape[0], frac_train, seed)
    return inputs[train_idx], labels[train_idx], inputs[test_idx], labels[test_idx]


def load_digits_mlp_metadata(path: str | Path = DIGITS_METADATA) -> dict[str, Any]:
    """The JSON sidecar of the shipped weights: architecture, recipe, seed, accuracies.

    >>> "accuracy" in load_digits_mlp_metadata()
    True
    """
    return read_sidecar(path)


def load_digits_mlp(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: str | Path = DIGITS_WEIGHTS,
) -> DigitsMLP:
    """The trained :class:`DigitsMLP`, in eval mode.

    Args:
        dtype: parameter dtype of the returned model (weights are stored in float32).
        device: device of the returned model.
        weights: a safetensors file of the same architecture (default: the shipped one).

    >>> model = load_digits_mlp(dtype=torch.float64)
    >>> model.training, model(torch.zeros(1, 64, dtype=torch.float64)).shape
    (False, torch.Size([1, 10]))
    """
    state = read_weights(weights, "scripts/train_digits.py")
    d_in, d_hidden = state["fc1.weight"].shape[1], state["fc1.weight"].shape[0]
    model = DigitsMLP(d_in=d_in, d_hidden=d_hidden, n_classes=state["out.weight"].shape[0])
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype)
    model.eval()
    return model
