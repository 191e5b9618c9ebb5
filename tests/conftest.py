"""Shared test fixtures: float64, fixed seeds, two threads (the project's CI machine has two cores)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@contextmanager
def _types_unchecked() -> Iterator[None]:
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


@pytest.fixture
def unchecked() -> Callable[[], AbstractContextManager[None]]:
    """``with unchecked(): ...`` runs a block without the runtime type checks of ``--jaxtyping-packages``.

    For the few calls that pass an ill-typed argument on purpose (an unknown ``Literal`` value, shapes
    that disagree) to test the library's own ``ValueError`` for callers who run no type checker.
    """
    return _types_unchecked


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(widths: list[int], act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    """fc0, act0, fc1, act1, ..., fcN (no activation after the last layer), float64."""
    parts: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        parts.append((f"fc{i}", nn.Linear(a, b, bias=bias)))
        if i < len(widths) - 2:
            parts.append((f"act{i}", act()))
    return nn.Sequential(OrderedDict(parts)).double()


@pytest.fixture
def tanh_mlp() -> nn.Sequential:
    return mlp([5, 8, 7, 6, 3])


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(200, 5, dtype=torch.float64)


def tiny_relu_transformer(n_layers: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A float64 TransformerLens model shaped like the modular-addition one (ReLU MLP, no LayerNorm,
    three positions) and its 49 inputs (a, b, =) for p = 7."""
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=n_layers,
        d_model=12,
        n_heads=2,
        d_head=6,
        d_mlp=16,
        act_fn="relu",
        normalization_type=None,
        n_ctx=3,
        d_vocab=8,
        d_vocab_out=7,
        seed=0,
    )
    model = tl.HookedTransformer(cfg, move_to_device=False).double().eval()
    a = torch.arange(7).repeat_interleave(7)
    b = torch.arange(7).repeat(7)
    return model, torch.stack([a, b, torch.full_like(a, 7)], 1)


def residual_nodes(n_layers: int) -> list[str]:
    """The residual stream of a TransformerLens model (pre, mid and post hook of every block), then its
    output: node layers at all positions with every kind of section between neighbours."""
    hooks = [f"blocks.{i}.hook_resid_{where}" for i in range(n_layers) for where in ("pre", "mid", "post")]
    return [*hooks, "output"]


def assert_bases_agree(fast, slow, directions: bool = False) -> None:
    """Two bases of the same node layers (with and without section shortcuts) have the same eigenvalues
    (1e-9 relative, 1e-12 of the top one absolute) and, with ``directions``, the same rows of C up to sign
    (1e-7 relative, 1e-9 of the largest entry absolute)."""
    for name in fast:
        a, b = fast[name], slow[name]
        top = float(b.eigenvalues[0])
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-12 * top)
        if directions:
            signs = torch.sign((a.C * b.C).sum(1))
            big = float(b.C.abs().max())
            torch.testing.assert_close(signs[:, None] * a.C, b.C, rtol=1e-7, atol=1e-9 * big)


def assert_edges_agree(fast, slow) -> None:
    """Two interaction graphs (with and without section shortcuts) have the same pairs and the same edges
    (1e-9 relative, 1e-12 of each pair's largest edge absolute)."""
    assert set(fast.edges) == set(slow.edges)
    for pair, want in slow.edges.items():
        torch.testing.assert_close(fast.edges[pair], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
