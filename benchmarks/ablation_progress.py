"""Ablation evaluations in pieces of 128 examples (so that progress bars move within a batch): the
reference modadd edge counts must not change, and the time must not grow.

Needs the cached reference bases and graphs of ``benchmarks/modadd_ablation.py`` (``--cache``) and the
reference checkpoint. ``--check lib,pca``: rerun the edge ablations and compare them with the cached
results written before the change (edges needed, every evaluated accuracy, losses); ``--time``: one
layer pair, whole batches vs pieces, interleaved A B A B, one thread, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default=str(ROOT / "runs/bench_cache"))
    parser.add_argument(
        "--checkpoint", default=str(ROOT.parent / "shared/reference-models/modadd-seed0/model_epoch_60000.pt")
    )
    parser.add_argument("--check", default="lib,pca")
    parser.add_argument("--time", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import degeneracy.ablation.runner as runner
    from benchmarks.modadd_ablation import load
    from degeneracy.ablation import edge_ablation
    from degeneracy.basis import load_basis
    from degeneracy.edges import load_graph, transformer_lens_sections

    cache = Path(args.cache)
    model, data, labels = load("reference", args.checkpoint)

    def run(method: str, pairs=None):
        basis = load_basis(cache / f"reference_train_{method}.safetensors")
        graph = load_graph(cache / f"reference_train_{method}_graph.safetensors")
        sections = transformer_lens_sections(model, basis.layers)
        return edge_ablation(model, data, basis, graph, labels=labels, delta=0.001, batch_size=1024,
                             pairs=pairs, sections=sections, allow_other_model=True)  # fmt: skip

    torch.set_num_threads(2)
    for method in [m for m in args.check.split(",") if m]:
        old = json.loads((cache / f"reference_train_{method}_ablation.json").read_text())
        old = {tuple(r["pair"]): r for r in old}
        for pair, r in run(method).items():
            before = {int(k): v for k, v in old[pair]["evaluations"].items()}
            losses = {int(k): v for k, v in old[pair]["losses"].items()}
            same = all(before.get(n) == a for n, a in r.evaluations.items())
            rel = max(abs(losses[n] - v) / abs(v) for n, v in r.losses.items() if n in losses and v)
            needed = f"needed {r.num_needed} (before {old[pair]['num_needed']})"
            print(f"{method} {pair}: {needed}, accuracies identical {same}, max rel. loss diff {rel:.2e}")
    if args.time:
        torch.set_num_threads(1)
        pair = ("resid_mid", "resid_post")
        times: dict[int | None, list[float]] = {None: [], 128: []}
        for _ in range(2):
            for step in (None, 128):
                runner.EVALUATION_STEP = step
                t0 = time.perf_counter()
                r = run("lib", [pair])[pair]
                times[step].append(time.perf_counter() - t0)
                print(step, r.num_needed, f"{times[step][-1]:.1f} s", os.getloadavg(), flush=True)
        a, b = statistics.median(times[None]), statistics.median(times[128])
        print(f"median whole batches {a:.1f} s, pieces of 128 {b:.1f} s, ratio {b / a:.2f}", os.getloadavg())


if __name__ == "__main__":
    main()
