"""Speed of the main entry points, to compare two versions of the package by interleaved runs.

Run it alternately with each version on the path (A B A B ...), e.g. for a checkout of an older commit
in ``../old`` (``git worktree add ../old COMMIT``)::

    PYTHONPATH=../old/src python benchmarks/refactor_speed.py --label old
    python benchmarks/refactor_speed.py --label new

Each run times, in one process after a warm-up, ``--repeats`` builds of the LIB basis of the companion
checkpoint (paper settings, 3,830 inputs, float64) and ``--repeats`` LLC estimates on the bundled digits
MLP (float32, 300 draws), and prints their medians; results go to ``benchmarks/refactor.md`` by hand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    import degeneracy
    from benchmarks._reference import DEFAULT_CHECKPOINT, load_reference
    from degeneracy.models import digits_all_inputs, load_digits_mlp

    model, x, _, _, _ = load_reference(args.checkpoint or DEFAULT_CHECKPOINT)
    layers = [
        "blocks.0.hook_resid_pre",
        {"name": "resid_mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
        {"name": "resid_post", "module": "blocks.0.hook_resid_post", "positions": -1},
        {"name": "logits", "module": "output", "positions": -1},
    ]
    # the former keyword, which both the old and the new versions accept
    opts = dict(method="lib", gram_threshold=1e-15, interaction_threshold=1e-15, rotate_final=False,
                progress=False, relative_thresholds=False)  # fmt: skip
    mlp = load_digits_mlp(dtype=torch.float32)
    digits, _ = digits_all_inputs(dtype=torch.float32)
    basis_s, llc_s = [], []
    for _ in range(args.repeats + 1):  # the first round warms up
        t = time.perf_counter()
        degeneracy.interaction_basis(model, x, layers, **opts)
        basis_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        degeneracy.estimate_llc(
            mlp, digits, nbeta=200, localization=1e4, num_draws=300, num_burnin=100, seed=0
        )
        llc_s.append(time.perf_counter() - t)
    print(
        f"{args.label}: LIB basis median {statistics.median(basis_s[1:]):.3f} s, "
        f"LLC median {statistics.median(llc_s[1:]):.3f} s (load {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
