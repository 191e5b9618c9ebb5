"""Estimates against Aoyagi's learning coefficients of linear networks, by SGLD and by volume.

Reduced-rank regression (M, H, N) and deep linear networks with widths (H_1, ..., H_{L+1}) at a true map
of rank r; loss ‖W_L ⋯ W_1 − P*‖²_F (the population behavioral loss for x ~ N(0, I)), θ* with every
factor of rank r (θ* = 0 for r = 0). SGLD at nβ = 100, γ = 1 (only nβ / γ^L matters for these
homogeneous losses); volume: the multiplicity fit of log V(ε) over ε ∈ [1e-14, 1e-6].

    python benchmarks/llc_oracles.py          # a few minutes on 2 cores; prints a markdown table
"""

from __future__ import annotations

import json
import math
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


def main() -> None:
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
    Path(__file__).with_name("llc_oracles.json").write_text(json.dumps(rows, indent=2))
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
