"""Structured closed-form Grams (adapters/huggingface_grams.py) vs the kernel-based Gram (one Jacobian
column per input position and direction, `shortcut_gram` without `gram`) for one random BERT layer and
one random GPT-2 block, float64, centred LIB maps (random R₊ with the constant in column 0, random
C_out), all positions. One thread, A B A B interleaved, medians; load average recorded.

    python benchmarks/hf_grams.py --width 256 --heads 8 --positions 32 --examples 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, GPT2Config
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from degeneracy.adapters.huggingface_sections import bert_layer, gpt2_block
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.sections import SectionShortcut, shortcut_gram


def forms(width: int, heads: int) -> dict:
    torch.manual_seed(0)
    bert = BertLayer(BertConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width))
    gpt2 = GPT2Block(GPT2Config(n_embd=width, n_head=heads), layer_idx=0)
    return {"bert": bert_layer(bert.double().eval(), None), "gpt2": gpt2_block(gpt2.double().eval(), None)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/hf_grams.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    d, f64 = args.width, torch.float64
    x = torch.cat([torch.randn(args.examples, args.positions, d, generator=gen, dtype=f64),
                   torch.ones(args.examples, args.positions, 1, dtype=f64)], dim=-1)  # fmt: skip
    r_in = torch.randn(d + 1, d + 1, generator=gen, dtype=f64)
    r_in[d, 1:] = 0.0
    c_out = torch.randn(d + 1, d + 1, generator=gen, dtype=f64)
    rule = homogeneous_rule(integration_rule("gradient"))
    ids = torch.zeros(args.examples, args.positions, dtype=torch.long)  # no padding, never read
    rows = []
    with torch.no_grad():
        for name, form in forms(d, args.heads).items():
            paths = {"structured": SectionShortcut(*form), "kernel": SectionShortcut(*form[:3])}
            times: dict = {k: [] for k in paths}
            grams = {}
            for _ in range(args.repeats):
                for path, short in paths.items():
                    t0 = time.perf_counter()
                    grams[path] = shortcut_gram(short, ids, x, r_in, c_out, rule, True, 2**20)
                    times[path].append(time.perf_counter() - t0)
            diff = (grams["structured"] - grams["kernel"]).abs().max() / grams["kernel"].abs().max()
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"block": name, "args": vars(args), "seconds": times, "median": med,
                   "ratio": med["kernel"] / med["structured"], "rel_diff": float(diff),
                   "load": os.getloadavg()}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
