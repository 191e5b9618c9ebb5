"""Cost of drawing ±1 sources per example (keyed by seed, stream and global index; the draw that makes a
build independent of the number of processes) against one generator per build (the former draw).

Shapes as a build draws them: basis Grams (batch, R, P_out, d̂_out), edges (batch, R, P_out). One thread,
interleaved A B A B, medians over 7 repeats. Run: ``PYTHONPATH=src python benchmarks/keyed_sources.py``.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from degeneracy.probes import RademacherSources


def former(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return (2 * torch.randint(0, 2, shape, generator=generator) - 1).to(torch.float64)


def main() -> None:
    torch.set_num_threads(1)
    cases = {
        "edges (64, 8, 32)": (64, 8, 32),
        "basis (64, 8, 32, 64)": (64, 8, 32, 64),
        "basis (64, 8, 32, 384)": (64, 8, 32, 384),
    }
    rows = []
    for label, shape in cases.items():
        keyed, old = [], []
        draw, generator = RademacherSources(0), torch.Generator().manual_seed(0)
        examples = torch.arange(shape[0])
        for _ in range(7):
            t0 = time.perf_counter()
            former(shape, generator)
            old.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            draw.keyed(shape, examples, "M[mix]")
            keyed.append(time.perf_counter() - t0)
        a, b = statistics.median(old), statistics.median(keyed)
        extra = 1e6 * (b - a) / shape[0]
        rows.append(f"| {label} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.2f} | {extra:.1f} |")
    print("| draw shape | one generator (ms) | keyed per example (ms) | ratio | extra µs per example |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
