"""Structured (closed-form) vs autodiff Jacobian Grams on the bundled LayerNorm model (`load_induction`).

The LIB basis of the bundled two-layer induction transformer (pre-LayerNorm, GELU) at every residual
stream hook point and the logits, all 17 positions, float64, centred: once with ``sections="auto"``
(closed forms of :mod:`degeneracy.adapters.transformer_lens.normed` / ``grams``) and once with
``sections=None`` (``torch.func`` through the hooked model). One thread, runs interleaved A B A B,
medians; the eigenvalues of both builds are compared (largest relative deviation).

Usage::

    python benchmarks/induction_structured.py [--n 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

import degeneracy
from degeneracy.models import induction_dataset, load_induction

NODES = [
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
    "output",
]


def main() -> None:
    """Time both builds, interleaved, and write the JSON record."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=32, help="sequences (held-out seed 7)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("induction_structured.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    model = load_induction(dtype=torch.float64)
    tokens = induction_dataset(args.n, seed=7)
    times: dict[str, list[float]] = {"auto": [], "none": []}
    stages: dict[str, dict] = {}
    bases = {}
    load = [os.getloadavg()]
    for _ in range(args.repeats):
        for key, sections in (("auto", "auto"), ("none", None)):
            t0 = time.perf_counter()
            basis = degeneracy.interaction_basis(model, tokens, NODES, sections=sections, progress=False)
            times[key].append(time.perf_counter() - t0)
            stages[key] = {"timings": basis.info["timings"], "jacobians": basis.info["jacobians"]}
            bases[key] = basis
        load.append(os.getloadavg())
    dev = 0.0
    for name in bases["auto"]:
        a, b = bases["auto"][name].eigenvalues, bases["none"][name].eigenvalues
        dev = max(dev, float((a - b).abs().max() / b.abs().max()))
    med = {key: statistics.median(value) for key, value in times.items()}
    record = {
        "n_sequences": args.n,
        "positions": int(tokens.shape[1]),
        "threads": 1,
        "repeats": args.repeats,
        "seconds": times,
        "median_s": med,
        "speedup": med["none"] / med["auto"],
        "eigenvalue_max_relative_deviation": dev,
        "dims": {name: int(bases["auto"][name].dim) for name in bases["auto"]},
        "load_average": load,
        "stages": stages,
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "stages"}, indent=1))
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
