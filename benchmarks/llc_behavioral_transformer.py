"""The behavioral loss on the bundled modular-addition transformer: the chain-batched TransformerLens
forward (``engine="auto"``, :mod:`degeneracy.llc.transformer`) against the vmap engine, interleaved
(A B A B ...), 4 chains, batch 256, float32, one thread; sampling-loop milliseconds per step, medians::

    python benchmarks/llc_behavioral_transformer.py --repeats 5   # writes llc_behavioral_transformer.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch

from degeneracy.llc import estimate_llc
from degeneracy.models import load_modadd, modadd_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--kind", default="behavioral", choices=["behavioral", "kl"])
    default_out = Path(__file__).with_name("llc_behavioral_transformer.json")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_modadd().eval()
    tokens = modadd_dataset()[0]
    n = tokens.shape[0]
    settings = dict(
        loss=args.kind,
        nbeta=n / math.log(n),
        localization=100.0,
        step_size=1e-9,  # the behavioral MSE on logits is stiff: h_max ~ 1e6
        num_chains=4,
        num_draws=args.draws,
        num_burnin=0,
        batch_size=256,
        seed=0,
        warn=False,
    )
    rows: dict[str, list[float]] = {"vmap": [], "auto": []}
    llc, engines, loads = {}, {}, []
    for _ in range(args.repeats):
        for engine in rows:
            r = estimate_llc(model, tokens, engine=engine, **settings)
            rows[engine].append(1e3 * r.seconds / args.draws)
            llc[engine], engines[engine] = r.mean, r.config["engine"]
            loads.append(os.getloadavg()[0])
    median = {k: statistics.median(v) for k, v in rows.items()}
    report = {
        "torch": torch.__version__,
        "settings": {k: v for k, v in settings.items() if k != "warn"},
        "ms_per_step": rows,
        "median_ms_per_step": median,
        "speedup": median["vmap"] / median["auto"],
        "engines": engines,
        "llc": llc,
        "load_average": [min(loads), max(loads)],
    }
    args.out.write_text(json.dumps(report, indent=2))
    shown = ("median_ms_per_step", "speedup", "engines", "llc", "load_average")
    print(json.dumps({k: report[k] for k in shown}))


if __name__ == "__main__":
    main()
