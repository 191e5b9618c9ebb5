"""Where one SGLD step's time goes on the issue-13 models (user cross-entropy loss, 4 chains, batch 256,
float32, one thread), and the ceiling it implies.

Per model, interleaved repeats (medians): the plain sequential loop's time per draw (``plain_loop`` of
``llc_user_loss.py``), ``estimate_llc``'s sampling-loop time per step of 4 chains (``result.seconds`` /
steps), and two ideal (FLOP-bound) times for that 4-chain step: FLOPs / the 1024³ GEMM peak, and (MLPs)
the sum of the best time of every matmul of the step at its own shapes (forward, input and weight
gradients, each in the fastest of its layouts), and that sum plus the step's Gaussian noise (4 × P
normals, drawn as the sampler draws them), and that plus the step's necessary element-wise work (ReLU
MLPs: activations and derivatives, bias gradients, the cross-entropy head, a three-op update), each op at
its best: no sampler built from these torch operations can take less. The best
possible ratio to the plain loop is then ``4 × plain / ideal``; the best possible fraction of the GEMM
peak is ``FLOP time / shape time``. The
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
from degeneracy.llc.sgld import noise_block_steps  # noqa: E402


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
    one's best time, each in the fastest of its layouts (batch-major ``(C, B, in)·(C, in, out)``,
    feature-major ``(C, out, in)·(C, in, B)``, and for the first layer, whose input the chains share, one
    GEMM over all chains), and the mean time of those calls run back to back for ``seconds`` (sustained,
    under the same load as the samplers)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != sum(1 for m in model.modules() if len(list(m.parameters(recurse=False)))):
        return None
    calls = []
    for i, m in enumerate(linears):
        n_in, n_out = m.in_features, m.out_features
        a, a_t = torch.randn(chains, batch, n_in), torch.randn(chains, n_in, batch)
        w, w_t = torch.randn(chains, n_in, n_out), torch.randn(chains, n_out, n_in)
        g, g_t = torch.randn(chains, batch, n_out), torch.randn(chains, n_out, batch)
        forward = [lambda a=a, w=w: torch.bmm(a, w), lambda a_t=a_t, w_t=w_t: torch.bmm(w_t, a_t)]
        weight_grad = [
            lambda a=a, g=g: torch.bmm(a.transpose(1, 2), g),
            lambda a=a, g_t=g_t: torch.bmm(g_t, a),
        ]
        if i == 0:  # the shared input: one GEMM over the chains
            x, stacked, grads = (
                torch.randn(batch, n_in),
                torch.randn(n_in, chains * n_out),
                torch.randn(batch, chains * n_out),
            )
            forward.append(lambda x=x, stacked=stacked: torch.mm(x, stacked))
            weight_grad.append(lambda x=x, grads=grads: torch.mm(x.t(), grads))
        options = [forward, weight_grad]
        if i:  # the first layer's input gradient is not needed
            options.append(
                [lambda w=w, g=g: torch.bmm(g, w.transpose(1, 2)), lambda w=w, g_t=g_t: torch.bmm(w, g_t)]
            )
        for fns in options:
            times = [best(fn) for fn in fns]
            calls.append((min(times), fns[times.index(min(times))]))
    total = sum(t for t, _ in calls)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _, fn in calls:
            fn()
        count += 1
    return total, (time.perf_counter() - start) / count


def elementwise_time(model: nn.Module, chains: int, batch: int) -> float | None:
    """The best time of the element-wise work any sampler of a ReLU MLP with a cross-entropy loss does per
    step besides its matmuls and noise, each op at its best: the activations and their derivatives, the
    bias gradients, the loss head (``log_softmax``, ``exp``, the label subtraction) and a three-op update
    of θ ``(C, P)`` (localization, gradient, noise). Activations feature-major ``(C, features, B)``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != sum(1 for m in model.modules() if len(list(m.parameters(recurse=False)))):
        return None
    dim = sum(p.numel() for p in model.parameters())
    fns = []
    for i, m in enumerate(linears):
        z = torch.randn(chains, m.out_features, batch)
        fns.append(lambda z=z: z.sum(2))  # bias gradient
        if i < len(linears) - 1:
            h = torch.relu(z)
            fns.append(lambda z=z: torch.relu(z))
            fns.append(lambda z=z, h=h: torch.ops.aten.threshold_backward(z, h, 0))
    out = torch.randn(chains, linears[-1].out_features, batch)
    index = torch.randint(0, out.shape[1], (1, 1, batch)).expand(chains, 1, batch)
    minus_one = torch.full((1, 1, 1), -1.0).expand_as(index)
    logp = torch.log_softmax(out, dim=1)
    fns += [
        lambda: torch.log_softmax(out, dim=1),
        lambda: logp.exp(),
        lambda: logp.clone().scatter_add_(1, index, minus_one),
    ]
    theta, grad, noise, center = (
        torch.randn(chains, dim),
        torch.randn(chains, dim),
        torch.randn(chains, dim),
        torch.randn(dim),
    )
    drift = torch.empty_like(theta)
    fns += [
        lambda: torch.sub(theta, center, out=drift),
        lambda: theta.add_(grad, alpha=1e-12),
        lambda: theta.add_(noise, alpha=1e-12),
    ]
    return sum(best(fn) for fn in fns)


def noise_time(chains: int, dim: int) -> float:
    """The best time of a step's Gaussian noise (``chains × dim`` normals), drawn as the sampler draws it:
    per chain, in blocks of :func:`~degeneracy.llc.sgld.noise_block_steps` steps."""
    block = noise_block_steps(dim)
    out = torch.empty(block, dim)
    return chains * best(lambda: torch.randn((block, dim), out=out), repeats=10) / block


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
        plain, ours, peaks, shapes, noises, elementwise, loads = [], [], [], [], [], [], []
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
            noises.append(noise_time(chains, sum(p.numel() for p in model.parameters())))
            elementwise.append(elementwise_time(model, chains, batch))
            loads.append(os.getloadavg()[0])
        peak = max(peaks)
        flop_time = chains * flops / peak
        shape = min(s[0] for s in shapes) if shapes[0] is not None else None
        sustained = statistics.median(s[1] for s in shapes) if shapes[0] is not None else None
        noise = min(noises)
        floor = None if shape is None else shape + noise  # matmuls + noise, each at its best
        ops = None if elementwise[0] is None else min(elementwise)
        full = None if floor is None or ops is None else floor + ops
        row = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_draw": flops,
            "engine": engine,
            "plain_ms_per_draw": 1e3 * statistics.median(plain),
            "ours_ms_per_step": 1e3 * statistics.median(ours),
            "ideal_flop_ms_per_step": 1e3 * flop_time,
            "ideal_shape_ms_per_step": None if shape is None else 1e3 * shape,
            "sustained_shape_ms_per_step": None if sustained is None else 1e3 * sustained,
            "noise_ms_per_step": 1e3 * noise,
            "ideal_shape_noise_ms_per_step": None if floor is None else 1e3 * floor,
            "ceiling_ratio_shape_noise_best": None if floor is None else chains * min(plain) / floor,
            "ceiling_ratio_shape_noise": None if floor is None else chains * statistics.median(plain) / floor,
            "elementwise_ms_per_step": None if ops is None else 1e3 * ops,
            "ideal_all_ms_per_step": None if full is None else 1e3 * full,
            "ceiling_ratio_all_best": None if full is None else chains * min(plain) / full,
            "ceiling_ratio_all": None if full is None else chains * statistics.median(plain) / full,
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
