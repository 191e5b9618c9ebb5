"""Train the bundled modular-addition transformer and write it into the package.

The companion paper (arXiv 2405.10928) trains with AdamW (lr 1e-3, weight decay 1, betas (0.9, 0.98)),
full batch, on 30 % of the 113**2 pairs, for 60,000 epochs (grokking). That takes hours on a small
CPU, so the defaults here keep the optimiser, weight decay and full batch but train on 50 % of the
pairs with a higher learning rate (with a short linear warm-up), and stop once the held-out accuracy
has stayed at or above ``--target-acc`` for ``--patience`` epochs. Weight decay is what gives the
clean Fourier structure, so it is kept at 1. With seed 0 the held-out accuracy reaches 100 % at epoch
350 and the run stops at epoch 1,300: about 3 minutes on an idle 2-core CPU (0.13 s per epoch), longer
when the cores are shared (see benchmarks/models.md).

The forward pass used for training computes the last-position logits only
(:func:`degeneracy.models.modadd.modadd_last_logits`); the saved model is checked with the full
TransformerLens forward pass before it is written.

Usage::

    python scripts/train_modadd.py                       # writes src/degeneracy/models/weights/modadd.*
    # the paper's recipe (hours on a CPU, so also raise --max-minutes):
    python scripts/train_modadd.py --frac-train 0.3 --lr 1e-3 --warmup 0 --epochs 60000 --patience 60000
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from degeneracy.models.modadd import (
    MODADD_METADATA,
    MODADD_WEIGHTS,
    modadd_accuracy,
    modadd_all_inputs,
    modadd_config,
    modadd_config_dict,
    modadd_dataset,
    modadd_last_logits,
    modadd_split_indices,
)


def parse_args() -> argparse.Namespace:
    """Command-line options (the training recipe)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--frac-train", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="seeds the data split and the initialisation")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.98)
    parser.add_argument("--warmup", type=int, default=10, help="epochs of linear learning-rate warm-up")
    parser.add_argument("--epochs", type=int, default=20000, help="maximum number of full-batch epochs")
    parser.add_argument("--target-acc", type=float, default=0.999, help="held-out accuracy to hold")
    parser.add_argument("--patience", type=int, default=1000, help="epochs to hold --target-acc")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop training after this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-weights", type=Path, default=MODADD_WEIGHTS)
    parser.add_argument("--out-metadata", type=Path, default=MODADD_METADATA)
    return parser.parse_args()


def lr_factor(epoch: int, warmup: int) -> float:
    """Linear warm-up from ``1/warmup`` to 1 over ``warmup`` epochs, then constant."""
    return min(1.0, (epoch + 1) / warmup) if warmup > 0 else 1.0


@torch.no_grad()
def evaluate(model: Any, inputs: Tensor, labels: Tensor) -> tuple[float, float]:
    """(loss, accuracy) of the last-position logits on ``inputs``."""
    logits = modadd_last_logits(model, inputs)
    loss = float(torch.nn.functional.cross_entropy(logits.double(), labels))
    acc = float((logits.argmax(dim=-1) == labels).float().mean())
    return loss, acc


def train(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model with the recipe in ``args``; return it and the training record."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = modadd_dataset(args.p, args.frac_train, args.seed)
    model = HookedTransformer(modadd_config(args.p, seed=args.seed), move_to_device=False)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, args.warmup))
    history: list[dict[str, float]] = []
    held_since: int | None = None
    start = time.perf_counter()
    cpu_start = time.process_time()
    epoch = 0
    stop_reason = "max epochs"
    for epoch in range(1, args.epochs + 1):
        logits = modadd_last_logits(model, train_x)
        loss = torch.nn.functional.cross_entropy(logits, train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if epoch % args.eval_every and epoch != args.epochs:
            continue
        train_loss, train_acc = evaluate(model, train_x, train_y)
        test_loss, test_acc = evaluate(model, test_x, test_y)
        elapsed = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch,
                "seconds": round(elapsed, 2),
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
            }
        )
        print(
            f"epoch {epoch:6d}  {elapsed:7.1f}s  train loss {train_loss:.3e} acc {train_acc:.4f}  "
            f"test loss {test_loss:.3e} acc {test_acc:.4f}",
            flush=True,
        )
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training diverged at epoch {epoch}")
        held_since = (held_since or epoch) if test_acc >= args.target_acc else None
        if held_since is not None and epoch - held_since >= args.patience:
            stop_reason = f"held-out accuracy >= {args.target_acc} for {args.patience} epochs"
            break
        if elapsed > args.max_minutes * 60:
            stop_reason = f"time limit of {args.max_minutes} minutes"
            break
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    model.eval()
    record = {
        "epochs_run": epoch,
        "stop_reason": stop_reason,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "history": history,
    }
    return model, record


@torch.no_grad()
def final_accuracies(model: Any, p: int, frac_train: float, seed: int) -> dict[str, float]:
    """Train/test/all accuracy with the full TransformerLens forward pass (what users will run)."""
    inputs, labels = modadd_all_inputs(p)
    logits = model(inputs)
    train_idx, test_idx = modadd_split_indices(p, frac_train, seed)
    return {
        "train_acc": modadd_accuracy(logits[train_idx], labels[train_idx]),
        "test_acc": modadd_accuracy(logits[test_idx], labels[test_idx]),
        "all_acc": modadd_accuracy(logits, labels),
        "n_train": int(train_idx.numel()),
        "n_test": int(test_idx.numel()),
    }


def main() -> None:
    """Train, check, and write the weights (float32 safetensors) and the JSON sidecar."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, record = train(args)
    accuracies = final_accuracies(model, args.p, args.frac_train, args.seed)
    print(json.dumps(accuracies), flush=True)
    state = {name: param.detach().to(torch.float32).contiguous() for name, param in model.named_parameters()}
    args.out_weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out_weights), metadata={"format": "pt", "model": "modadd"})
    metadata = {
        "model": "modular-addition transformer (arXiv 2405.10928 architecture)",
        "library": "transformer_lens.HookedTransformer",
        "config": modadd_config_dict(args.p),
        "data": {
            "p": args.p,
            "inputs": "[a, b, p] (p is the '=' token); label (a + b) mod p; last position only",
            "split": "torch.randperm(p*p, generator=torch.Generator().manual_seed(seed)); first "
            "int(frac_train * p*p) are training pairs",
            "frac_train": args.frac_train,
            "seed": args.seed,
        },
        "recipe": {
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "betas": [args.beta1, args.beta2],
            "warmup_epochs": args.warmup,
            "batch": "full",
            "max_epochs": args.epochs,
            "early_stop": {"target_test_acc": args.target_acc, "patience_epochs": args.patience},
            "loss": "cross-entropy on logits[:, -1]",
            "init_seed": args.seed,
            "threads": args.threads,
        },
        "seed": args.seed,
        "epochs_run": record["epochs_run"],
        "stop_reason": record["stop_reason"],
        "wall_time_s": record["wall_time_s"],
        "cpu_time_s": record["cpu_time_s"],
        "accuracy": accuracies,
        "torch_version": torch.__version__,
        "transformer_lens_version": importlib.metadata.version("transformer-lens"),
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()}, {args.threads} threads",
        "command": "python scripts/train_modadd.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not k.startswith("out_")),
        "history": record["history"],
    }
    args.out_metadata.write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.out_weights} and {args.out_metadata}", flush=True)


if __name__ == "__main__":
    main()
