"""Degeneracy accounting (paper §2–4): behavioral loss, Hessian spectrum, sources, Section 4.

Planted networks with known structure; every count is checked exactly, and the Hessian against
``torch.func.hessian`` of the behavioral loss. float64 throughout, fixed seeds.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.accounting import (
    DegeneracyReport,
    HessianSpectrum,
    behavioral_loss_function,
    degeneracy_report,
    hessian_analysis,
    neuron_synchronization,
    sparsify,
    synchronized_blocks,
    synchronized_heads,
)

TOL = 1e-10


def torch_func_hessian(model: nn.Module, data: torch.Tensor, kind: str = "mse", position: int | None = None):
    """The Hessian of the behavioral loss by torch.func.hessian (an independent implementation)."""
    loss = behavioral_loss_function(model, data, kind, positions=position)
    params = {n: p.detach().to(torch.float64) for n, p in model.named_parameters()}
    h = torch.func.hessian(loss)(params)
    names = list(params)
    return torch.cat(
        [torch.cat([h[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names],
        0,
    )


def planted_mlp(seed: int = 1) -> tuple[nn.Sequential, torch.Tensor]:
    """5 → 8 (ReLU) → 6 → 3 (the last map is a purely linear layer after fc2).

    Inputs: x4 = x0 + 2·x1 (one linear dependency). Hidden neuron 0 is dead (bias −100), neuron 2 is
    neuron 1 scaled by 2 (a positively scaled duplicate).
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(5, 8),
            act1=nn.ReLU(),
            fc2=nn.Linear(8, 6),
            fc3=nn.Linear(6, 3),
        )
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        model.fc1.bias[0] = -100.0
        model.fc1.weight[0] *= 0.1
        model.fc1.weight[2] = 2 * model.fc1.weight[1]
        model.fc1.bias[2] = 2 * model.fc1.bias[1]
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    x[:, 4] = x[:, 0] + 2 * x[:, 1]
    return model, x


@pytest.fixture(scope="module")
def planted() -> tuple[nn.Sequential, torch.Tensor]:
    return planted_mlp()


@pytest.fixture(scope="module")
def planted_report(planted) -> DegeneracyReport:
    model, x = planted
    return degeneracy_report(model, x)


# --- sources -----------------------------------------------------------------------------------------


def test_planted_mlp_sources_are_found_and_counted_exactly(planted_report: DegeneracyReport) -> None:
    r = planted_report
    # linearly dependent inputs: one rank drop of [x; 1] → d_out = 8 free directions in fc1
    assert r.count("activation rank", "fc1") == 8
    # the dead neuron: its Jacobian vanishes → d_in + 1 = 6 (upper bound) in fc1; overlap 1·1
    row = r.row("jacobian rank", "fc1")
    assert row is not None and row.count == 6 and row.is_upper_bound
    assert r.count("overlap activation×jacobian", "fc1") == -1
    # dead neuron + duplicate: two drops of fc2's input → 2 × 6
    assert r.count("activation rank", "fc2") == 12
    # fc3 (6 → 3) after the purely linear layer: K of fc2's output has rank 3 → 3 drops × 9
    assert r.count("jacobian rank", "fc2") == 27
    assert r.count("overlap activation×jacobian", "fc2") == -6
    # synchronised neurons: the duplicate pair {1, 2} with s = 1 (dependent pre-activations), t = 2
    layer = next(d for d in r.neuron_layers if d["layer"] == "act1")
    assert layer["blocks"] == [[0], [1, 2], [3], [4], [5], [6], [7]]
    assert layer["dead"] == [0]
    i = layer["blocks"].index([1, 2])
    assert layer["block_ranks"][i] == 1 and layer["jacobian_ranks"][i] == 2
    assert r.count("synchronised neurons", "act1") == 2
    assert r.count("neuron rescaling", "act1") == 5  # the five live singletons
    # the paper's Σ s_a² over blocks that fire: 1 + 5 singletons
    assert layer["paper_count"] == 6
    # the purely linear layer fc2 → fc3: one block of 6 neurons, s = 6, t = 3, plus 3 translations
    linear = next(d for d in r.neuron_layers if d["layer"] == "fc2")
    assert linear["blocks"] == [list(range(6))]
    assert r.count("synchronised neurons", "fc2") == 18
    assert r.count("linear-block translation", "fc2") == 3
    # everything is accounted for: counted = span of the explicit directions = Hessian nullity
    assert r.total == 74
    assert r.union == 74
    assert r.hessian_method == "exact" and r.hessian_nullity == 74
    assert r.num_parameters == 123
    for row in r.rows:
        curvature = row.details.get("relative_curvature")
        if curvature is not None:
            assert curvature < 1e-12, (row.layer, row.source, curvature)


def test_hessian_nullity_of_planted_mlp_matches_torch_func(planted, planted_report) -> None:
    model, x = planted
    rank = int(torch.linalg.matrix_rank(torch_func_hessian(model, x), hermitian=True))
    assert planted_report.hessian_rank == rank
    assert planted_report.num_parameters - rank == planted_report.union


def test_synchronized_blocks_api(planted) -> None:
    model, x = planted
    assert degeneracy.synchronized_blocks(model, x, "act1") == [[0], [1, 2], [3], [4], [5], [6], [7]]
    # a purely linear layer named by its first linear map: one block
    assert synchronized_blocks(model, x, "fc2") == [list(range(6))]
    with pytest.raises(KeyError, match="valid names"):
        synchronized_blocks(model, x, "nope")
    with pytest.raises(ValueError, match="neuron layer"):
        synchronized_blocks(model, x, "fc3")


def test_leaky_relu_blocks_and_counts() -> None:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 5), act=nn.LeakyReLU(0.2), fc2=nn.Linear(5, 3))
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        model.fc1.weight[3] = 0.5 * model.fc1.weight[1]
        model.fc1.bias[3] = 0.5 * model.fc1.bias[1]
        model.fc1.bias[4] = -50.0  # never positive: linear with slope 0.2, not dead
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    sync = neuron_synchronization(model, x, "act", jacobians=True)
    assert sync.blocks == [[0], [1, 3], [2], [4]]
    assert sync.dead == []
    report = degeneracy_report(model, x)
    assert report.union == report.hessian_nullity == report.total
    assert report.count("linear-block translation", "act") == 1


def test_approximate_synchronisation_joins_nearly_synchronised_neurons() -> None:
    pre = torch.tensor(
        [[1.0, 1.0, -1.0], [2.0, 2.0, 1.0], [-1.0, 0.01, -2.0], [3.0, 2.5, 0.5]], dtype=torch.float64
    )
    from degeneracy.accounting.sources import neuron_sync, pattern_residuals

    exact = neuron_sync(pre, "relu")
    assert exact.blocks == [[0], [1], [2]]
    rho = pattern_residuals(pre, pre > 0)
    # neurons 0 and 1 disagree only on example 2, where pre-activations are (−1, 0.01)
    torch.testing.assert_close(rho[0, 1], torch.tensor((1.0 + 1e-4) / 4, dtype=torch.float64))
    approx = neuron_sync(pre, "relu", epsilon=0.3)
    assert approx.blocks == [[0, 1], [2]]


def planted_transformer():
    """One layer, 3 heads of width 2, MLP of 6 ReLUs; heads 0 and 1 have identical patterns."""
    tl = pytest.importorskip("transformer_lens")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    cfg = tl.HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        n_heads=3,
        d_head=2,
        d_mlp=6,
        act_fn="relu",
        normalization_type=None,
        n_ctx=3,
        d_vocab=5,
        d_vocab_out=5,
        seed=0,
        dtype=torch.float64,
    )
    model = tl.HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        attn = model.blocks[0].attn
        for name in ("W_Q", "W_K", "b_Q", "b_K"):
            getattr(attn, name)[1] = getattr(attn, name)[0]  # heads 0 and 1: identical patterns
    pairs = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij"), -1).reshape(-1, 2)
    x = torch.cat([pairs, torch.full((25, 1), 4)], 1)
    return model, x


def test_head_synchronisation_on_a_planted_transformer() -> None:
    model, x = planted_transformer()
    cfg = model.cfg
    assert synchronized_heads(model, x, "blocks.0.attn") == [[0, 1], [2]]
    report = degeneracy_report(model, x, positions=-1)
    assert report.count("synchronised heads", "blocks.0.attn") == 2 * cfg.d_head**2
    assert report.count("attention OV (W_V E, E⁻¹ W_O)", "blocks.0.attn") == cfg.n_heads * cfg.d_head**2
    rank = int(torch.linalg.matrix_rank(torch_func_hessian(model, x, position=-1), hermitian=True))
    assert report.hessian_rank == rank
    assert report.union is not None and report.union <= report.hessian_nullity
    for row in report.rows:
        curvature = row.details.get("relative_curvature")
        if curvature is not None:
            assert curvature < 1e-12, (row.layer, row.source, curvature)


# --- report ------------------------------------------------------------------------------------------


def test_report_prints_and_roundtrips_json(planted_report: DegeneracyReport, tmp_path) -> None:
    text = str(planted_report)
    assert "activation rank" in text and "Hessian nullity" in text and "nominal parameters" in text
    path = planted_report.save(tmp_path / "report.json")
    loaded = DegeneracyReport.load(path)
    assert loaded.total == planted_report.total
    assert loaded.rows[0].to_dict() == planted_report.rows[0].to_dict()
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_accepts_the_deprecated_position_keyword(planted) -> None:
    model, x = planted
    with pytest.warns(DeprecationWarning, match="positions"):
        old = degeneracy_report(model, x[:20], position=None, hessian=None)
    assert old.total == degeneracy_report(model, x[:20], positions=None, hessian=None).total


def test_report_counts_grow_with_epsilon(planted) -> None:
    model, x = planted
    small = degeneracy_report(model, x, epsilon=0.0, hessian=None)
    large = degeneracy_report(model, x, epsilon=1e3, hessian=None)
    assert large.count("activation rank") >= small.count("activation rank")


def test_report_without_jacobians_keeps_the_activation_rows(planted, planted_report) -> None:
    """``jacobians=False`` (also the degeneracy command's ``jacobians: false``) leaves out the Jacobian
    statistics and their rows, not the activation-rank rows, which are the same as with them."""
    model, x = planted
    report = degeneracy_report(model, x, jacobians=False, hessian=None)
    assert report.row("jacobian rank", "fc1") is None
    for layer in ("fc1", "fc2"):
        assert report.count("activation rank", layer) == planted_report.count("activation rank", layer)


# --- Section 4 ---------------------------------------------------------------------------------------


def test_section4_construction_keeps_outputs_and_creates_zeros(planted) -> None:
    model, x = planted
    result = sparsify(model, x)
    assert result.verified and result.max_output_difference <= TOL
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=TOL)
    # free directions exploited: 1 input dependency × 8, 2 hidden dependencies × 6, the linear block
    # 6² − 6 and the duplicate block s² − s = 0
    assert result.free_directions == 8 + 12 + 30
    assert result.zeros_gained >= result.free_directions
    assert result.claim_holds
    # the original is untouched
    assert not any(
        isinstance(m, degeneracy.accounting.construction.BlockGatedActivation) for m in model.modules()
    )


def test_section4_construction_with_synchronised_blocks() -> None:
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 6), act=nn.ReLU(), fc2=nn.Linear(6, 4))).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        # neurons 0, 1, 2 share one firing pattern: the same first pre-activation plus a large bias
        base = model.fc1.weight[0].clone()
        for i, scale in zip((0, 1, 2), (1.0, 2.0, 0.5), strict=True):
            model.fc1.weight[i] = scale * base
            model.fc1.weight[i, 5] += 0.3 * i  # independent directions, same sign pattern on x5 = 0
            model.fc1.bias[i] = 0.0
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x[:, 5] = 0.0  # x5 never varies: an activation rank drop, and neurons 0–2 stay synchronised
    blocks = synchronized_blocks(model, x, "act")
    assert [0, 1, 2] in blocks
    result = sparsify(model, x)
    assert result.verified
    assert result.zeros_gained >= result.free_directions > 0
    report = degeneracy_report(model, x)
    assert report.union == report.hessian_nullity


# --- command line and demo ---------------------------------------------------------------------------


def planted_factory() -> tuple[nn.Module, torch.Tensor]:
    """``(model, data)`` for ``ModelSpec(name="test_accounting:planted_factory")``."""
    return planted_mlp()


def test_config_rejects_unknown_fields_and_bad_values(tmp_path) -> None:
    from degeneracy.commands.config import DegeneracyRunConfig, load_yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("epsilon: 0.1\nepsilonn: 2\n")
    with pytest.raises(ValueError, match="epsilonn"):
        load_yaml(bad, DegeneracyRunConfig)
    with pytest.raises(ValueError):
        DegeneracyRunConfig(epsilon=-1.0)
    with pytest.raises(ValueError, match="relative"):
        DegeneracyRunConfig(epsilon=2.0, relative=True)


def test_degeneracy_command_writes_report_spectrum_and_figures(tmp_path, monkeypatch) -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from degeneracy.commands.degeneracy import degeneracy_command

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {name: 'test_accounting:planted_factory'}\nhessian: exact\nplot_epsilons: [1.0e-6]\n"
    )
    app = typer.Typer()
    app.command()(degeneracy_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["degeneracy-command", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Hessian nullity (exact)" in result.output
    out = tmp_path / "out"
    report = DegeneracyReport.load(out / "degeneracy_report.json")
    assert report.hessian_nullity == 74 and report.union == 74
    assert HessianSpectrum.load(out / "hessian_spectrum.json").rank() == 49
    assert (out / "figures" / "degeneracy_hessian_spectrum.png").stat().st_size > 0
    assert (out / "figures" / "degeneracy_sources.png").stat().st_size > 0
    assert '"verified": true' in (out / "sparsified.json").read_text()
    # a config error exits with code 2 and a message
    config.write_text("nonsense: 1\n")
    result = CliRunner().invoke(app, ["degeneracy-command", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2


def test_demo_section_on_a_planted_model(planted, tmp_path) -> None:
    from degeneracy.commands.degeneracy import degeneracy_demo_section

    model, x = planted
    summary = degeneracy_demo_section(model, x, tmp_path)
    assert summary["hessian_nullity"] == 74
    assert summary["section4"]["verified"]
    assert (tmp_path / "figures" / "degeneracy_hessian_spectrum.png").exists()
    assert (tmp_path / "degeneracy" / "degeneracy_report.json").exists()
    __import__("json").dumps(summary)  # JSON-able


# --- bundled models (slow) ---------------------------------------------------------------------------


def _bundled(name: str):
    models = pytest.importorskip("degeneracy.models")
    try:
        if name == "digits":
            model = models.load_digits_mlp(dtype=torch.float64)
            data, _ = models.digits_all_inputs(dtype=torch.float64)
        else:
            model = models.load_modadd()
            split = models.load_modadd_metadata()["data"]
            data = models.modadd_dataset(frac_train=split["frac_train"], seed=split["seed"])[0]
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"bundled {name} model unavailable: {err}")
    return model, data


@pytest.mark.slow
def test_digits_mlp_report_is_consistent_with_its_exact_hessian() -> None:
    model, x = _bundled("digits")
    report = degeneracy_report(model, x)
    assert report.hessian_method == "exact" and report.num_parameters == 3466
    # every counted direction is a distinct Hessian-null direction
    assert report.union == report.total
    assert report.union <= report.hessian_nullity
    for row in report.rows:
        curvature = row.details.get("relative_curvature")
        if curvature is not None:
            assert curvature < 1e-12, (row.layer, row.source, curvature)
    result = sparsify(model, x)
    assert result.verified and result.claim_holds


@pytest.mark.slow
def test_modadd_report_finds_the_structure_of_the_last_position() -> None:
    model, x = _bundled("modadd")
    report = degeneracy_report(
        model, x, positions=-1, hessian=None, jacobian_projections=8, batch_size=1024, dtype=torch.float64
    )
    # the query of the last position always reads the '=' token: W_Q acts on a 1-dim input (+ bias)
    site = next(s for s in report.sites if s["site"] == "blocks.0.attn.W_Q")
    assert site["activation_rank"] == 1 and site["relevant_positions"] == [2]
    assert report.count("attention OV (W_V E, E⁻¹ W_O)") > 0
    assert report.count("neuron rescaling") + report.count("synchronised neurons") > 0


def test_gated_activation_rank_of_a_neuron_that_fires_where_an_input_is_zero() -> None:
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 5), act=nn.ReLU(), fc2=nn.Linear(5, 2))).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        model.fc1.weight[2] = torch.tensor([1.5, 0.0, 0.0, 0.0], dtype=torch.float64)
        model.fc1.bias[2] = 0.0
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    x[x[:, 0] > 0, 3] = 0.0  # neuron 2 fires exactly when x0 > 0, where x3 is always 0
    report = degeneracy_report(model, x)
    row = report.row("gated activation rank", "fc1")
    assert row is not None and row.count == 1 and row.details["neurons"] == {2: 1}
    assert report.count("activation rank") == 0
    assert report.union == report.total == report.hessian_nullity


def test_run_degeneracy_on_a_transformer_uses_the_last_token_forward(tmp_path) -> None:
    from degeneracy.commands.config import DegeneracyRunConfig
    from degeneracy.commands.degeneracy import run_degeneracy

    model, x = planted_transformer()
    cfg = DegeneracyRunConfig(hessian="lanczos", hessian_k=5, rank_probes=2, rank_steps=10, sparsify=True)
    summary = run_degeneracy(cfg, model, x, tmp_path)
    exact = hessian_analysis(model, x, method="exact", position=-1)
    torch.testing.assert_close(
        torch.tensor(summary["hessian_top_eigenvalues"], dtype=torch.float64),
        exact.eigenvalues[:5],
        rtol=1e-6,
        atol=0,
    )
    assert "section4" not in summary  # the Section 4 construction is for chains of linear layers
    report = DegeneracyReport.load(tmp_path / "degeneracy_report.json")
    assert report.hessian_method == "lanczos" and report.hessian_stderr is not None


@pytest.mark.parametrize(("epsilon", "relative"), [(-1.0, False), (float("nan"), False), (1.5, True)])
def test_bad_epsilon_is_a_clear_error_before_any_pass(planted, epsilon, relative) -> None:
    model, x = planted
    with pytest.raises(ValueError, match="epsilon"):
        degeneracy.degeneracy_report(model, x, epsilon=epsilon, relative=relative, hessian=None)
    with pytest.raises(ValueError, match="epsilon"):
        degeneracy.synchronized_blocks(model, x, "act1", epsilon=epsilon, relative=relative)
