"""Degeneracy accounting: the paper's Sections 2–4 as measurements (arXiv 2405.10927, METHOD §6).

* :func:`behavioral_loss` — L_B(θ | θ*) of eq 6 (MSE) or its KL variant (footnote 3).
* :func:`hessian_spectrum` → :class:`HessianSpectrum` — the Hessian of L_B at θ* (eq 10): all
  eigenvalues exactly for small models, the top of the spectrum by Lanczos plus stochastic trace and
  rank for large ones; rank and nullity at a noise scale ε (:func:`hessian_rank` in one call).
* :func:`synchronized_blocks` / :func:`neuron_synchronization` — synchronised ReLU/LeakyReLU neurons
  (eq 17–22); :func:`synchronized_heads` — heads with equal attention patterns.
* :func:`degeneracy_report` — every source of free directions per layer (activation and Jacobian
  rank drops, synchronised neurons and heads) beside N and the Hessian nullity.
* :func:`sparsify` — the Section 4 construction (eq 23–27): a re-parameterised model with the same
  outputs on D and at least one zero interaction per (non-generic) free direction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from degeneracy.accounting.construction import SparsifiedModel, sparsify
from degeneracy.accounting.hessian import (
    HessianSpectrum,
    hessian_analysis,
    hessian_rank,
    hessian_spectrum,
    load_hessian_spectrum,
)
from degeneracy.accounting.report import (
    DegeneracyReport,
    SourceRow,
    degeneracy_report,
    load_degeneracy_report,
)
from degeneracy.accounting.rows import layer_synchronisation
from degeneracy.accounting.sources import HeadSync, NeuronSync, check_epsilon, head_sync
from degeneracy.accounting.sources import neuron_sync as neuron_sync  # kept importable from here
from degeneracy.accounting.statistics import collect
from degeneracy.accounting.structure import discover, neuron_layer
from degeneracy.adapters.transformer_lens.forward import last_position_logits
from degeneracy.adapters.transformer_lens.structure import pattern_by_query
from degeneracy.behavioral import behavioral_loss, behavioral_loss_function, whiten_outputs
from degeneracy.data import in_eval_mode, iter_batches
from degeneracy.deprecation import renamed_arguments
from degeneracy.linalg import hutchinson_trace, lanczos_top, rank_at
from degeneracy.run import ForwardFn, shard

__all__ = [
    "behavioral_loss",
    "behavioral_loss_function",
    "whiten_outputs",
    "hessian_spectrum",
    "hessian_rank",
    "hessian_analysis",
    "HessianSpectrum",
    "load_hessian_spectrum",
    "rank_at",
    "lanczos_top",
    "hutchinson_trace",
    "synchronized_blocks",
    "neuron_synchronization",
    "synchronized_heads",
    "head_synchronization",
    "NeuronSync",
    "HeadSync",
    "degeneracy_report",
    "DegeneracyReport",
    "load_degeneracy_report",
    "SourceRow",
    "sparsify",
    "SparsifiedModel",
    "last_position_logits",
]


@renamed_arguments(position="positions")
@in_eval_mode
def neuron_synchronization(
    model: nn.Module,
    data: Any,
    layer: str,
    *,
    epsilon: float = 0.0,
    relative: bool = False,
    jacobians: bool = False,
    kind: str = "mse",
    batch_size: int | None = None,
    positions: int | None = None,
    forward: ForwardFn | None = None,
) -> NeuronSync:
    """Synchronised blocks of the neuron layer ``layer`` with s_a (and t_a when ``jacobians``).

    ``layer`` names the activation module (an ``nn.ReLU``, ``nn.LeakyReLU`` or ``nn.Identity``), a
    linear map that feeds another directly (a purely linear layer), or a TransformerLens MLP
    (``"blocks.0.mlp"`` or ``"blocks.0.mlp.hook_pre"``). See :mod:`degeneracy.accounting.sources`.
    ``positions``: read a ``(batch, pos, d)`` output at one position (``position=`` is deprecated).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).double()
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
    ...     _ = model[0].bias.zero_()
    >>> sync = neuron_synchronization(model, torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None], "1")
    >>> sync.blocks, sync.block_ranks
    ([[0, 1]], [1])
    """
    check_epsilon(epsilon, relative)
    batches = list(iter_batches(shard(data), batch_size))  # this rank's share (torch.distributed)
    structure = discover(model, batches[0].inputs)
    found = neuron_layer(model, structure, layer)
    stats = collect(
        model,
        batches,
        raw_points={found.pre_point},
        jacobian_points={found.jacobian_point} if jacobians else set(),
        kind=kind,  # type: ignore[arg-type]
        positions=positions,
        forward=forward,
    )
    return layer_synchronisation(stats, found, epsilon, relative)[0]


def synchronized_blocks(model: nn.Module, data: Any, layer: str, **options: Any) -> list[list[int]]:
    """Partition of the neurons of ``layer`` into synchronised blocks (lists of indices, singletons
    included, sorted by first index).

    ε = 0: neurons whose firing patterns r_i(x) = 1[p_i(x) > 0] (paper eq 17) agree on every input
    (and position); never-firing (dead) ReLU neurons share the all-zero pattern and form one block.
    ε > 0: approximate synchronisation (eq 20, see :mod:`degeneracy.accounting.sources`), closed
    under transitivity. ``layer`` and the keywords (``epsilon``, ``relative``, ``batch_size``,
    ``positions``, ``forward``) as in :func:`neuron_synchronization`.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).double()
    >>> with torch.no_grad():
    ...     _ = model[0].bias.copy_(torch.tensor([-100.0, -100.0, 100.0]))  # two dead neurons, one always on
    >>> synchronized_blocks(model, torch.randn(8, 2, dtype=torch.float64), "1")
    [[0, 1], [2]]
    """
    return neuron_synchronization(model, data, layer, **options).blocks


@in_eval_mode
def head_synchronization(
    model: nn.Module,
    data: Any,
    layer: str,
    *,
    epsilon: float = 0.0,
    batch_size: int | None = None,
) -> HeadSync:
    """Synchronised heads of a TransformerLens attention layer (``"blocks.0.attn"``): patterns equal
    on D up to ε (max absolute difference).

    >>> import torch
    >>> head_synchronization(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.ones(3, 2), "0")
    Traceback (most recent call last):
    ...
    ValueError: '0' is not an attention layer of this model; attention layers: none
    """
    check_epsilon(epsilon, relative=False)
    batches = list(iter_batches(shard(data), batch_size))  # this rank's share (torch.distributed)
    structure = discover(model, batches[0].inputs)
    for attn in structure.attention_layers:
        if attn.name in (layer, layer.removesuffix(".hook_pattern")):
            stats = collect(
                model,
                batches,
                raw_points={attn.pattern_point},
                input_transforms={attn.pattern_point: pattern_by_query},
            )
            patterns = stats.raw(attn.pattern_point, None)
            return head_sync(
                patterns,
                attn.n_heads,
                attn.d_head,
                layer=attn.name,
                epsilon=epsilon,
                num_samples=patterns.shape[0],
                src_dtype=stats.points[attn.pattern_point].dtype,
            )
    valid = ", ".join(repr(a.name) for a in structure.attention_layers) or "none"
    raise ValueError(f"{layer!r} is not an attention layer of this model; attention layers: {valid}")


def synchronized_heads(
    model: nn.Module, data: Any, layer: str, *, epsilon: float = 0.0, batch_size: int | None = None
) -> list[list[int]]:
    """Partition of the heads of ``layer`` into blocks with equal attention patterns on D (a TransformerLens
    attention layer such as ``"blocks.0.attn"``; see :func:`head_synchronization`).

    >>> import torch
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=3,
    ...                               act_fn="relu", normalization_type=None, seed=0)
    >>> model = HookedTransformer(cfg, move_to_device=False)
    >>> tokens = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    >>> synchronized_heads(model, tokens, "blocks.0.attn")
    [[0], [1]]
    >>> attn = model.blocks[0].attn
    >>> with torch.no_grad():  # head 1 gets head 0's queries and keys: the same attention pattern
    ...     for p in (attn.W_Q, attn.W_K, attn.b_Q, attn.b_K):
    ...         p[1] = p[0]
    >>> synchronized_heads(model, tokens, "blocks.0.attn")
    [[0, 1]]
    """
    return head_synchronization(model, data, layer, epsilon=epsilon, batch_size=batch_size).blocks


del torch
