"""Estimates against Aoyagi's learning coefficients of linear networks, by SGLD and by volume.

Reduced-rank regression (M, H, N) and deep linear networks with widths (H_1, ..., H_{L+1}) at a true map
of rank r; loss ‖W_L ⋯ W_1 − P*‖²_F (the population behavioral loss for x ~ N(0, I)), θ* with every
factor of rank r (θ* = 0 for r = 0). SGLD at nβ = 100, γ = 1 (only nβ / γ^L matters for these
homogeneous losses); volume: the multiplicity fit of log V(ε) over ε ∈ [1e-14, 1e-6].

    python benchmarks/llc_oracles.py          # a few minutes on 2 cores; prints a markdown table
    python benchmarks/llc_oracles.py --deep --workers 2   # only the deep-linear study (~10 min, 2 busy cores)

The deep-linear study (``--deep``) runs SGLD at γ = 1 and nβ ∈ {10², 10³} for the METHOD example
(10, 10, 10, 10) at r = 0 and for (3, 3, 3, 3) at r = 0 and 1, each at one to four step sizes a factor 2
apart (η nβ from 0.08 down). Burn-in and draws are each ≥ 3 relaxation times τ = 2 / (η γ) of the directions
that only the localization holds (the slowest ones), so the chains start from a stationary state; the
stationarity check is the mean excess loss nβ (L − L*) over the first, middle and last third of the
draws. SGLD's Euler discretisation biases λ̂ by O(η); the two smallest step sizes give the first-order
(Richardson) extrapolation λ̂₀ = 2 λ̂(η/2) − λ̂(η), valid only where the bias is already linear in η,
which a third step size checks (the coarser pair's difference must be twice the finer one's).
Results are merged into ``llc_oracles.json`` as rows with ``"study": "deep"``; ``--deep-table`` reprints
them.

    python benchmarks/llc_oracles.py --mala --workers 2   # the same cases by MALA (~10 min, 2 busy cores)

``--mala`` runs ``sample_sgld(..., sampler="mala")`` (Metropolis-adjusted Langevin: exact for any η on
these deterministic losses, so there is no step-size bias to extrapolate away) on ``MALA_RUNS``, with the
same γ = 1 and ≥ 3 τ burn-in and draws; rows ``"study": "deep_mala"`` carry the acceptance rate;
``--mala-table`` reprints them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from degeneracy.llc import LLCWarning, sample_sgld, theory, volume_llc

F64 = torch.float64


def factors(widths: list[int], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(len(widths) - 1):
        if rank == 0:
            out[f"W{i}"] = torch.zeros(widths[i + 1], widths[i], dtype=F64)
        else:
            u = torch.randn(widths[i + 1], rank, generator=g, dtype=F64)
            v = torch.randn(widths[i], rank, generator=g, dtype=F64)
            out[f"W{i}"] = u @ v.T / math.sqrt(widths[i])
    return out


def product(params: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
    p = params["W0"]
    for i in range(1, depth):
        p = params[f"W{i}"] @ p
    return p


def sgld_row(widths: list[int], rank: int, step_size: float | str, draws: int, chains: int = 16) -> dict:
    center = factors(widths, rank)
    depth = len(widths) - 1
    target = product(center, depth)

    def loss(p: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        return (product(p, depth) - target).square().sum()

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCWarning)
        r = sample_sgld(
            loss,
            center,
            nbeta=100.0,
            localization=1.0,
            step_size=step_size,
            num_chains=chains,
            num_draws=draws,
            num_burnin=draws // 5,
            seed=0,
        )
    thirds = [float(100.0 * r.loss_traces[:, i * draws // 3 : (i + 1) * draws // 3].mean()) for i in range(3)]
    return {
        "widths": widths,
        "rank": rank,
        "method": f"SGLD nβ=100 γ=1 η={r.config['step_size']:.2g}, {chains}×{draws} draws",
        "estimate": r.mean,
        "stderr": r.stderr,
        "theory": theory.deep_linear_llc(widths, rank),
        "draw_thirds": thirds,
        "epsilon": r.epsilon,
        "seconds": time.perf_counter() - start,
    }


def volume_row(widths: list[int]) -> dict:
    shapes = [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]
    sizes = [a * b for a, b in shapes]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        p = parts[0].view(shapes[0])
        for part, shape in zip(parts[1:], shapes[1:], strict=True):
            p = part.view(shape) @ p
        return p.square().sum()

    start = time.perf_counter()
    eps = torch.logspace(-14, -2, 25, dtype=F64)
    r = volume_llc(
        loss,
        torch.zeros(sum(sizes), dtype=F64),
        epsilons=eps,
        num_points=2000,
        num_repeats=4,
        seed=0,
        fit_range=(1e-14, 1e-6),
    )
    return {
        "widths": widths,
        "rank": 0,
        "method": "volume, fit of λ and m over ε ∈ [1e-14, 1e-6]",
        "estimate": r.fit["llc"],
        "stderr": r.fit["llc_std"] / 2.0,
        "theory": theory.deep_linear_llc(widths, 0),
        "multiplicity": r.fit["multiplicity"],
        "local_llc": {
            f"{float(e):.0e}": round(float(v), 3) for e, v in zip(r.epsilons[::6], r.llc[::6], strict=True)
        },
        "seconds": time.perf_counter() - start,
    }


# (widths, rank, nβ, η, chains, draws, burn-in); η nβ ≤ 0.08 at r = 0 and ≤ 0.04 at r = 1 (whose Hessian
# at θ* has h_max ≈ 9, so η nβ h_max ≤ 0.36); burn-in and draws each ≥ 3 τ, τ = 2 / (η γ) steps
# (longest first, so that parallel workers finish together)
DEEP_RUNS: list[tuple[list[int], int, float, float, int, int, int]] = [
    ([10, 10, 10, 10], 0, 1e3, 8e-5, 32, 75000, 75000),
    ([3, 3, 3, 3], 1, 1e3, 4e-5, 64, 150000, 150000),
    ([3, 3, 3, 3], 0, 1e3, 4e-5, 64, 150000, 150000),
    ([10, 10, 10, 10], 0, 1e2, 8e-4, 64, 25000, 25000),
    ([10, 10, 10, 10], 0, 1e2, 4e-4, 64, 25000, 25000),
    ([10, 10, 10, 10], 0, 1e2, 2e-4, 32, 30000, 30000),
    ([10, 10, 10, 10], 0, 1e2, 1e-4, 32, 60000, 60000),
    ([3, 3, 3, 3], 1, 1e2, 1e-4, 64, 80000, 80000),
    ([3, 3, 3, 3], 0, 1e2, 2e-4, 64, 40000, 40000),
    ([3, 3, 3, 3], 0, 1e3, 8e-5, 64, 75000, 75000),
    ([3, 3, 3, 3], 1, 1e2, 2e-4, 64, 40000, 40000),
    ([3, 3, 3, 3], 1, 1e2, 4e-4, 64, 20000, 20000),
    ([3, 3, 3, 3], 0, 1e2, 4e-4, 64, 20000, 20000),
    ([3, 3, 3, 3], 0, 1e2, 8e-4, 64, 10000, 10000),
]


def deep_row(
    widths: list[int],
    rank: int,
    nbeta: float,
    step_size: float,
    chains: int,
    draws: int,
    burnin: int,
    sampler: str = "sgld",
) -> dict:
    """One SGLD (or MALA) run of the deep-linear study (γ = 1), with its stationarity thirds and λ̂_var."""
    center = factors(widths, rank)
    depth = len(widths) - 1
    target = product(center, depth)

    def loss(p: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        return (product(p, depth) - target).square().sum()

    load = os.getloadavg()[0]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LLCWarning)
        r = sample_sgld(
            loss,
            center,
            nbeta=nbeta,
            localization=1.0,
            step_size=step_size,
            num_chains=chains,
            num_draws=draws,
            num_burnin=burnin,
            seed=0,
            sampler=sampler,  # type: ignore[arg-type]
        )
    excess = nbeta * (r.loss_traces - r.init_loss)
    thirds = [float(excess[:, i * draws // 3 : (i + 1) * draws // 3].mean()) for i in range(3)]
    # s.e. of each third over chains, for the stationarity comparison
    third_se = [
        float(excess[:, i * draws // 3 : (i + 1) * draws // 3].mean(dim=1).std() / math.sqrt(chains))
        for i in range(3)
    ]
    tau = 2.0 / step_size  # relaxation time (steps) of a direction held only by γ = 1
    mala = {"acceptance": r.config["acceptance"]} if sampler == "mala" else {}
    return {
        "study": "deep" if sampler == "sgld" else f"deep_{sampler}",
        **mala,
        "widths": widths,
        "rank": rank,
        "nbeta": nbeta,
        "localization": 1.0,
        "step_size": step_size,
        "chains": chains,
        "draws": draws,
        "burnin": burnin,
        "burnin_tau": burnin / tau,
        "draws_tau": draws / tau,
        "estimate": r.mean,
        "stderr": r.stderr,
        "variance_estimate": r.variance_estimate,
        "theory": theory.deep_linear_llc(widths, rank),
        "draw_thirds": thirds,
        "draw_thirds_se": third_se,
        "epsilon": r.epsilon,
        "good_chains": r.num_good_chains,
        "warnings": sorted({str(w.message)[:160] for w in caught}),
        "loadavg_start": load,
        "seconds": time.perf_counter() - start,
    }


def richardson(rows: list[dict]) -> list[dict]:
    """First-order step-size extrapolation λ̂₀ = 2 λ̂(η/2) − λ̂(η) for every (widths, r, nβ) measured at
    step sizes a factor 2 apart (the two smallest); with a third, 2η, the coarser pair's difference is
    reported too (an O(η) bias makes it twice the finer pair's)."""
    out = []
    keys = sorted({(tuple(r["widths"]), r["rank"], r["nbeta"]) for r in rows})
    for widths, rank, nbeta in keys:
        group = sorted(
            (r for r in rows if (tuple(r["widths"]), r["rank"], r["nbeta"]) == (widths, rank, nbeta)),
            key=lambda r: r["step_size"],
        )
        if len(group) < 2 or not math.isclose(group[1]["step_size"], 2 * group[0]["step_size"]):
            continue
        half, full = group[0], group[1]
        entry = {
            "widths": list(widths),
            "rank": rank,
            "nbeta": nbeta,
            "step_sizes": [full["step_size"], half["step_size"]],
            "estimate": 2 * half["estimate"] - full["estimate"],
            "stderr": math.hypot(2 * half["stderr"], full["stderr"]),
            "pair_difference": full["estimate"] - half["estimate"],
            "theory": half["theory"],
        }
        if len(group) > 2 and math.isclose(group[2]["step_size"], 2 * full["step_size"]):
            entry["coarser_pair_difference"] = group[2]["estimate"] - full["estimate"]
            entry["coarser_to_finer_ratio"] = entry["coarser_pair_difference"] / entry["pair_difference"]
        out.append(entry)
    return out


def _deep_worker(spec: tuple) -> dict:
    torch.set_num_threads(1)
    row = deep_row(*spec)
    keys = ("widths", "rank", "nbeta", "step_size", "estimate", "draw_thirds", "seconds")
    print(json.dumps({k: row[k] for k in keys}), flush=True)
    return row


def write_deep(rows: list[dict]) -> list[dict]:
    """Merge the study's rows (and their extrapolations) into llc_oracles.json, replacing earlier ones."""
    extrapolated = richardson(rows)
    path = Path(__file__).with_name("llc_oracles.json")
    previous = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in previous if r.get("study") not in ("deep", "deep_extrapolated")]
    extra = [{"study": "deep_extrapolated", **e} for e in extrapolated]
    path.write_text(json.dumps(kept + rows + extra, indent=2))
    return extrapolated


def print_deep(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (-r["widths"][0], r["rank"], r["nbeta"], -r["step_size"]))
    print(
        "| widths | r | nβ | γ | η | chains × draws (burn-in) | λ̂ | ± s.e. | Aoyagi λ | rel. error | "
        "nβ(L − L*) by thirds | λ̂_var | load | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = r["estimate"] / r["theory"] - 1
        thirds = " / ".join(f"{t:.2f}" for t in r["draw_thirds"])
        print(
            f"| {tuple(r['widths'])} | {r['rank']} | {r['nbeta']:.0e} | 1 | {r['step_size']:.1e} | "
            f"{r['chains']} × {r['draws']} ({r['burnin']}) | {r['estimate']:.3f} | {r['stderr']:.3f} | "
            f"{r['theory']:.2f} | {100 * rel:+.1f} % | {thirds} | {r['variance_estimate']:.1f} | "
            f"{r['loadavg_start']:.1f} | {r['seconds']:.0f} |"
        )
    print()
    print(
        "| widths | r | nβ | η pair | λ̂(η) − λ̂(η/2) | λ̂(2η) − λ̂(η) | λ̂₀ = 2λ̂(η/2) − λ̂(η) | ± s.e. | "
        "Aoyagi λ | rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in richardson(rows):
        rel = e["estimate"] / e["theory"] - 1
        coarser = "–"
        if "coarser_pair_difference" in e:
            coarser = f"{e['coarser_pair_difference']:+.3f} (× {e['coarser_to_finer_ratio']:.2f})"
        print(
            f"| {tuple(e['widths'])} | {e['rank']} | {e['nbeta']:.0e} | "
            f"{e['step_sizes'][0]:.1e} / {e['step_sizes'][1]:.1e} | {e['pair_difference']:+.3f} | "
            f"{coarser} | {e['estimate']:.3f} | {e['stderr']:.3f} | {e['theory']:.2f} | {100 * rel:+.1f} % |"
        )


# MALA runs (widths, rank, nβ, η, chains, draws, burn-in), same γ = 1 and same 3 τ rule, τ = 2 / (η γ)
# steps (a lower bound: rejections slow MALA by about 1 / acceptance). η was picked from 6,000-step
# probes for an acceptance of ≈ 0.5–0.8, before any long run; (10, 10, 10, 10) is also run at η / 2 to
# check that the answer no longer depends on η.
MALA_RUNS: list[tuple[list[int], int, float, float, int, int, int]] = [
    ([10, 10, 10, 10], 0, 1e2, 1e-4, 16, 60000, 60000),
    ([10, 10, 10, 10], 0, 1e2, 2e-4, 32, 30000, 30000),
    ([3, 3, 3, 3], 1, 1e3, 8e-5, 32, 75000, 75000),
    ([3, 3, 3, 3], 1, 1e2, 4e-4, 64, 20000, 20000),
    ([3, 3, 3, 3], 0, 1e3, 3.2e-4, 64, 20000, 20000),
    ([3, 3, 3, 3], 0, 1e2, 1.6e-3, 64, 10000, 10000),
    # added after the first pass measured stationary acceptances of 0.24 (η = 1e-4) and 0.13 (2e-4) for
    # (10, 10, 10, 10): smaller steps, 2 τ (η = 2.5e-5) and 3 τ (5e-5) of burn-in and of draws
    ([10, 10, 10, 10], 0, 1e2, 2.5e-5, 16, 160000, 160000),
    ([10, 10, 10, 10], 0, 1e2, 5e-5, 16, 120000, 120000),
]


def _mala_worker(spec: tuple) -> dict:
    torch.set_num_threads(1)
    row = deep_row(*spec, sampler="mala")
    keys = (
        "widths",
        "rank",
        "nbeta",
        "step_size",
        "estimate",
        "stderr",
        "acceptance",
        "draw_thirds",
        "seconds",
    )
    print(json.dumps({k: row[k] for k in keys}), flush=True)
    return row


def mala_main(workers: int, only: list[int] | None = None) -> None:
    """Run MALA_RUNS (or the ones indexed by ``only``), merge them into llc_oracles.json as
    ``"study": "deep_mala"`` rows (replacing stored rows of the same case and η), print the table."""
    specs = MALA_RUNS if only is None else [MALA_RUNS[i] for i in only]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_mala_worker, specs))
    else:
        rows = [_mala_worker(spec) for spec in specs]
    path = Path(__file__).with_name("llc_oracles.json")
    previous = json.loads(path.read_text()) if path.exists() else []

    def key(r: dict) -> tuple:
        return tuple(r["widths"]), r["rank"], r["nbeta"], r["step_size"]

    new = {key(r) for r in rows}
    kept = [r for r in previous if r.get("study") != "deep_mala" or key(r) not in new]
    path.write_text(json.dumps(kept + rows, indent=2))
    print_mala([r for r in kept if r.get("study") == "deep_mala"] + rows)


def print_mala(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (-r["widths"][0], r["rank"], r["nbeta"], -r["step_size"]))
    print(
        "| widths | r | nβ | γ | η | chains × draws (burn-in) | acceptance | λ̂ | ± s.e. | Aoyagi λ | "
        "rel. error | nβ(L − L*) by thirds (± s.e.) | load | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = r["estimate"] / r["theory"] - 1
        thirds = " / ".join(f"{t:.2f}" for t in r["draw_thirds"])
        se = max(r["draw_thirds_se"])
        print(
            f"| {tuple(r['widths'])} | {r['rank']} | {r['nbeta']:.0e} | 1 | {r['step_size']:.1e} | "
            f"{r['chains']} × {r['draws']} ({r['burnin']}) | {r['acceptance']:.3f} | {r['estimate']:.3f} | "
            f"{r['stderr']:.3f} | {r['theory']:.2f} | {100 * rel:+.1f} % | {thirds} (± {se:.2f}) | "
            f"{r['loadavg_start']:.1f} | {r['seconds']:.0f} |"
        )


def deep_main(workers: int) -> None:
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_deep_worker, DEEP_RUNS))
    else:
        rows = [_deep_worker(spec) for spec in DEEP_RUNS]
    write_deep(rows)
    print_deep(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deep", action="store_true", help="run only the deep-linear SGLD study")
    parser.add_argument("--workers", type=int, default=1, help="processes for --deep (one thread each)")
    parser.add_argument("--deep-table", action="store_true", help="print the stored --deep results")
    parser.add_argument("--mala", action="store_true", help="run only the deep-linear MALA runs")
    parser.add_argument("--mala-table", action="store_true", help="print the stored --mala results")
    parser.add_argument("--runs", type=str, default=None, help="--mala: comma-separated MALA_RUNS indices")
    args = parser.parse_args()
    if args.mala_table:
        stored = json.loads(Path(__file__).with_name("llc_oracles.json").read_text())
        print_mala([r for r in stored if r.get("study") == "deep_mala"])
        return
    if args.mala:
        mala_main(args.workers, None if args.runs is None else [int(i) for i in args.runs.split(",")])
        return
    if args.deep_table:
        stored = json.loads(Path(__file__).with_name("llc_oracles.json").read_text())
        print_deep([r for r in stored if r.get("study") == "deep"])
        return
    if args.deep:
        deep_main(args.workers)
        return
    torch.set_num_threads(1)
    rows = [
        sgld_row([5, 3, 5], 1, "auto", 8000, chains=32),
        sgld_row([5, 3, 5], 0, 1e-4, 20000),
        sgld_row([3, 3, 3, 3], 1, "auto", 20000, chains=32),
        sgld_row([3, 3, 3, 3], 0, 1e-4, 20000),
        sgld_row([2, 2, 2, 2], 0, 3e-4, 20000),
        sgld_row([10, 10, 10, 10], 0, 1e-4, 20000),
        volume_row([2, 2, 2]),
        volume_row([2, 2, 2, 2]),
    ]
    path = Path(__file__).with_name("llc_oracles.json")
    previous = json.loads(path.read_text()) if path.exists() else []
    deep = [r for r in previous if r.get("study") in ("deep", "deep_extrapolated", "deep_mala")]  # kept
    path.write_text(json.dumps(rows + deep, indent=2))
    print("| widths | r | method | λ̂ | ± s.e. | Aoyagi λ | rel. error | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        rel = row["estimate"] / row["theory"] - 1
        print(
            f"| {tuple(row['widths'])} | {row['rank']} | {row['method']} | {row['estimate']:.3f} | "
            f"{row['stderr']:.3f} | {row['theory']:.2f} | {100 * rel:+.1f} % | {row['seconds']:.0f} |"
        )
    for row in rows:
        if "draw_thirds" in row:
            print(
                f"{tuple(row['widths'])} r={row['rank']}: nβ(L − L*) by thirds of the draws "
                f"{[round(t, 2) for t in row['draw_thirds']]}, ε = {row['epsilon']:.3g}"
            )
        else:
            print(
                f"{tuple(row['widths'])} volume: local λ(ε) {row['local_llc']}, m = {row['multiplicity']:.2f}"
            )


if __name__ == "__main__":
    main()
