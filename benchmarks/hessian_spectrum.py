"""Benchmark: time of the behavioral-loss Hessian spectrum against the parameter count.

Two paths of :func:`degeneracy.accounting.hessian_spectrum`:

* exact — all N eigenvalues (the Kronecker-factored Gram of eq 11 for nn.Linear models, float64,
  then ``eigvalsh``): MLPs 64 → h → h → 10 on the 1,797 digits (h = 8 … 40; h = 32 is the bundled
  digits MLP, whose target is ≤ 5 s);
* lanczos — the top k = 50 eigenvalues by block Lanczos (float32 Hessian-vector products batched 16 at
  a time, float64 Krylov basis, residuals ≤ 1e-4·λ_max): the same MLPs, and one-layer modular-addition
  transformers of growing width on the bundled model's training pairs (d_model 128 is the bundled model, ~227k
  parameters, target ≤ 60 s), read at the last position with
  :func:`degeneracy.adapters.transformer_lens.forward.last_position_logits` (last query only, per-token tables
  for keys and values; equal to ``model(tokens)[:, -1]``).

Usage::

    python benchmarks/hessian_spectrum.py            # everything, writes benchmarks/hessian.md
    python benchmarks/hessian_spectrum.py --quick    # the two targets only

The markdown records the machine load, since these timings on a shared 2-core machine move with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from degeneracy.accounting import hessian_spectrum

HERE = Path(__file__).resolve().parent


def _digits_mlp(hidden: int, seed: int = 0) -> nn.Module:
    from degeneracy.models import DigitsMLP

    torch.manual_seed(seed)
    return DigitsMLP(d_hidden=hidden)


def _digits_data(dtype: torch.dtype) -> torch.Tensor:
    from degeneracy.models import digits_all_inputs

    return digits_all_inputs(dtype=dtype)[0]


def _modadd(d_model: int, trained: bool) -> tuple[nn.Module, torch.Tensor]:
    import transformer_lens as tl

    from degeneracy.models import load_modadd, load_modadd_metadata, modadd_config_dict, modadd_dataset

    split = load_modadd_metadata()["data"]  # the bundled model's own training split
    data = modadd_dataset(frac_train=split["frac_train"], seed=split["seed"])[0]
    if trained:
        return load_modadd(), data
    cfg = modadd_config_dict()
    cfg.update(d_model=d_model, d_head=d_model // cfg["n_heads"], d_mlp=4 * d_model)
    model = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg, seed=0), move_to_device=False)
    return model.eval(), data


WAIT: dict[str, float] = {"threshold": 0.0, "max_seconds": 0.0}
LOADS: list[float] = []


def _wait_quiet() -> float:
    """Wait (up to ``--wait-quiet`` seconds) for the 1-minute load average to drop below the threshold;
    return the load at the start of the measurement."""
    deadline = time.monotonic() + WAIT["max_seconds"]
    while os.getloadavg()[0] > WAIT["threshold"] and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def _time(fn: Any, repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        LOADS.append(_wait_quiet())
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def run(quick: bool, repeat: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    x64 = _digits_data(torch.float64)
    x32 = _digits_data(torch.float32)
    hessian_spectrum(_digits_mlp(8).double(), x64[:64], method="exact")  # warm-up (imports, kernels)
    widths = [32] if quick else [8, 16, 24, 32, 40]
    for h in widths:
        model = _digits_mlp(h).double()
        if h == 32:
            try:
                from degeneracy.models import load_digits_mlp

                model = load_digits_mlp(dtype=torch.float64)
            except FileNotFoundError:
                pass
        seconds, spec = _time(lambda model=model: hessian_spectrum(model, x64, method="exact"), repeat)
        rows.append(
            {
                "path": "exact",
                "model": f"digits MLP 64-{h}-{h}-10" + (" (bundled)" if h == 32 else ""),
                "N": spec.num_parameters,
                "n": spec.num_examples,
                "k": spec.num_parameters,
                "seconds": seconds,
                "load": LOADS[-1],
                "detail": f"Gram {spec.timings['gram']:.2f} s + eigvalsh {spec.timings['eigvalsh']:.2f} s; "
                f"rank {spec.rank()}",
            }
        )
        print(rows[-1], flush=True)
    if not quick:
        for h in widths:
            model = _digits_mlp(h)
            seconds, spec = _time(lambda model=model: hessian_spectrum(model, x32, method="lanczos", k=50), 1)
            rows.append(
                {
                    "path": "lanczos",
                    "model": f"digits MLP 64-{h}-{h}-10",
                    "N": spec.num_parameters,
                    "n": spec.num_examples,
                    "k": 50,
                    "seconds": seconds,
                    "load": LOADS[-1],
                    "detail": f"{spec.matvecs} products; max residual / λ_max "
                    f"{float(spec.residuals.max() / spec.eigenvalues[0]):.1e}",
                }
            )
            print(rows[-1], flush=True)
    from degeneracy.adapters.transformer_lens.forward import last_position_logits

    for d_model, trained in ([] if quick else [(32, False), (64, False)]) + [(128, True)]:
        model, data = _modadd(d_model, trained)
        seconds, spec = _time(
            lambda model=model, data=data: hessian_spectrum(
                model, data, method="lanczos", k=50, forward=last_position_logits
            ),
            1,
        )
        rows.append(
            {
                "path": "lanczos",
                "model": f"modadd d_model {d_model}" + (" (bundled)" if trained else " (untrained)"),
                "N": spec.num_parameters,
                "n": spec.num_examples,
                "k": 50,
                "seconds": seconds,
                "load": LOADS[-1],
                "detail": f"{spec.matvecs} products; max residual / λ_max "
                f"{float(spec.residuals.max() / spec.eigenvalues[0]):.1e}; "
                f"λ_1 {float(spec.eigenvalues[0]):.4g}, λ_50 {float(spec.eigenvalues[-1]):.4g}",
            }
        )
        print(rows[-1], flush=True)
        if trained:  # how accurate are the 50 values at the default budget? a 3x longer, tighter run
            ref = hessian_spectrum(
                model, data, method="lanczos", k=50, forward=last_position_logits, max_iter=450, tol=1e-6
            )
            rel = ((spec.eigenvalues - ref.eigenvalues).abs() / ref.eigenvalues.abs()).max()
            rows[-1]["detail"] += (
                f"; against a {ref.matvecs}-product run (max residual / λ_max "
                f"{float(ref.residuals.max() / ref.eigenvalues[0]):.1e}) the 50 values differ by at most "
                f"{float(rel):.1e} (relative)"
            )
            print(rows[-1], flush=True)
    return rows


def write_markdown(rows: list[dict[str, Any]], path: Path, load_before: tuple[float, ...], args: Any) -> None:
    load_after = os.getloadavg()
    lines = [
        "# Hessian spectrum of the behavioral loss: time against parameter count",
        "",
        "Produced by `python benchmarks/hessian_spectrum.py"
        + (" --quick" if args.quick else "")
        + (
            f" --wait-quiet {args.wait_quiet:g} --load-threshold {args.load_threshold:g}"
            if args.wait_quiet
            else ""
        )
        + f"` (best of {args.repeat} for the exact path, one run for Lanczos). 'load at start' is the "
        "1-minute load average when the measurement began.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        "(other jobs share these cores; timings grow with the load).",
        "",
        "| path | model | N | n | eigenvalues | seconds | load at start | detail |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['model']} | {r['N']:,} | {r['n']:,} | {r['k']:,} | {r['seconds']:.2f} | "
            f"{r['load']:.2f} | {r['detail']} |"
        )
    lines += [
        "",
        "Targets (issue #4): exact spectrum of the bundled digits MLP on all 1,797 inputs in ≤ 5 s; top 50 "
        "eigenvalues of the bundled modular-addition transformer by Lanczos in ≤ 60 s.",
        "",
    ]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="only the two targets")
    parser.add_argument("--repeat", type=int, default=2, help="repeats of the exact path (best is kept)")
    parser.add_argument("--out", type=Path, default=HERE / "hessian.md")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for the 1-minute load average to fall below "
        "--load-threshold",
    )
    parser.add_argument("--load-threshold", type=float, default=1.5)
    args = parser.parse_args()
    WAIT.update(threshold=args.load_threshold, max_seconds=args.wait_quiet)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before = os.getloadavg()
    rows = run(args.quick, args.repeat)
    write_markdown(rows, args.out, load_before, args)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
