"""Edge computation time on the modular-addition transformers (issue #3 speed benchmark).

Two measurements, each in a fresh process so that the peak resident memory belongs to the edge
computation alone (bases are built once and cached under ``--cache``):

* ``reference``: the companion paper's seed-0 checkpoint, its 3,830 training inputs, float64, the
  plain-gradient rule, LIB basis with the paper's settings (absolute truncation 1e-15, centred,
  unrotated logits);
* ``bundled``: the bundled model (``degeneracy.models.load_modadd``) on all 113² inputs.

For each, the edges are computed with the hook-based sections (the model re-run from its input) and
with the TransformerLens section shortcuts, and compared with each other.

    python benchmarks/edges_modadd.py [--checkpoint PATH] [--cache DIR] [--out benchmarks/edges_modadd.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = [
    "blocks.0.hook_resid_pre",
    {"name": "resid_mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
    {"name": "resid_post", "module": "blocks.0.hook_resid_post", "positions": -1},
    {"name": "logits", "module": "output", "positions": -1},
]
REPEATS = 3
from benchmarks._reference import PAPER_BASIS  # noqa: E402


def load_case(case: str, checkpoint: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if case == "reference":
        from benchmarks._reference import load_reference

        model, train, _, _, _ = load_reference(checkpoint)
        return model, train
    from degeneracy.models import load_modadd, modadd_all_inputs

    inputs, _ = modadd_all_inputs()
    return load_modadd(dtype=torch.float64), inputs


def basis_path(cache: Path, case: str, method: str) -> Path:
    return cache / f"{case}_{method}.safetensors"


def build_basis(case: str, checkpoint: str, cache: Path, method: str = "lib") -> None:
    import degeneracy

    path = basis_path(cache, case, method)
    if path.exists():
        return
    model, data = load_case(case, checkpoint)
    t0 = time.perf_counter()
    basis = degeneracy.interaction_basis(
        model, data, LAYERS, method=method, batch_size=4096, progress=False, **PAPER_BASIS
    )
    basis.info["build_seconds"] = time.perf_counter() - t0
    basis.save(path)


def wait_quiet(limit: float, threshold: float) -> float:
    """Wait up to ``limit`` seconds for the 1-minute load average to fall below ``threshold``; return it."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def time_edges(case: str, checkpoint: str, cache: Path, shortcuts: bool, batch_size: int, mode: str) -> dict:
    """One timed edge computation (run in its own process; the best of ``REPEATS`` runs)."""
    import degeneracy
    from degeneracy.basis import load_basis
    from degeneracy.edges import transformer_lens_sections

    torch.set_num_threads(2)
    model, data = load_case(case, checkpoint)
    basis = load_basis(basis_path(cache, case, "lib"))
    sections = transformer_lens_sections(model, basis.layers) if shortcuts else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    walls, loads = [], []
    for _ in range(REPEATS if shortcuts else 1):
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        graph = degeneracy.interaction_graph(
            model, data, basis, batch_size=batch_size, jacobian_mode=mode, sections=sections, progress=False
        )
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    graph.save(cache / f"{case}_lib_graph_{'short' if shortcuts else 'hooks'}.safetensors")
    return {
        "case": case,
        "examples": int(data.shape[0]),
        "dims": basis.dims,
        "shortcuts": shortcuts,
        "batch_size": batch_size,
        "mode": mode,
        "modes": graph.info["modes"],
        "wall_seconds": round(wall, 2),
        "all_wall_seconds": [round(w, 2) for w in walls],
        "load_at_start": [round(v, 2) for v in loads],
        "per_pair_seconds": {k: round(v, 2) for k, v in graph.info["timings"].items()},
        "peak_rss_mb_before": round(rss0),
        "peak_rss_mb": round(rss1),
        "completeness": {f"{a}->{b}": c for (a, b), c in graph.completeness.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        default=str(ROOT.parent / "shared/reference-models/modadd-seed0/model_epoch_60000.pt"),
    )
    parser.add_argument("--cache", default=str(ROOT / "runs/bench_cache"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/edges_modadd.json"))
    parser.add_argument("--cases", default="reference,bundled")
    parser.add_argument("--batch-sizes", default="2048")
    parser.add_argument("--modes", default="auto")
    parser.add_argument("--hooks", action="store_true", help="also time the hook-based sections")
    parser.add_argument("--wait-quiet", type=float, default=600.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--load-threshold", type=float, default=1.0)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one timing, JSON out
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.one:
        case, short, bs, mode = args.one.split(":")
        print(json.dumps(time_edges(case, args.checkpoint, cache, short == "1", int(bs), mode)))
        return
    results = []
    for case in args.cases.split(","):
        build_basis(case, args.checkpoint, cache)
        variants = [True, False] if args.hooks else [True]
        for short in variants:
            for bs in args.batch_sizes.split(","):
                for mode in args.modes.split(","):
                    spec = f"{case}:{int(short)}:{bs}:{mode}"
                    wait_quiet(args.wait_quiet, args.load_threshold)
                    run = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--one",
                            spec,
                            "--checkpoint",
                            args.checkpoint,
                            "--cache",
                            args.cache,
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    row = json.loads(run.stdout.strip().splitlines()[-1])
                    print(json.dumps(row), flush=True)
                    results.append(row)
    from degeneracy.edges import load_graph

    agreement = {}
    for case in args.cases.split(","):
        a, b = (cache / f"{case}_lib_graph_{v}.safetensors" for v in ("short", "hooks"))
        if a.exists() and b.exists():
            ga, gb = load_graph(a), load_graph(b)
            agreement[case] = max(
                float((ga.edges[p] - gb.edges[p]).abs().max() / gb.edges[p].abs().max()) for p in ga.pairs
            )
    payload = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads",
        "runs": results,
        "max_relative_difference_shortcuts_vs_hooks": agreement,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    lines = [
        "# Edge computation time, modular addition (float64, plain-gradient rule, LIB basis)",
        "",
        f"{payload['machine']}; `python benchmarks/edges_modadd.py {' '.join(sys.argv[1:])}`. Wall time of "
        "`interaction_graph` (best of 3 with the shortcuts, after bases are built), peak resident memory "
        "of the process, and the 1-minute load average when each run started (the machine is shared).",
        "",
        "| model | inputs | sections | batch | wall (s) | per pair (s) | peak RSS (MB) | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pairs = ", ".join(f"{v}" for k, v in r["per_pair_seconds"].items() if k != "total")
        kind = "shortcuts + closed-form kernels" if r["shortcuts"] else "hooks (autodiff)"
        lines.append(
            f"| {r['case']} | {r['examples']} | {kind} | {r['batch_size']} | {r['wall_seconds']} "
            f"| {pairs} | {r['peak_rss_mb']} | {r['load_at_start']} |"
        )
    lines += ["", f"Largest relative difference between the two section kinds: {agreement}.", ""]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
