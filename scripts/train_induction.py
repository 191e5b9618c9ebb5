"""Train the bundled induction transformer (2 layers, LayerNorm, GELU) and write it into the package.

Recipe: AdamW (lr 3e-3 after a 100-step linear warm-up, weight decay 0.01, betas (0.9, 0.98)),
batches of 128 fresh repeated random sequences per step (seeded), loss on the predictable positions
only, until the held-out accuracy (4,096 sequences of another seed) reaches ``--target`` for
``--patience`` consecutive evaluations or ``--max-steps`` are done. A few minutes on a 2-core CPU.

Usage::

    python scripts/train_induction.py     # writes src/degeneracy/models/weights/induction.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformer_lens as tl
from safetensors.torch import save_file

from degeneracy.models.induction import (
    INDUCTION_METADATA,
    INDUCTION_WEIGHTS,
    induction_accuracy,
    induction_config,
    induction_config_dict,
    induction_dataset,
    induction_loss,
)


def parse_args() -> argparse.Namespace:
    """Command-line options (the training recipe)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches")
    parser.add_argument("--test-seed", type=int, default=12345, help="seeds the held-out sequences")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--target", type=float, default=0.999)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-weights", type=Path, default=INDUCTION_WEIGHTS)
    parser.add_argument("--out-metadata", type=Path, default=INDUCTION_METADATA)
    return parser.parse_args()


def train(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model; return it and a training record."""
    torch.manual_seed(args.seed)
    model = tl.HookedTransformer(induction_config(seed=args.seed), move_to_device=False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    test = induction_dataset(4096, seed=args.test_seed)
    history, streak, step = [], 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, args.max_steps + 1):
        model.train()
        tokens = induction_dataset(args.batch_size, seed=args.seed * 1_000_003 + step)
        loss = induction_loss(model(tokens), tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                logits = model(test)
            row = {
                "step": step,
                "train_loss": float(loss),
                "test_loss": float(induction_loss(logits, test)),
                "test_acc": induction_accuracy(logits, test),
                "wall_s": round(time.perf_counter() - start, 1),
            }
            history.append(row)
            print(json.dumps(row), flush=True)
            streak = streak + 1 if row["test_acc"] >= args.target else 0
            if streak >= args.patience:
                break
    model.eval()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    with torch.no_grad():
        logits = model(test)
    record = {
        "steps": step,
        "wall_time_s": round(wall, 2),
        "cpu_time_s": round(cpu, 2),
        "accuracy": {
            "test_acc": induction_accuracy(logits, test),
            "test_loss": float(induction_loss(logits, test)),
            "n_test": int(test.shape[0]),
        },
        "history": history,
    }
    return model, record


def main() -> None:
    """Train, then write float32 safetensors weights and the JSON sidecar."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    model, record = train(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps(record["accuracy"]), f"{n_params} parameters, {record['wall_time_s']} s")
    state = {
        name: t.detach().to(torch.float32).contiguous()
        for name, t in model.state_dict().items()
        if not name.endswith(("attn.mask", "attn.IGNORE"))
    }
    args.out_weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out_weights), metadata={"format": "pt", "model": "induction"})
    metadata = {
        "model": "2-layer TransformerLens HookedTransformer, pre-LayerNorm, GELU, causal",
        "config": induction_config_dict(),
        "n_params": n_params,
        "data": {
            "sequences": "[BOS, x_1..x_L, x_1..x_L], x distinct tokens: induction_dataset(n, seed)",
            "train": "induction_dataset(batch_size, seed=seed * 1000003 + step), fresh every step",
            "test_seed": args.test_seed,
            "n_test": 4096,
            "loss_positions": "L .. 2L-1 (induction_targets)",
        },
        "recipe": {
            "optimizer": "AdamW",
            "lr": args.lr,
            "warmup_steps": args.warmup,
            "betas": [0.9, 0.98],
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "max_steps": args.max_steps,
            "stop": f"test accuracy >= {args.target} at {args.patience} consecutive evaluations",
            "init_seed": args.seed,
            "threads": args.threads,
        },
        "seed": args.seed,
        "steps": record["steps"],
        "wall_time_s": record["wall_time_s"],
        "cpu_time_s": record["cpu_time_s"],
        "load_average_at_start": [round(x, 2) for x in load],
        "accuracy": record["accuracy"],
        "torch_version": torch.__version__,
        "transformer_lens_version": tl.__version__ if hasattr(tl, "__version__") else "3.9.0",
        "python_version": platform.python_version(),
        "command": "python scripts/train_induction.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not k.startswith("out_")),
        "history": record["history"],
    }
    args.out_metadata.write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.out_weights} and {args.out_metadata}")


if __name__ == "__main__":
    main()
