"""One process against two (``torchrun``, gloo) for the bundled modular-addition basis + graph + ablations.

Runs the ``graph`` command on ``benchmarks/distributed_modadd.yaml`` (LIB basis, edges, node and edge
ablations on the bundled model's training inputs, the ablations on the first 1,024; no modules or Fourier
labels) as a user would:

    A: python -m degeneracy graph benchmarks/distributed_modadd.yaml --out OUT --force
    B: torchrun --standalone --nproc_per_node 2 -m degeneracy graph benchmarks/distributed_modadd.yaml \\
           --out OUT --force

interleaved A B A B ..., each process with one thread (``OMP_NUM_THREADS=1``), so that B uses the two
cores A leaves idle. Reports the wall time of each command (process start and imports included), the
sum of the stage times rank 0 records (``graph_summary.json``), their medians and the ratio A/B, the
1-minute load average before and after every run, and checks that both wrote the same edges (1e-10
relative) and the same numbers of edges needed. Results go to ``benchmarks/distributed_modadd.md``.

    python benchmarks/distributed_modadd.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "distributed_modadd.yaml"


def run(kind: str, out: Path) -> dict:
    path = os.pathsep.join([str(ROOT / "src"), *sys.path])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "degeneracy", "graph", str(CONFIG), "--out", str(out), "--force"]
    if kind == "two":
        command = ["torchrun", "--standalone", "--nproc_per_node", "2", *command[1:]]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "graph_summary.json").read_text())
    return {
        "kind": kind,
        "wall": wall,
        "stages": sum(summary["timings"].values()),
        "timings": summary["timings"],
        "needed": summary["edges_needed"],
        "load": (load_before, os.getloadavg()[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import degeneracy

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {"one": Path(tmp) / "one", "two": Path(tmp) / "two"}
        for i in range(args.repeats):
            for kind in ("one", "two"):
                runs.append(run(kind, outs[kind]))
                r = runs[-1]
                print(f"{i} {kind}: wall {r['wall']:.1f} s, stages {r['stages']:.1f} s, load {r['load']}")
        g1 = degeneracy.load_graph(outs["one"] / "graphs" / "lib.safetensors")
        g2 = degeneracy.load_graph(outs["two"] / "graphs" / "lib.safetensors")
        diff = max(
            float((g2.edges[p] - g1.edges[p]).abs().max() / g1.edges[p].abs().max()) for p in g1.pairs
        )
    one = [r for r in runs if r["kind"] == "one"]
    two = [r for r in runs if r["kind"] == "two"]
    same = diff < 1e-10 and one[-1]["needed"] == two[-1]["needed"]
    assert same, (diff, one[-1]["needed"], two[-1]["needed"])
    med = {k: (statistics.median(r["wall"] for r in rs), statistics.median(r["stages"] for r in rs))
           for k, rs in (("one", one), ("two", two))}  # fmt: skip
    lines = [
        "# One process against two (torchrun, gloo): modular-addition basis + graph + ablations",
        "",
        f"`python benchmarks/distributed_modadd.py --repeats {args.repeats}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, one thread per process, runs interleaved "
        "A B A B. Config `benchmarks/distributed_modadd.yaml`: the bundled model, its training inputs, "
        "LIB basis, edges, node ablation curves and edge ablation by bisection (float64). *wall*: the whole "
        "command (start-up and imports included); *stages*: the sum of the stage times rank 0 recorded. "
        "The machine is shared with other jobs: the load average (1 min) before and after each run is "
        "listed, and timings grow with it.",
        "",
        "| run | processes | wall s | stages s | load before | load after |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs):
        n = 1 if r["kind"] == "one" else 2
        load = f"{r['load'][0]:.2f} | {r['load'][1]:.2f}"
        lines.append(f"| {i // 2 + 1} | {n} | {r['wall']:.1f} | {r['stages']:.1f} | {load} |")
    lines += [
        "",
        "| processes | median wall s | median stages s |",
        "|---|---:|---:|",
        f"| 1 | {med['one'][0]:.1f} | {med['one'][1]:.1f} |",
        f"| 2 | {med['two'][0]:.1f} | {med['two'][1]:.1f} |",
        f"| ratio 1/2 | {med['one'][0] / med['two'][0]:.2f} | {med['one'][1] / med['two'][1]:.2f} |",
        "",
        "Stage times of the last runs (s): "
        + "; ".join(
            f"{k} process(es): " + ", ".join(f"{s} {t:.1f}" for s, t in r["timings"].items())
            for k, r in (("1", one[-1]), ("2", two[-1]))
        ),
        "",
        f"Both wrote the same results: largest relative edge difference {diff:.1e}; edges needed "
        f"{one[-1]['needed']} (1 process) and {two[-1]['needed']} (2 processes).",
        "",
        f"Reading: the load average stayed between {min(r['load'][0] for r in runs):.1f} and "
        f"{max(r['load'][0] for r in runs):.1f} on 2 cores. On a machine that busy the scheduler gives each "
        "runnable process a share of the CPU, so two processes also receive about twice the CPU time of "
        "one: a ratio above 2 measures that share as much as the second core, and on a quiet machine 2 "
        "is the ceiling (less the start-up of a second process and the all-reduces).",
        "",
    ]
    (ROOT / "benchmarks" / "distributed_modadd.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
