"""The Section 4 construction: interaction sparsity from parameterisation invariance (eq 23–27).

For a chain of ``nn.Linear`` maps joined by ReLU / LeakyReLU / identity layers, layer by layer from
the input:

1. **Disconnect linearly dependent activations** (eq 23–24). With F the site's input activations on
   D (plus the constant coordinate 1 of the bias, footnote 6), choose a basis of rank(G) columns by
   greedy pivoting (the constant first), write every other column as f_j = Σ_i (c_j)_i f_i (least
   squares; exact for exact dependencies) and fold it: W̃[:, basis] = W[:, basis] + Σ_j W[:, j] c_jᵀ,
   W̃[:, j] = 0. Each dependency zeroes d_out weights and leaves W̃ f = W f on D.
2. **Block-transform synchronised neurons** (eq 25–27). For each block S of neurons with equal firing
   patterns, with M = W̃[S, :] of rank s and s pivot columns U = M[:, P]: C = [U | N]⁻¹ with N a basis
   of col(U)^⊥ (for s = |S| this is the paper's C_[a] = (W̃_[a])⁻¹). Then C M has the identity on the
   pivot columns (s² − s zeros) and |S| − s zero rows. The next layer gets W_out[:, S] C⁻¹.

   The paper's eq 28 says C commutes with the ReLU; that holds for a block only in the sense that the
   block shares one firing pattern r_a(x), so C(r_a p) = r_a (C p). The new model therefore replaces
   the activation by :class:`BlockGatedActivation`, which gates every neuron of block a by the sign of
   one representative pre-activation p_k = (C⁻¹ p̂)_k. On D (where the block is synchronised) its
   outputs equal the original ones exactly; off D they may differ.

Under ``torch.distributed`` every rank reads its shard of D (:func:`degeneracy.run.shard`) and the
data enter only through sums and exact combinations over the ranks: the Gram of each site's input
(all-reduced), the R factor of a QR of its rows (the ranks' R factors stacked and factored again, so
the least-squares fold equals the one of all rows), the firing patterns' blocks (columns identical on
every shard), dead neurons, the representatives' Σ|p| and the verification's max |Δ output|. Every
rank then takes the same decisions and returns the same model as one process.

The counted free directions (non-generic, as in the paper's claim) are Σ (dependencies × d_out) over
sites plus Σ_a (s_a² − s_a) over blocks; the per-neuron rescalings (s_a per block) are generic, and
the construction pins one entry per rescaling to 1 instead of zeroing it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.accounting.reading import read_node_layers
from degeneracy.accounting.records import record
from degeneracy.accounting.sources import firing_patterns, gram_floor, identical_columns
from degeneracy.accounting.structure import NeuronLayer, discover_torch, node_at, resolve_module
from degeneracy.adapters.transformer_lens import is_hooked_transformer
from degeneracy.capture import NodeLayer
from degeneracy.data import Batch, in_eval_mode, iter_batches
from degeneracy.distributed import all_gather_rows, all_reduce_max, all_reduce_sum, is_distributed
from degeneracy.linalg import eigh_descending
from degeneracy.run import ForwardFn, run_model, shard

__all__ = ["BlockGatedActivation", "SparsifiedModel", "sparsify"]


class BlockGatedActivation(nn.Module):
    """f̂_i = p̂_i if (Γ p̂)_i > 0 else slope·p̂_i: a ReLU/LeakyReLU whose gate is read elsewhere.

    Row i of Γ picks the representative pre-activation of neuron i's block (``gate``, d × d).
    With Γ = I this is the plain ReLU (slope 0) or LeakyReLU.

    >>> gate = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both neurons gated by neuron 0
    >>> BlockGatedActivation(gate)(torch.tensor([[1.0, -2.0], [-1.0, 3.0]])).tolist()
    [[1.0, -2.0], [-0.0, 0.0]]
    """

    def __init__(self, gate: Tensor, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("gate", gate)
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        g = x @ self.gate.T.to(x.dtype)
        return torch.where(g > 0, x, self.negative_slope * x)

    def extra_repr(self) -> str:
        return f"width={self.gate.shape[0]}, negative_slope={self.negative_slope}"


@dataclass
class SparsifiedModel:
    """The re-parameterised model and the accounting of the construction.

    Attributes:
        model: the new model (a deep copy; weights re-parameterised, activations block-gated).
        max_output_difference: max |f_new(x) − f(x)| over D.
        verified: whether ``max_output_difference <= tolerance``.
        zeros_before, zeros_after: exact zeros among the interactions ([W | b] entries of every site).
        free_directions: non-generic free directions the construction exploits (activation
            dependencies × d_out, plus Σ (s_a² − s_a) over synchronised blocks).
        generic_directions: Σ s_a (per-neuron rescalings, pinned to 1 instead of zeroed).
        pinned: entries set to exactly 1 by the block transforms.
        layers: per-site and per-layer details.

    >>> result = SparsifiedModel(torch.nn.Identity(), 0.0, 1e-10, 2, 5, 3, 1, 1)
    >>> result.verified, result.zeros_gained, result.claim_holds
    (True, 3, True)
    """

    model: nn.Module
    max_output_difference: float
    tolerance: float
    zeros_before: int
    zeros_after: int
    free_directions: int
    generic_directions: int
    pinned: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.max_output_difference <= self.tolerance

    @property
    def zeros_gained(self) -> int:
        return self.zeros_after - self.zeros_before

    @property
    def claim_holds(self) -> bool:
        """Paper §4: at least one zero interaction per (non-generic) free direction."""
        return self.zeros_gained >= self.free_directions

    def to_dict(self) -> dict[str, Any]:
        """The accounting as a JSON-able dict: every field but the model, and the derived checks.

        >>> SparsifiedModel(torch.nn.Identity(), 0.0, 1e-10, 2, 5, 3, 1, 1).to_dict()["zeros_gained"]
        3
        """
        return record(self, derived=("verified", "zeros_gained", "claim_holds"), omit=("model",))


def _capture(model: nn.Module, batches: list[Batch], point: NodeLayer, forward: ForwardFn | None) -> Tensor:
    """Values at ``point`` over all batches, as (rows, d) float64."""
    chunks: list[Tensor] = []
    with torch.no_grad():
        for batch in batches:
            values, _ = read_node_layers(model, batch.inputs, [point], forward=forward)
            x = values[point]
            chunks.append(x.reshape(-1, x.shape[-1]).to(torch.float64))
    return torch.cat(chunks, dim=0)


def _site_statistics(f: Tensor) -> tuple[Tensor, Tensor, int]:
    """From this rank's values f (rows, d), over every rank's rows: the mean Gram fᵀf / n, an R factor
    of all rows (‖F c‖ = ‖R c‖ for every c: least squares on F is least squares on R) and n."""
    n = int(all_reduce_sum(torch.tensor([float(f.shape[0])], dtype=torch.float64)).item())
    gram = all_reduce_sum(f.T @ f) / max(n, 1)
    r = torch.linalg.qr(f, mode="r").R
    if is_distributed():  # TSQR: QR of the stacked R factors is an R factor of the stacked rows
        r = torch.linalg.qr(all_gather_rows(r), mode="r").R
    return gram.cpu(), r.cpu(), n  # (the small d × d algebra on the CPU)


def _blocks(fires: Tensor) -> list[list[int]]:
    """Columns of the firing patterns (rows, d) identical on every rank's rows (sorted by first index):
    each rank labels its columns by their block's first column; columns with the same label on every
    rank form one block."""
    labels = torch.empty(fires.shape[1], dtype=torch.float64)
    for block in identical_columns(fires.cpu()):
        labels[block] = float(block[0])
    every = all_gather_rows(labels[None])  # (world, d)
    groups: dict[tuple[float, ...], list[int]] = {}
    for i, key in enumerate(every.T.tolist()):
        groups.setdefault(tuple(key), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _pivoted_basis(gram: Tensor, threshold: float, first: int | None) -> list[int]:
    """Greedy column pivoting on the mean Gram (pivoted Cholesky): the basis columns.

    ``first`` (the constant column) is taken first when its residual is above the threshold.
    """
    d = gram.shape[0]
    residual = torch.diagonal(gram).clone()
    basis: list[int] = []
    factors = torch.zeros(d, 0, dtype=torch.float64)
    while len(basis) < d:
        if not basis and first is not None and residual[first] > threshold:
            j = first
        else:
            masked = residual.clone()
            if basis:
                masked[basis] = -1.0
            j = int(torch.argmax(masked))
            if masked[j] <= threshold:
                break
        col = (gram[:, j] - factors @ factors[j]) / residual[j].sqrt()
        factors = torch.cat([factors, col[:, None]], dim=1)
        residual = (residual - col.pow(2)).clamp_min(0.0)
        basis.append(j)
    return basis


def _column_pivots(m: Tensor, rtol: float = 1e-10) -> list[int]:
    """Greedy column-pivoted Gram–Schmidt on m: independent columns spanning its column space."""
    q = m.clone()
    scale = float(m.norm()) or 1.0
    pivots: list[int] = []
    for _ in range(min(m.shape)):
        norms = q.norm(dim=0)
        if pivots:
            norms[pivots] = -1.0
        j = int(torch.argmax(norms))
        if norms[j] <= rtol * scale:
            break
        u = q[:, j] / norms[j]
        q = q - u[:, None] * (u @ q)[None, :]
        pivots.append(j)
    return pivots


def _zeros(flat_w: Tensor) -> int:
    return int((flat_w == 0).sum())


def _set_augmented(module: nn.Linear, w_aug: Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(w_aug[:, : module.in_features].to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_(w_aug[:, module.in_features].to(module.bias.dtype))


def _augmented(module: nn.Linear) -> Tensor:
    w = module.weight.detach().to("cpu", torch.float64)
    if module.bias is None:
        return w.clone()
    return torch.cat([w, module.bias.detach().to("cpu", torch.float64)[:, None]], dim=1)


def _parent_and_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return resolve_module(model, parent_name), child
    return model, name


@in_eval_mode
def sparsify(
    model: nn.Module,
    data: Any,
    *,
    epsilon: float = 0.0,
    batch_size: int | None = None,
    forward: ForwardFn | None = None,
    tolerance: float | None = None,
) -> SparsifiedModel:
    """Apply the Section 4 construction (eq 23–27) and verify that outputs on ``data`` are unchanged.

    Args:
        model: a chain of ``nn.Linear`` maps with ReLU/LeakyReLU/Identity layers (or none) between
            them; use float64 for exactness.
        data: the dataset D.
        epsilon: activation dependencies with Gram residual ≤ ε are folded (ε = 0: numerical rank);
            neurons are synchronised when their firing patterns are identical on D.
        tolerance: verification tolerance on max |Δ output| (default 1e-10 for float64 models,
            1e-4 otherwise).

    Returns:
        a :class:`SparsifiedModel`; its ``model`` is a new module in eval mode (the input is not
        modified; a model in train mode is run in eval mode, dropout off, and gets its modes back).

    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(20, 3, dtype=torch.float64)
    >>> x[:, 2] = x[:, 0] - x[:, 1]  # one dependency among the inputs: 4 zeros in the first layer
    >>> result = sparsify(model, x)
    >>> result.verified, result.free_directions, result.zeros_gained >= 4
    (True, 4, True)
    """
    if is_hooked_transformer(model):
        raise NotImplementedError(
            "the Section 4 construction is implemented for chains of nn.Linear and ReLU/LeakyReLU/Identity "
            "layers; TransformerLens models are not supported"
        )
    batches = list(iter_batches(shard(data), batch_size))  # this rank's share (torch.distributed)
    new = copy.deepcopy(model)
    structure = discover_torch(new, batches[0].inputs)
    if not structure.sites:
        raise ValueError("no nn.Linear layer called once per forward pass was found")
    if convs := [s.name for s in structure.sites if not isinstance(resolve_module(new, s.name), nn.Linear)]:
        raise NotImplementedError(
            f"the Section 4 construction is implemented for chains of nn.Linear layers; {convs} are not"
        )
    dtype = next(new.parameters()).dtype
    if tolerance is None:
        tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    layer_after: dict[str, NeuronLayer] = {
        layer.in_site.name: layer
        for layer in structure.neuron_layers
        if layer.in_site is not None and layer.out_site is not None
    }
    zeros_before = sum(_zeros(_augmented(resolve_module(new, s.name))) for s in structure.sites)
    free = generic = pinned = 0
    details: list[dict[str, Any]] = []

    for site in structure.sites:
        module = resolve_module(new, site.name)
        assert isinstance(module, nn.Linear)
        # Step 1: eq 23–24 on the site's input.
        f = _capture(new, batches, node_at(site.name, "input"), forward)
        if site.has_bias:
            f = torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64, device=f.device)], dim=1)
        d_aug = f.shape[1]
        gram, r, rows = _site_statistics(f)
        gram_top = float(eigh_descending(gram, one_thread_if_small=True).values[0])
        threshold = max(epsilon, gram_floor(gram_top, d_aug, rows, dtype))
        basis = _pivoted_basis(gram, threshold, d_aug - 1 if site.has_bias else None)
        others = [j for j in range(d_aug) if j not in basis]
        w = _augmented(module)
        if others:
            coeffs = torch.linalg.lstsq(r[:, basis], r[:, others]).solution  # (|basis|, |others|)
            w[:, basis] += w[:, others] @ coeffs.T
            w[:, others] = 0.0
            _set_augmented(module, w)
        dependencies = len(others)
        free += dependencies * site.d_out
        details.append(
            {
                "site": site.name,
                "step": "disconnect dependent activations (eq 23-24)",
                "dependencies": dependencies,
                "disconnected_inputs": others,
                "zeros_from_step": dependencies * site.d_out,
            }
        )
        # Step 2: eq 25–27 on the neuron layer this site feeds.
        layer = layer_after.get(site.name)
        if layer is None:
            continue
        assert layer.out_site is not None
        out_module = resolve_module(new, layer.out_site.name)
        assert isinstance(out_module, nn.Linear)
        pre = _capture(new, batches, layer.pre_point, forward)
        fires = firing_patterns(pre, layer.activation)
        blocks = _blocks(fires)
        fired = all_reduce_max(fires.any(0).to(torch.float64)).cpu() > 0  # on some rank's rows
        dead = set(torch.nonzero(~fired).flatten().tolist()) if layer.activation == "relu" else set()
        magnitude = all_reduce_sum(pre.abs().sum(0)).cpu()  # Σ_x |p_i|: the representative has the largest
        w_in = _augmented(module)
        w_out = out_module.weight.detach().to("cpu", torch.float64).clone()
        gate = torch.eye(layer.width, dtype=torch.float64)
        block_info = []
        for block in blocks:
            if set(block) <= dead:
                continue
            idx = torch.tensor(block)
            m = w_in[idx]  # (|S|, d_aug)
            pivots = _column_pivots(m)
            s = len(pivots)
            if s == 0:
                continue
            u = m[:, pivots]  # (|S|, s)
            if s < len(block):
                q, _ = torch.linalg.qr(u, mode="complete")
                frame = torch.cat([u, q[:, s:]], dim=1)
            else:
                frame = u
            c = torch.linalg.inv(frame)
            new_rows = c @ m
            new_rows[:s, pivots] = torch.eye(s, dtype=torch.float64)  # exact identity on the pivots
            if s < len(block):
                new_rows[s:] = 0.0
            w_in[idx] = new_rows
            w_out[:, idx] = w_out[:, idx] @ frame
            representative = int(magnitude[idx].argmax())
            for i in block:
                gate[i, idx] = frame[representative]
            free += s * s - s
            generic += s
            pinned += s
            block_info.append({"neurons": block, "s": s, "pivot_columns": pivots})
        _set_augmented(module, w_in)
        with torch.no_grad():
            out_module.weight.copy_(w_out.to(out_module.weight.dtype))
        if layer.activation in ("relu", "leaky_relu"):
            parent, child = _parent_and_name(new, layer.name)
            slope = layer.negative_slope if layer.activation == "leaky_relu" else 0.0
            setattr(parent, child, BlockGatedActivation(gate.to(module.weight.device, dtype), slope))
        details.append(
            {
                "layer": layer.name,
                "step": "block-transform synchronised neurons (eq 25-27)",
                "blocks": block_info,
                "dead": sorted(dead),
            }
        )

    zeros_after = sum(_zeros(_augmented(resolve_module(new, s.name))) for s in structure.sites)
    max_diff = 0.0
    with torch.no_grad():
        for b in batches:
            a = run_model(model, b.inputs, forward=forward, positions=None).to(torch.float64)
            c_out = run_model(new, b.inputs, forward=forward, positions=None).to(torch.float64)
            max_diff = max(max_diff, float((a - c_out).abs().max()))
    max_diff = float(all_reduce_max(torch.tensor([max_diff], dtype=torch.float64)))
    return SparsifiedModel(
        model=new,
        max_output_difference=max_diff,
        tolerance=tolerance,
        zeros_before=zeros_before,
        zeros_after=zeros_after,
        free_directions=free,
        generic_directions=generic,
        pinned=pinned,
        layers=details,
    )
