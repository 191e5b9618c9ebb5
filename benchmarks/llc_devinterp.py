"""Speed and agreement of ``degeneracy.estimate_llc`` against devinterp (PyPI) on the digits MLP.

Both libraries run SGLD on the same model, the same behavioral loss E ‖f_θ(x) − f_θ*(x)‖² (targets are
the model's own outputs at θ*), the same settings (chains, draws, batch size, nβ, γ, η, burn-in 0,
float32, same number of torch threads). devinterp runs its chains one after another, as it does by
default; ours run all chains in one vectorised step.

devinterp is not a dependency of the project; install it for the benchmark only::

    pip install devinterp==2.0.1 -c constraints.txt
    python benchmarks/llc_devinterp.py            # prints a markdown table and writes JSON

The speed figure is draws per second summed over chains, end to end (each library's public call,
including its set-up), median over interleaved repeats; our sampling loop alone is reported as well.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from degeneracy.llc import estimate_llc
from degeneracy.models import digits_dataset, load_digits_mlp


def devinterp_llc(
    model, inputs, reference, *, chains, draws, batch_size, nbeta, localization, step_size, seed
):
    """devinterp 2.0.1's public ``llc`` on the behavioral loss: ``input_ids`` rows hold [x, f_θ*(x)]."""
    from datasets import Dataset

    d_in = inputs.shape[1]
    dataset = Dataset.from_dict({"input_ids": torch.cat([inputs, reference], 1).tolist()})
    dataset.set_format("torch")

    def loss_fn(m, ids):
        x, y = ids[:, :d_in].float(), ids[:, d_in:].float()
        per_example = (m(x) - y).square().sum(-1)
        # devinterp wants a per-token loss (batch, seq − 1); every column carries the example's loss so
        # that its means equal the behavioral loss
        return per_example[:, None].expand(-1, ids.shape[1] - 1)

    seconds, out = run_devinterp(
        model, dataset, loss_fn, chains=chains, draws=draws, batch_size=batch_size, nbeta=nbeta,
        localization=localization, step_size=step_size, seed=seed,
    )  # fmt: skip
    return {"seconds": seconds, "llc": float(out.llc_mean), "llc_std": float(out.llc_std)}


def run_devinterp(
    model, dataset, loss_fn, *, chains, draws, batch_size, nbeta, localization, step_size, seed
):
    """devinterp's ``llc`` on ``dataset`` (rows in "input_ids") with ``loss_fn``, no burn-in, its zarr
    output in a temporary folder: (wall seconds, devinterp's result)."""
    from devinterp.slt.llc import llc

    folder = tempfile.mkdtemp()
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = llc(
                model,
                dataset,
                {},
                lr=step_size,
                n_beta=nbeta,
                loss_fn=loss_fn,
                num_chains=chains,
                num_draws=draws,
                batch_size=batch_size,
                localization=localization,
                num_burnin_steps=0,
                init_seed=seed,
                device="cpu",
                output_path=str(Path(folder) / "samples.zarr"),
            )
        return time.perf_counter() - start, out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ours_llc(
    model, inputs, *, chains, draws, batch_size, nbeta, localization, step_size, seed, engine="auto"
):
    start = time.perf_counter()
    r = estimate_llc(
        model,
        inputs,
        nbeta=nbeta,
        localization=localization,
        step_size=step_size,
        num_chains=chains,
        num_draws=draws,
        num_burnin=0,
        batch_size=batch_size,
        seed=seed,
        engine=engine,
        warn=False,
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "loop_seconds": r.seconds,
        "llc": r.mean,
        "llc_std": r.std,
        "engine": r.config["engine"],
        "step_size": r.config["step_size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--localization", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--agreement-chains", type=int, default=8)
    parser.add_argument("--agreement-draws", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("llc_devinterp.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_digits_mlp(dtype=torch.float32)
    inputs = digits_dataset()[0]
    with torch.no_grad():
        reference = model(inputs)
    n = inputs.shape[0]
    nbeta = n / math.log(n)
    # one step size for both, ours' automatic choice at these settings (0.1 / (nβ h_max + γ))
    probe = estimate_llc(
        model,
        inputs,
        nbeta=nbeta,
        localization=args.localization,
        num_chains=1,
        num_draws=1,
        num_burnin=0,
        warn=False,
    )
    step_size = probe.config["step_size"]
    settings = dict(
        chains=args.chains,
        draws=args.draws,
        batch_size=args.batch_size,
        nbeta=nbeta,
        localization=args.localization,
        step_size=step_size,
        seed=0,
    )
    num_parameters = sum(p.numel() for p in model.parameters())
    print(
        f"digits MLP: {num_parameters} parameters, {n} examples; settings {settings}, threads {args.threads}"
    )

    # warm-up (imports, allocator), then interleaved repeats
    ours_llc(model, inputs, **settings)
    devinterp_llc(model, inputs, reference, **settings)
    runs = {"ours": [], "ours_vmap": [], "devinterp": []}
    for _ in range(args.repeats):
        runs["ours"].append(ours_llc(model, inputs, **settings))
        runs["ours_vmap"].append(ours_llc(model, inputs, **settings, engine="vmap"))
        runs["devinterp"].append(devinterp_llc(model, inputs, reference, **settings))
    draws_total = args.chains * args.draws

    def rate(rows, key="seconds"):
        return statistics.median(draws_total / r[key] for r in rows)

    speed = {
        "ours_draws_per_s": rate(runs["ours"]),
        "ours_loop_draws_per_s": rate(runs["ours"], "loop_seconds"),
        "ours_vmap_draws_per_s": rate(runs["ours_vmap"]),
        "devinterp_draws_per_s": rate(runs["devinterp"]),
    }
    speed["ratio"] = speed["ours_draws_per_s"] / speed["devinterp_draws_per_s"]
    speed["ratio_vmap"] = speed["ours_vmap_draws_per_s"] / speed["devinterp_draws_per_s"]

    # agreement: more chains and draws, same settings otherwise
    agree = dict(settings, chains=args.agreement_chains, draws=args.agreement_draws)
    ours = ours_llc(model, inputs, **agree)
    theirs = devinterp_llc(model, inputs, reference, **agree)
    se = math.hypot(ours["llc_std"], theirs["llc_std"]) / math.sqrt(args.agreement_chains)
    agreement = {
        "ours_llc": ours["llc"],
        "ours_llc_std": ours["llc_std"],
        "devinterp_llc": theirs["llc"],
        "devinterp_llc_std": theirs["llc_std"],
        "difference": ours["llc"] - theirs["llc"],
        "combined_stderr": se,
        "chains": args.agreement_chains,
        "draws": args.agreement_draws,
    }
    report = {
        "settings": settings,
        "threads": args.threads,
        "repeats": args.repeats,
        "speed": speed,
        "agreement": agreement,
        "runs": runs,
        "num_parameters": num_parameters,
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(report, indent=2))

    print()
    print("| | draws/s (2 chains × 200 draws, end to end) | ratio to devinterp |")
    print("|---|---|---|")
    print(f"| devinterp 2.0.1 | {speed['devinterp_draws_per_s']:.0f} | 1 |")
    print(
        f"| degeneracy, batched engine (default) | {speed['ours_draws_per_s']:.0f} | {speed['ratio']:.1f} |"
    )
    print(f"| degeneracy, vmap engine | {speed['ours_vmap_draws_per_s']:.0f} | {speed['ratio_vmap']:.1f} |")
    print(f"| degeneracy, sampling loop only | {speed['ours_loop_draws_per_s']:.0f} | |")
    print()
    print(
        f"agreement ({args.agreement_chains} chains × {args.agreement_draws} draws): "
        f"ours λ̂ = {ours['llc']:.2f} ± {ours['llc_std']:.2f}, devinterp λ̂ = {theirs['llc']:.2f} ± "
        f"{theirs['llc_std']:.2f} (difference {agreement['difference']:+.2f}, combined s.e. {se:.2f})"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
