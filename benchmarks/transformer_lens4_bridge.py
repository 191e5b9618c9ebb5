"""TransformerLens 4 ``TransformerBridge`` hook points as node layers, with a bridge booted offline.

Not part of the test suite (the package is tested with transformer-lens 3.9; TransformerLens 4 needs
transformers >= 5.9). Run it in a throwaway environment that keeps the installed packages::

    python -m venv --system-site-packages /tmp/tl4
    /tmp/tl4/bin/pip install --no-deps transformer-lens==4.3.0
    PYTHONPATH=src /tmp/tl4/bin/python benchmarks/transformer_lens4_bridge.py

It saves a random 2-layer GPT-2 (no download) to a local directory, boots a bridge from that directory
with ``HF_HUB_OFFLINE=1``, and builds a LIB basis and edges with node layers at the bridge's hook points.
"""

from __future__ import annotations

import os
import tempfile
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import degeneracy  # noqa: E402


def main() -> None:
    """Boot a bridge from a local directory and run a basis and a graph at its hook points."""
    warnings.filterwarnings("ignore")
    from importlib.metadata import version

    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=100)
        GPT2LMHeadModel(config).save_pretrained(path)
        bridge = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float64)
    print("transformer_lens", version("transformer-lens"), type(bridge).__name__)
    print("is a torch.nn.Module:", isinstance(bridge, torch.nn.Module))
    hooks = [n for n, m in bridge.named_modules() if type(m).__name__ == "HookPoint"]
    print(len(hooks), "hook points, e.g.", hooks[4:7])
    nodes = [
        {"name": "r0", "module": "blocks.0.hook_in", "read": "output"},
        {"name": "r1", "module": "blocks.1.hook_in", "read": "output"},
        {"name": "r2", "module": "blocks.1.hook_out", "read": "output"},
    ]
    tokens = torch.randint(0, 100, (16, 8))
    basis = degeneracy.interaction_basis(bridge, tokens, nodes, progress=False)
    print("basis dims", {name: basis[name].dim for name in basis}, basis.info["jacobians"])
    graph = degeneracy.interaction_graph(bridge, tokens, basis, progress=False)
    print("edges", {f"{a}->{b}": tuple(e.shape) for (a, b), e in graph.edges.items()}, graph.info["modes"])
    print("completeness", {f"{a}->{b}": f"{c:.1e}" for (a, b), c in graph.completeness.items()})


if __name__ == "__main__":
    main()
