"""Edges needed (δ = 0.1 % accuracy), sparsity, modules and Fourier alignment on modular addition.

Reproduces the companion paper's edge-ablation table (LIB vs PCA, seed 0: 133/82/633 vs 167/114/682
edges) on

* ``--model reference``: the paper's own seed-0 checkpoint and its 3,830 training inputs;
* ``--model bundled``: the bundled model (``degeneracy.models.load_modadd``) and its training inputs.

Settings follow the paper's configs: float64, centred bases, absolute truncation 1e-15, the logits
left unrotated (so both bases share the logit-neuron basis at the output), the plain-gradient rule,
bisection on the training inputs with the constant-direction edges kept for free. The neuron basis
is run as a third column. Results go to ``benchmarks/modadd_<model>.{json,md}`` and figures to
``benchmarks/modadd_<model>_*.png``; bases and graphs are cached under ``runs/bench_cache``.

    python benchmarks/modadd_ablation.py --model reference [--checkpoint PATH]
    python benchmarks/modadd_ablation.py --model bundled
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.edges_modadd import LAYERS, PAPER_BASIS  # noqa: E402

PAPER = {  # companion paper (arXiv 2405.10928), seed 0, edges needed for accuracy within 0.1 %
    "lib": [133, 82, 633],
    "pca": [167, 114, 682],
}
PAPER_DIMS = {"lib": [115, 110, 116], "pca": [115, 127, 129]}


def load(model_name: str, checkpoint: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    if model_name == "reference":
        from benchmarks._reference import load_reference

        model, train, labels, _, _ = load_reference(checkpoint)
        return model, train, labels
    from degeneracy.models import load_modadd, load_modadd_metadata, modadd_dataset

    split = load_modadd_metadata()["data"]  # the bundled model's own training split
    train, labels, _, _ = modadd_dataset(frac_train=split["frac_train"], seed=split["seed"])
    return load_modadd(dtype=torch.float64), train, labels


def bases_and_graphs(model, data, cache: Path, prefix: str, methods: list[str], log) -> tuple[dict, dict]:
    import degeneracy
    from degeneracy.basis import Basis, load_basis
    from degeneracy.edges import load_graph, transformer_lens_sections

    bases, graphs = {}, {}
    for method in ["lib", *[m for m in methods if m != "lib"]]:
        path = cache / f"{prefix}_{method}.safetensors"
        if path.exists():
            bases[method] = load_basis(path)
        else:
            t0 = time.perf_counter()
            b = degeneracy.interaction_basis(
                model, data, LAYERS, method=method, batch_size=4096, progress=False, **PAPER_BASIS
            )
            if method != "lib":  # the paper leaves the logits unrotated in every basis
                layers = dict(b.bases)
                layers["logits"] = bases["lib"]["logits"]
                b = Basis(b.layers, layers, b.config, b.info)
            b.info["build_seconds"] = time.perf_counter() - t0
            b.save(path)
            bases[method] = b
            log(f"{method} basis: {b.dims} in {b.info['build_seconds']:.1f} s")
        gpath = cache / f"{prefix}_{method}_graph.safetensors"
        if gpath.exists():
            graphs[method] = load_graph(gpath)
        else:
            t0 = time.perf_counter()
            sections = transformer_lens_sections(model, bases[method].layers)
            graphs[method] = degeneracy.interaction_graph(
                model, data, bases[method], batch_size=1024, sections=sections, progress=False
            )
            graphs[method].save(gpath)
            log(f"{method} edges in {time.perf_counter() - t0:.1f} s")
    return bases, graphs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["reference", "bundled"], default="reference")
    parser.add_argument(
        "--checkpoint",
        default=str(ROOT.parent / "shared/reference-models/modadd-seed0/model_epoch_60000.pt"),
    )
    parser.add_argument("--cache", default=str(ROOT / "runs/bench_cache"))
    parser.add_argument("--methods", default="lib,pca,neuron")
    parser.add_argument("--delta", type=float, default=0.001)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import degeneracy
    from degeneracy.ablation import edge_ablation, node_ablation_curves
    from degeneracy.edges import sparsity, transformer_lens_sections
    from degeneracy.fourier import fourier_labels, frequency_module_table, modadd_feature_grid
    from degeneracy.report.graph_plots import (
        plot_edge_ablation,
        plot_frequency_modules,
        plot_interaction_graph,
        plot_node_ablation,
    )
    from degeneracy.report.markdown import graph_report_markdown as report_markdown

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    model, data, labels = load(args.model, args.checkpoint)
    prefix = f"{args.model}_train"  # bases on the training inputs (edges_modadd.py caches others)
    bases, graphs = bases_and_graphs(model, data, cache, prefix, methods, log)
    results, timings = {}, {}
    for method in methods:
        path = cache / f"{prefix}_{method}_ablation.json"
        if path.exists():
            from degeneracy.ablation import EdgeAblationResult

            # from_dict reads caches written before the num_* names (n_edges, n_needed) too
            cached = [EdgeAblationResult.from_dict(r) for r in json.loads(path.read_text())]
            results[method] = {r.pair: r for r in cached}
            continue
        t0 = time.perf_counter()
        results[method] = edge_ablation(
            model,
            data,
            bases[method],
            graphs[method],
            labels=labels,
            delta=args.delta,
            batch_size=1024,
            sections=transformer_lens_sections(model, bases[method].layers),
        )
        timings[method] = time.perf_counter() - t0
        path.write_text(json.dumps([r.to_dict() for r in results[method].values()], indent=1))
        log(
            f"{method} edge ablation in {timings[method]:.1f} s: "
            f"{[r.num_needed for r in results[method].values()]}"
        )
    node_curves = {}
    for method in methods:
        path = cache / f"{prefix}_{method}_nodes.json"
        if path.exists():
            from degeneracy.ablation import NodeAblationCurve

            # from_dict reads caches written before the num_* names (n_features, n_kept) too
            saved = json.loads(path.read_text())
            node_curves[method] = {k: NodeAblationCurve.from_dict(v) for k, v in saved.items()}
            continue
        t0 = time.perf_counter()
        node_curves[method] = node_ablation_curves(
            model, data, bases[method], labels=labels, num_points=20, batch_size=4096
        )
        path.write_text(json.dumps({k: v.to_dict() for k, v in node_curves[method].items()}, indent=1))
        log(f"{method} node ablation curves in {time.perf_counter() - t0:.1f} s")
    labels_by_layer = {
        name: fourier_labels(modadd_feature_grid(model, bases["lib"], name)) for name in bases["lib"].names
    }
    # modules on the whole graph, and on the internal layers only: the logits are left in their neuron
    # basis (as in the paper), and each logit neuron reads every frequency
    names = graphs["lib"].names
    module_sets, tables = {}, {}
    for key, last in (("all layers", names[-1]), ("without logits", names[-2])):
        graph = graphs["lib"].subgraph(names[0], last)
        mods = degeneracy.find_modules(graph, epsilon={p: results["lib"][p] for p in graph.pairs}, seed=0)
        module_sets[key] = mods
        tables[key] = frequency_module_table(mods, {n: labels_by_layer[n] for n in graph.names})
    lib_modules = module_sets["without logits"]
    rows, alignment = tables["without logits"]
    figs = ROOT / "benchmarks"
    plot_interaction_graph(
        graphs["lib"].subgraph(names[0], names[-2]),
        lib_modules,
        figs / f"modadd_{args.model}_lib_graph_internal.png",
    )
    plot_edge_ablation(results, figs / f"modadd_{args.model}_edge_ablation.png")
    plot_node_ablation(node_curves, figs / f"modadd_{args.model}_node_ablation.png")
    plot_frequency_modules(
        rows,
        figs / f"modadd_{args.model}_frequency_modules.png",
        title=f"LIB modules (without logits) vs frequencies, AMI = {alignment['ami_active']:.2f}",
    )
    pairs = graphs["lib"].pairs
    summary = {
        "model": args.model,
        "examples": int(data.shape[0]),
        "delta": args.delta,
        "dims": {m: bases[m].dims for m in methods},
        "paper_dims": PAPER_DIMS,
        "edges_needed": {m: {f"{a}->{b}": results[m][(a, b)].num_needed for a, b in pairs} for m in methods},
        "edges_total": {m: {f"{a}->{b}": results[m][(a, b)].num_edges for a, b in pairs} for m in methods},
        "paper_edges_needed": PAPER,
        "base_accuracy": results["lib"][pairs[0]].base_accuracy,
        "thresholds": {m: {f"{a}->{b}": results[m][(a, b)].threshold for a, b in pairs} for m in methods},
        "sparsity": {m: {f"{a}->{b}": r for (a, b), r in sparsity(graphs[m]).items()} for m in methods},
        "completeness": {
            m: {f"{a}->{b}": c for (a, b), c in graphs[m].completeness.items()} for m in methods
        },
        "modules": {
            f"lib, {key}": {
                "num_modules": mods.num_modules,
                "modularity": mods.modularity,
                "inter_module_strength": mods.inter_module_strength,
                "sizes": [len(x) for x in mods.modules],
            }
            for key, mods in module_sets.items()
        },
        "frequency_alignment": {f"lib, {key}": tables[key][1] for key in module_sets},
        "features_needed": {
            m: {
                layer: next(
                    (
                        k
                        for k, acc in zip(c.num_kept, c.accuracy, strict=True)
                        if acc >= c.base_accuracy - args.delta
                    ),
                    None,
                )
                for layer, c in node_curves[m].items()
            }
            for m in methods
        },
        "frequency_rows": [dataclasses.asdict(r) for r in rows],
        "ablation_seconds": timings,
        "edge_seconds": {m: graphs[m].info["timings"]["total"] for m in methods},
    }
    out = ROOT / "benchmarks" / f"modadd_{args.model}.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# Modular addition ({args.model} model): edges needed, sparsity, modules", ""]
    md += [
        f"{summary['examples']} training inputs, float64, δ = {args.delta:g} (accuracy), base accuracy "
        f"{summary['base_accuracy']:.4f}. "
        f"Command: `python benchmarks/modadd_ablation.py --model {args.model}`.",
        "",
        "| layer pair | " + " | ".join(f"{m} (ours)" for m in methods) + " | LIB (paper) | PCA (paper) |",
        "|---|" + "---|" * (len(methods) + 2),
    ]
    for k, (a, b) in enumerate(pairs):
        cells = [f"{results[m][(a, b)].num_needed} of {results[m][(a, b)].num_edges}" for m in methods]
        md.append(f"| {a} → {b} | " + " | ".join(cells) + f" | {PAPER['lib'][k]} | {PAPER['pca'][k]} |")
    md += [
        "",
        "Retained dimensions (ours): "
        + "; ".join(f"{m} {list(bases[m].dims.values())}" for m in methods)
        + f"; paper LIB {PAPER_DIMS['lib']}, PCA {PAPER_DIMS['pca']} (+ logits).",
        "",
    ]
    md += [
        "Node ablation (keep the top-k features by eigenvalue, mean-ablate the rest): fewest features on the "
        "evaluated grid whose accuracy is within δ: "
        + "; ".join(f"{m} {summary['features_needed'][m]}" for m in methods)
        + ".",
        "",
    ]
    md.append(
        report_markdown(
            summary, {f"lib, {key}": (*tables[key], labels_by_layer) for key in module_sets}
        ).split("\n", 2)[2]
    )
    (ROOT / "benchmarks" / f"modadd_{args.model}.md").write_text("\n".join(md))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
