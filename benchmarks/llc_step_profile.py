"""Where one SGLD step's time goes on the issue-13 models (user cross-entropy loss, 4 chains, batch 256,
float32, one thread), and the ceiling it implies.

Per model, interleaved repeats (medians): the plain sequential loop's time per draw (``plain_loop`` of
``llc_user_loss.py``), ``estimate_llc``'s sampling-loop time per step of 4 chains (``result.seconds`` /
steps), and two ideal (FLOP-bound) times for that 4-chain step: FLOPs / the 1024³ GEMM peak, and (MLPs)
the sum of the best time of every matmul of the step at its own shapes (forward ``(C, B, in)·(C, in,
out)``, the input and weight gradients). The best possible ratio to the plain loop is then
``4 × plain / ideal``; the best possible fraction of the GEMM peak is ``FLOP time / shape time``. The
machine is shared: medians and the best of the repeats (contention only adds time) are both recorded, and
the same matmuls run back to back for a second ("sustained": what they cost under the samplers' load;
``sustained / ours`` is the share of our step that the bare matmuls would take)::

    python benchmarks/llc_step_profile.py --repeats 5   # writes benchmarks/llc_step_profile.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from llc_user_loss import flops_per_draw, gemm_peak, models, plain_loop  # noqa: E402

from degeneracy.llc import estimate_llc  # noqa: E402


def best(fn, repeats: int = 30) -> float:
    fn()
    out = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def shape_time(model: nn.Module, chains: int, batch: int, seconds: float = 1.0) -> tuple[float, float] | None:
    """The 4-chain step's matmuls at their own shapes (forward, input grad, weight grad): the sum of each
    one's best time, and the mean time of all of them run back to back for ``seconds`` (sustained, under
    the same load as the samplers)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != sum(1 for m in model.modules() if len(list(m.parameters(recurse=False)))):
        return None
    calls = []
    for i, m in enumerate(linears):
        a = torch.randn(chains, batch, m.in_features)
        w = torch.randn(chains, m.in_features, m.out_features)
        g = torch.randn(chains, batch, m.out_features)
        calls.append(lambda a=a, w=w: torch.bmm(a, w))
        calls.append(lambda a=a, g=g: torch.bmm(a.transpose(1, 2), g))
        if i:  # the first layer's input gradient is not needed
            calls.append(lambda w=w, g=g: torch.bmm(g, w.transpose(1, 2)))
    total = sum(best(fn) for fn in calls)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for fn in calls:
            fn()
        count += 1
    return total, (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("llc_step_profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    chains, batch = 4, 256
    report: dict = {
        "torch": torch.__version__,
        "threads": 1,
        "chains": chains,
        "batch_size": batch,
        "models": {},
    }
    for name, (model, x, y, loss) in models().items():
        if args.models and name not in args.models:
            continue
        n = x.shape[0]
        common = dict(nbeta=n / math.log(n), localization=100.0, step_size=1e-5)
        flops = flops_per_draw(model, x, y, loss, batch)
        plain, ours, peaks, shapes, loads = [], [], [], [], []
        for _ in range(args.repeats):
            r = plain_loop(model, x, y, loss, chains=1, draws=args.draws, batch_size=batch, seed=0, **common)
            plain.append(r["seconds"] / args.draws)
            e = estimate_llc(
                model,
                (x, y),
                loss=loss,
                num_chains=chains,
                num_draws=args.draws,
                num_burnin=0,
                batch_size=batch,
                seed=0,
                warn=False,
                **common,
            )
            ours.append(e.seconds / args.draws)
            engine = e.config["engine"]
            peaks.append(gemm_peak())
            shapes.append(shape_time(model, chains, batch))
            loads.append(os.getloadavg()[0])
        peak = max(peaks)
        flop_time = chains * flops / peak
        shape = min(s[0] for s in shapes) if shapes[0] is not None else None
        sustained = statistics.median(s[1] for s in shapes) if shapes[0] is not None else None
        row = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_draw": flops,
            "engine": engine,
            "plain_ms_per_draw": 1e3 * statistics.median(plain),
            "ours_ms_per_step": 1e3 * statistics.median(ours),
            "ideal_flop_ms_per_step": 1e3 * flop_time,
            "ideal_shape_ms_per_step": None if shape is None else 1e3 * shape,
            "sustained_shape_ms_per_step": None if sustained is None else 1e3 * sustained,
            "ours_gemm_share_sustained": None if sustained is None else sustained / statistics.median(ours),
            "plain_ms_per_draw_best": 1e3 * min(plain),
            "ours_ms_per_step_best": 1e3 * min(ours),
            "ratio_to_plain": chains * statistics.median(plain) / statistics.median(ours),
            "ratio_to_plain_best": chains * min(plain) / min(ours),
            "ceiling_ratio_shape_best": None if shape is None else chains * min(plain) / shape,
            "ours_fraction_of_peak_best": flop_time / min(ours),
            "ceiling_ratio_flop": chains * statistics.median(plain) / flop_time,
            "ceiling_ratio_shape": None if shape is None else chains * statistics.median(plain) / shape,
            "ours_fraction_of_peak": flop_time / statistics.median(ours),
            "ceiling_fraction_of_peak_shape": None if shape is None else flop_time / shape,
            "gemm_peak_flops": peak,
            "gemm_peaks": peaks,
            "load_average": statistics.median(loads),
            "plain_s": plain,
            "ours_s": ours,
        }
        report["models"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}, indent=1), flush=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
