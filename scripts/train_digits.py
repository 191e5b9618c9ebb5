"""Train the bundled digits MLP (scikit-learn's 8x8 digits) and write it into the package.

Recipe: AdamW (lr 3e-3, weight decay 1e-2), minibatches of 128, 150 epochs, on 80 % of the 1,797 digits
(split by ``torch.randperm`` seeded with ``--seed``), inputs divided by 16. Takes seconds on a CPU.

Usage::

    python scripts/train_digits.py        # writes src/degeneracy/models/weights/digits_mlp.*
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from degeneracy.models.digits import DIGITS_METADATA, DIGITS_WEIGHTS, DigitsMLP, digits_dataset


def parse_args() -> argparse.Namespace:
    """Command-line options (the training recipe)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and batches")
    parser.add_argument("--frac-train", type=float, default=0.8)
    parser.add_argument("--d-hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="a tiny model: 1 thread is fastest")
    parser.add_argument("--out-weights", type=Path, default=DIGITS_WEIGHTS)
    parser.add_argument("--out-metadata", type=Path, default=DIGITS_METADATA)
    return parser.parse_args()


@torch.no_grad()
def accuracy(model: DigitsMLP, inputs: Tensor, labels: Tensor) -> float:
    """Fraction of correctly classified digits."""
    return float((model(inputs).argmax(dim=-1) == labels).float().mean())


def train(args: argparse.Namespace) -> tuple[DigitsMLP, dict[str, Any]]:
    """Train a fresh :class:`DigitsMLP`; return it and a training record."""
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = digits_dataset(args.seed, args.frac_train)
    model = DigitsMLP(d_hidden=args.d_hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    cpu_start = time.process_time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(train_x.shape[0], generator=generator)
        for batch in order.split(args.batch_size):
            loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % 20 == 0 or epoch == args.epochs:
            model.eval()
            row = {
                "epoch": epoch,
                "train_acc": accuracy(model, train_x, train_y),
                "test_acc": accuracy(model, test_x, test_y),
            }
            history.append(row)
            print(f"epoch {epoch:4d}  train acc {row['train_acc']:.4f}  test acc {row['test_acc']:.4f}")
    model.eval()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    with torch.no_grad():
        train_loss = float(torch.nn.functional.cross_entropy(model(train_x), train_y))
        test_loss = float(torch.nn.functional.cross_entropy(model(test_x), test_y))
    record = {
        "wall_time_s": round(wall, 2),
        "cpu_time_s": round(cpu, 2),
        "accuracy": {
            "train_acc": accuracy(model, train_x, train_y),
            "test_acc": accuracy(model, test_x, test_y),
            "train_loss": train_loss,
            "test_loss": test_loss,
            "n_train": int(train_x.shape[0]),
            "n_test": int(test_x.shape[0]),
        },
        "history": history,
    }
    return model, record


def main() -> None:
    """Train, then write float32 safetensors weights and the JSON sidecar."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, record = train(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps(record["accuracy"]), f"{n_params} parameters, {record['wall_time_s']} s")
    state = {name: t.detach().to(torch.float32).contiguous() for name, t in model.state_dict().items()}
    args.out_weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out_weights), metadata={"format": "pt", "model": "digits_mlp"})
    metadata = {
        "model": "DigitsMLP: fc1 -> act1 (ReLU) -> fc2 -> act2 (ReLU) -> out",
        "architecture": {"d_in": 64, "d_hidden": args.d_hidden, "n_classes": 10, "n_params": n_params},
        "data": {
            "source": "sklearn.datasets.load_digits (1,797 8x8 images)",
            "inputs": "pixel intensities / 16, float32, shape (n, 64)",
            "split": "torch.randperm(1797, generator=torch.Generator().manual_seed(seed)); first "
            "int(frac_train * 1797) train",
            "frac_train": args.frac_train,
            "seed": args.seed,
        },
        "recipe": {
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "loss": "cross-entropy",
            "init_seed": args.seed,
            "threads": args.threads,
        },
        "seed": args.seed,
        "wall_time_s": record["wall_time_s"],
        "cpu_time_s": record["cpu_time_s"],
        "accuracy": record["accuracy"],
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "command": "python scripts/train_digits.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not k.startswith("out_")),
        "history": record["history"],
    }
    args.out_metadata.write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.out_weights} and {args.out_metadata}")


if __name__ == "__main__":
    main()
