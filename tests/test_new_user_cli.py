"""A new user's pass over the command line with a model of their own: each test is a bug found that way
(a factory module beside the config, float32 data with the default float64 run, ``model.limit`` on
``(inputs, labels)``, labelled data given to every command), checked against the library called
directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import degeneracy
from degeneracy.commands import app
from degeneracy.commands.config import ModelSpec, resolve_model

runner = CliRunner()
SRC = Path(degeneracy.__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    )


def float32_factory():
    """A user's factory as people write it: float32 model and inputs (``torch.randn``'s default)."""
    model = _model()
    return model, torch.randn(24, 4, generator=torch.Generator().manual_seed(1))


def labelled_factory():
    """The same model and inputs with class labels: ``(model, (inputs, labels))``."""
    model, x = float32_factory()
    with torch.no_grad():
        y = model(x).argmax(-1)
    return model, (x, y)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _small_graph(tmp_path: Path, model: str, ablation: str = "", out: str = "run"):
    """The graph command on a factory's model (``model``: the fields inside ``model: {...}``): a PCA basis
    at two node layers, node ablations at two points, no edge ablations, no modules."""
    extra = f", {ablation}" if ablation else ""
    config = _config(
        tmp_path,
        f"model: {{{model}}}\nnode_layers: ['2', output]\nmethods: [pca]\n"
        f"ablation: {{edges: false, node_points: 2{extra}}}\nmodules: {{methods: []}}\n",
    )
    return runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / out)])


def test_factory_module_beside_the_config_is_found(tmp_path) -> None:
    # `degeneracy basis` (the console script) does not put the current directory on sys.path as
    # `python -m` does; `python -P` runs the module the same way
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)), "
        "torch.randn(10, 3, dtype=torch.float64)\n"
    )
    _config(tmp_path, "model: {name: 'mymodel:make'}\nnode_layers: ['0', output]\nmethods: [pca]\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-P", "-m", "degeneracy", "basis", "config.yaml", "--out", "run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pca"]["dims"] == {"0": 4, "output": 3}


def test_factory_error_says_where_modules_are_looked_up() -> None:
    try:
        resolve_model(ModelSpec(name="no_such_user_module:make"))
    except ValueError as err:
        assert "current directory" in str(err) and "No module named 'no_such_user_module'" in str(err)
    else:
        raise AssertionError("a missing factory module must be a ValueError")


def test_float32_data_follows_the_run_dtype(tmp_path) -> None:
    # the run's dtype (model.dtype, default float64) casts the model; the data must follow, not fail with
    # "pass dtype='float64'" (an option the config does not have) or a wrong-width message
    config = _config(
        tmp_path,
        f"""
        model: {{name: '{__name__}:float32_factory'}}
        node_layers: ['2', '4', output]
        methods: [lib]
        """,
    )
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    got = degeneracy.load_basis(tmp_path / "run" / "bases" / "lib.safetensors")
    model, x = float32_factory()
    want = degeneracy.interaction_basis(model.double(), x.double(), ["2", "4", "output"], progress=False)
    for name in want.names:
        torch.testing.assert_close(got[name].eigenvalues, want[name].eigenvalues, rtol=1e-10, atol=0)


def test_float32_data_degeneracy_command(tmp_path) -> None:
    config = _config(
        tmp_path,
        f"""
        model: {{name: '{__name__}:float32_factory'}}
        hessian: exact
        sparsify: false
        """,
    )
    result = runner.invoke(app, ["degeneracy", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "degeneracy_report.json").read_text())
    model, x = float32_factory()
    want = degeneracy.degeneracy_report(model.double(), x.double(), epsilon=0.0)
    assert report["num_parameters"] == want.num_parameters
    assert report["total"] == want.total and report["hessian_nullity"] == want.hessian_nullity


def test_limit_cuts_inputs_and_labels() -> None:
    _, (x, y) = resolve_model(ModelSpec(name=f"{__name__}:labelled_factory", limit=5))[:2]
    _, (x_all, y_all) = labelled_factory()
    assert x.shape == (5, 4) and y.shape == (5,)
    torch.testing.assert_close(x, x_all[:5].double(), rtol=0, atol=0)
    assert torch.equal(y, y_all[:5]) and y.dtype == torch.int64  # labels are not cast


def test_limit_on_labelled_data_in_graph_command(tmp_path) -> None:
    result = _small_graph(tmp_path, f"name: '{__name__}:labelled_factory', limit: 10")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "graph_summary.json").read_text())
    assert summary["n_examples"] == 10 and summary["ablation_examples"] == 10


def test_labelled_factory_in_basis_and_degeneracy_commands(tmp_path) -> None:
    # the graph and llc commands take a factory's (inputs, labels); basis and degeneracy read the pair as
    # two batches and refused it
    factory = f"model: {{name: '{__name__}:labelled_factory'}}\n"
    basis_cfg = _config(tmp_path, factory + "node_layers: ['2', output]\nmethods: [pca]\n")
    result = runner.invoke(app, ["basis", str(basis_cfg), "--out", str(tmp_path / "basis")])
    assert result.exit_code == 0, result.output
    got = degeneracy.load_basis(tmp_path / "basis" / "bases" / "pca.safetensors")
    model, x = float32_factory()
    want = degeneracy.interaction_basis(
        model.double(), x.double(), ["2", "output"], method="pca", progress=False
    )
    torch.testing.assert_close(got["2"].C, want["2"].C, rtol=1e-10, atol=1e-12)
    deg_cfg = _config(tmp_path, factory + "hessian: none\nsparsify: false\n")
    result = runner.invoke(app, ["degeneracy", str(deg_cfg), "--out", str(tmp_path / "deg")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "deg" / "degeneracy_report.json").read_text())["num_examples"] == 24


def test_llc_report_shows_the_warnings_of_the_run(tmp_path) -> None:
    # an untrained model's cross-entropy: θ* is no minimum, λ̂ < 0 and N_eff(ε) has no fixed point; the
    # command warned on stderr, the HTML page showed the numbers alone
    config = _config(
        tmp_path,
        f"""
        model: {{name: '{__name__}:labelled_factory', dtype: float32}}
        loss: cross_entropy
        sampler: {{nbeta: 20, num_chains: 2, num_draws: 30, num_burnin: 10}}
        epsilons: [1.0e-2]
        plots: false
        progress: false
        """,
    )
    run = tmp_path / "run"
    result = runner.invoke(app, ["llc", str(config), "--out", str(run)])
    assert result.exit_code == 0, result.output
    from degeneracy.llc import load_effective_parameter_count, load_llc

    warnings = load_llc(run / "llc.safetensors").warnings
    n_eff = load_effective_parameter_count(run / "n_eff.safetensors")
    assert warnings and float(n_eff.achieved_epsilons[0]) <= 0  # the case this test is about
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    from html import unescape

    page = unescape((run / "report.html").read_text())
    for warning in warnings:
        assert warning in page
    assert "N_eff at ε = 0.01 was found at ε = " in page and "not N_eff(ε)" in page


def test_loss_traces_keep_each_chain_colour_after_burn_in() -> None:
    from degeneracy.llc import sample_sgld
    from degeneracy.report import plot_loss_traces

    result = sample_sgld(
        lambda w, _: w.square().sum(), torch.zeros(2, dtype=torch.float64), nbeta=100.0, step_size=1e-3,
        num_chains=3, num_draws=10, num_burnin=5, warn=False,
    )
    fig = plot_loss_traces(result)
    lines = fig.axes[0].get_lines()  # per chain: burn-in, then draws; then the λ̂ line
    colours = [(lines[2 * c].get_color(), lines[2 * c + 1].get_color()) for c in range(3)]
    assert all(burn == draws for burn, draws in colours)
    assert len({burn for burn, _ in colours}) == 3  # and the chains differ
    import matplotlib.pyplot as plt

    plt.close(fig)


def numpy_factory():
    model, x = float32_factory()
    return model, x.numpy()


def loader_factory():
    """Batches of (inputs, labels) from a DataLoader, float32 as torch makes them."""
    model, (x, y) = labelled_factory()
    return model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_loader_in_another_dtype_names_the_config_field(tmp_path) -> None:
    config = _config(tmp_path, f"model: {{name: '{__name__}:loader_factory'}}\nnode_layers: ['2', output]\n")
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "model.dtype: float32" in result.output  # not "pass dtype='float64'", a library argument
    assert not (tmp_path / "run" / "bases").exists()


def test_loader_labels_are_used_by_the_ablations(tmp_path) -> None:
    # batches (inputs, labels): the library reads their labels; the command skipped the ablations
    result = _small_graph(tmp_path, f"name: '{__name__}:loader_factory', dtype: float32")
    assert result.exit_code == 0, result.output
    assert "ablations skipped" not in result.output
    curves = json.loads((tmp_path / "run" / "ablation" / "pca_nodes.json").read_text())
    model, (x, y) = labelled_factory()
    want = (model(x).argmax(-1) == y).double().mean().item()  # 1: the labels are the model's classes
    assert curves["2"]["base_accuracy"] == want == 1.0


def test_limits_refuse_batches(tmp_path) -> None:
    # edge_limit / ablation.limit cut examples of a tensor; a list of batches would be cut by batches
    # and a DataLoader was a TypeError traceback
    config = _config(
        tmp_path,
        f"""
        model: {{name: '{__name__}:loader_factory', dtype: float32}}
        node_layers: ['2', output]
        methods: [pca]
        edge_limit: 10
        """,
    )
    result = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "edge_limit cuts data given as a tensor" in result.output
    spec = ModelSpec(name=f"{__name__}:loader_factory", dtype="float32", limit=3)
    try:
        resolve_model(spec)
    except ValueError as err:
        assert "model.limit cuts data" in str(err)
    else:
        raise AssertionError("model.limit on a DataLoader must be a ValueError")


def other_width_factory():
    """Another model of the user's, with other layers: written into the same --out by mistake."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    return model, torch.randn(16, 3)


def test_report_of_a_folder_holding_two_models(tmp_path) -> None:
    # a basis run of another model into the --out of a first run: the report failed ("no node layer
    # ...") and, with the same layer names, would mix the two models' numbers without a word
    run = tmp_path / "run"
    first = _config(tmp_path, f"model: {{name: '{__name__}:float32_factory'}}\nnode_layers: ['2', output]\n")
    assert runner.invoke(app, ["basis", str(first), "--out", str(run)]).exit_code == 0
    second = tmp_path / "second.yaml"
    other = f"model: {{name: '{__name__}:other_width_factory'}}\n"
    second.write_text(other + "node_layers: ['1']\nmethods: [lib]\n")
    assert runner.invoke(app, ["basis", str(second), "--out", str(run)]).exit_code == 0
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    from degeneracy.fingerprint import model_fingerprint

    page = (run / "report.html").read_text()
    lib_model = model_fingerprint(other_width_factory()[0].double())[:8]
    pca_model = model_fingerprint(float32_factory()[0].double())[:8]
    assert "2 different models" in page
    assert f"model {lib_model}: basis.lib" in page and f"model {pca_model}: basis.pca" in page
    # and one run's folder has no such warning
    alone = tmp_path / "alone"
    assert runner.invoke(app, ["basis", str(first), "--out", str(alone)]).exit_code == 0
    assert runner.invoke(app, ["report", str(alone)]).exit_code == 0
    assert "different models" not in (alone / "report.html").read_text()


class _CtrlC(torch.nn.Module):
    """Stands for the user pressing Ctrl-C during a run: the second forward pass is interrupted."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = _model(), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.inner(x)


def interrupted_factory():
    return _CtrlC(), torch.randn(8, 4, dtype=torch.float64)


def test_ctrl_c_says_how_to_resume(tmp_path) -> None:
    # Ctrl-C ended a run with no word (exit 130 from the shell, or click's "Aborted!"); finished stages
    # are kept and a rerun resumes, which the user is now told
    config = _config(tmp_path, f"model: {{name: '{__name__}:interrupted_factory'}}\nnode_layers: [inner.2]\n")
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "rerun the same command to resume" in result.output


def test_report_says_what_accuracy_is_for_a_regression_model(tmp_path) -> None:
    # ablation: {metrics: mse} scores -MSE as "accuracy"; the page called it "model accuracy" unexplained
    run = tmp_path / "run"
    assert _small_graph(tmp_path, f"name: '{__name__}:float32_factory'", "metrics: mse").exit_code == 0
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    page = (run / "report.html").read_text()
    assert "Ablation metrics <code>mse</code>" in page and "minus the mean squared error" in page
    curves = json.loads((run / "ablation" / "pca_nodes.json").read_text())
    assert curves["2"]["base_accuracy"] == 0.0  # -MSE of the unablated model against itself
    classified = tmp_path / "classified"
    labelled = f"name: '{__name__}:labelled_factory'"
    assert _small_graph(tmp_path, labelled, "metrics: classification", out="classified").exit_code == 0
    assert runner.invoke(app, ["report", str(classified)]).exit_code == 0
    assert "Ablation metrics" not in (classified / "report.html").read_text()


def test_help_is_plain_text() -> None:
    for args in (["--help"], ["basis", "--help"], ["llc", "--help"]):
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0 and ":class:" not in result.output, result.output
    assert "(a BasisRunConfig;" in runner.invoke(app, ["basis", "--help"], env={"COLUMNS": "200"}).output


def test_out_that_is_a_file_is_refused_before_the_run(tmp_path) -> None:
    # a NotADirectoryError traceback once the first stage had been computed (and its result lost)
    config = _config(tmp_path, f"model: {{name: '{__name__}:interrupted_factory'}}\nnode_layers: [inner.2]\n")
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    for out in (taken, taken / "run"):
        result = runner.invoke(app, ["basis", str(config), "--out", str(out)])
        flat = " ".join(result.output.replace("│", " ").split())  # rich wraps the usage error in a box
        assert result.exit_code == 2 and "is a file, not a folder" in flat, result.output
    assert taken.read_text() == "my notes"
    result = runner.invoke(app, ["report", str(taken)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def regression_factory():
    """A regression model's data: (inputs, float targets)."""
    model, x = float32_factory()
    return model, (x, torch.randn(24, 3, generator=torch.Generator().manual_seed(3)))


def test_regression_targets_with_classification_metrics(tmp_path) -> None:
    # float labels with the default metrics: a torch traceback in the node ablations, after the bases
    # and edges had run; now an error before any stage, and metrics: mse scores them
    model = f"name: '{__name__}:regression_factory'"
    result = _small_graph(tmp_path, model)
    assert result.exit_code == 2 and "set ablation: {metrics: mse}" in result.output, result.output
    assert not (tmp_path / "run" / "stages").exists()
    result = _small_graph(tmp_path, model, "metrics: mse")
    assert result.exit_code == 0, result.output
    curves = json.loads((tmp_path / "run" / "ablation" / "pca_nodes.json").read_text())
    model, (x, y) = regression_factory()
    with torch.no_grad():
        want = -(model.double()(x.double()) - y.double()).square().mean().item()
    assert abs(curves["2"]["base_accuracy"] - want) <= 1e-12 * abs(want)


def test_modules_and_edge_methods_of_bases_not_built(tmp_path) -> None:
    # modules.methods / ablation.edge_methods naming a basis the run does not build were skipped silently
    base = f"model: {{name: '{__name__}:labelled_factory'}}\nnode_layers: ['2', output]\nmethods: [lib]\n"
    for extra, field in (("modules: {methods: [pca]}\n", "modules.methods"),
                         ("ablation: {edge_methods: [pca]}\n", "ablation.edge_methods")):
        config = _config(tmp_path, base + extra)
        result = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert f"{field} names ['pca'], a basis this run does not build" in result.output
    assert not (tmp_path / "run").exists()
    # the default modules.methods ([lib]) with other bases: said, not silent
    no_ablation = "ablation: {node_curves: false, edges: false}\n"
    config = _config(tmp_path, base.replace("[lib]", "[pca]") + no_ablation)
    result = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "[graph] no modules: modules.methods ['lib'] names no basis of this run" in result.output


def test_module_range_typo_is_refused_before_the_run(tmp_path) -> None:
    # modules.first_layer naming no node layer failed after every basis, edge and ablation stage
    config = _config(
        tmp_path,
        f"model: {{name: '{__name__}:labelled_factory'}}\nnode_layers: ['2', output]\nmethods: [pca]\n"
        "modules: {methods: [pca], first_layer: '3'}\n",
    )
    result = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "modules.first_layer '3' is not a node layer" in result.output
    assert not (tmp_path / "run" / "stages").exists()


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path) -> None:
    # model: {name: modadd, checkpoint: ...} given a state dict that is no TransformerLens model's: a
    # TypeError traceback from HookedTransformerConfig
    path = tmp_path / "mlp.pt"
    torch.save(_model().state_dict(), path)
    config = tmp_path / "run.yaml"  # (config.yaml beside a checkpoint is read as its TransformerLens config)
    config.write_text(f"model: {{name: modadd, checkpoint: '{path}', limit: 8}}\nmethods: [pca]\n")
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "no TransformerLens config from these weights" in result.output and "0.weight" in result.output


_CALLS = [0]


def unseeded_factory():
    """Data drawn anew on every call, as from an unseeded torch.randn."""
    _CALLS[0] += 1
    return _model(), torch.randn(12, 4, generator=torch.Generator().manual_seed(_CALLS[0]))


def test_rerun_on_other_data_says_why_it_recomputes(tmp_path) -> None:
    factory = f"model: {{name: '{__name__}:unseeded_factory'}}\n"
    config = _config(tmp_path, factory + "node_layers: ['2']\nmethods: [pca]\n")
    run = ["basis", str(config), "--out", str(tmp_path / "run")]
    assert runner.invoke(app, run).exit_code == 0
    again = runner.invoke(app, run)
    assert again.exit_code == 0, again.output
    assert "recomputing: its config changed (fingerprint.data): the model or data differ" in again.output


def nan_factory():
    model, x = float32_factory()
    x[5, 2] = float("nan")
    return model, x


def test_nan_in_the_data_is_refused_before_the_run(tmp_path) -> None:
    # the degeneracy command failed deep in linalg.eigh (LinAlgError traceback) on NaN inputs
    config = _config(tmp_path, f"model: {{name: '{__name__}:nan_factory'}}\nhessian: exact\n")
    result = runner.invoke(app, ["degeneracy", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "hold NaN or inf (first at index (5, 2))" in result.output


def test_sequential_layers_written_as_numbers(tmp_path) -> None:
    # YAML reads `node_layers: [2, output]` (an nn.Sequential's layers) as integers: a TypeError traceback
    result = runner.invoke(app, ["basis", str(_config(
        tmp_path, f"model: {{name: '{__name__}:float32_factory'}}\nnode_layers: [2, {{name: h, module: 4}}]\n"
        "methods: [pca]\n")), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    got = degeneracy.load_basis(tmp_path / "run" / "bases" / "pca.safetensors")
    model, x = float32_factory()
    want = degeneracy.interaction_basis(
        model.double(), x.double(), ["2", {"name": "h", "module": "4"}], method="pca", progress=False
    )
    assert got.names == ["2", "h"]
    for name in got.names:
        torch.testing.assert_close(got[name].C, want[name].C, rtol=1e-10, atol=1e-12)


def python_list_factory():
    model, x = float32_factory()
    return model, x.tolist()


def swapped_factory():
    model, x = float32_factory()
    return x, model


@pytest.mark.parametrize(
    ("factory", "messages"),
    [
        # numpy data: was a TypeError traceback
        ("numpy_factory", ["returned data of type ndarray", "torch.from_numpy"]),
        # a list of lists of floats (x.tolist()): was an AttributeError traceback
        ("python_list_factory", ["returned a list of list: return a tensor, a dict of tensors"]),
        # (data, model) the other way round: an error about the data, or an AttributeError traceback
        ("swapped_factory", ["must return (model, data) with model a torch.nn.Module, got a Tensor first"]),
    ],
)
def test_factory_data_of_the_wrong_kind_is_a_clear_error(tmp_path, factory: str, messages: list[str]) -> None:
    config = _config(tmp_path, f"model: {{name: '{__name__}:{factory}'}}\nnode_layers: ['2']\n")
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert all(message in result.output for message in messages), result.output


def broken_factory():
    return len(5), None  # a bug in the user's code: its traceback must stay


def test_library_type_errors_are_user_errors_other_type_errors_stay(tmp_path) -> None:
    # the library's own TypeErrors on bad input (a list as a node layer) were tracebacks
    config = _config(tmp_path, f"model: {{name: '{__name__}:float32_factory'}}\nnode_layers: [[2, 4]]\n")
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "error: a node layer is a module name, a dict or a NodeLayer, not list" in result.output
    config = _config(tmp_path, f"model: {{name: '{__name__}:broken_factory'}}\nnode_layers: ['2']\n")
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, TypeError)


def test_fourier_on_a_model_without_modular_addition_data(tmp_path) -> None:
    # fourier: true on another model's data was a torch traceback after every stage
    config = _config(
        tmp_path,
        f"model: {{name: '{__name__}:labelled_factory'}}\nnode_layers: ['2', output]\nmethods: [pca]\n"
        "modules: {methods: [pca]}\nfourier: true\n",
    )
    result = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "fourier: true labels features on modular-addition inputs" in result.output
    assert not (tmp_path / "run" / "stages").exists()


def test_split_of_a_factory_is_refused(tmp_path) -> None:
    # a factory returns the same data whatever the split: `ablation: {split: test}` ran the ablations on
    # the build data while saying "[graph] ablations on the test split"
    base = f"model: {{name: '{__name__}:labelled_factory'}}\nnode_layers: ['2', output]\nmethods: [pca]\n"
    config = _config(tmp_path, base + "ablation: {split: test}\n")
    result = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "ablation.split picks a split of the bundled data" in result.output
    config = _config(tmp_path, base.replace("labelled_factory'", "labelled_factory', split: test"))
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "model.split picks a split of the bundled data" in result.output
    assert not (tmp_path / "run").exists()


def test_a_model_without_name_changes_the_commands_default_model() -> None:
    # `model: {limit: 10}` in an llc config switched from the digits MLP (float32) to modadd (float64)
    from degeneracy.commands.config import BasisRunConfig, DegeneracyRunConfig, LLCRunConfig

    llc = LLCRunConfig(model={"limit": 10}).model
    assert (llc.name, llc.dtype, llc.limit) == ("digits_mlp", "float32", 10)
    report = DegeneracyRunConfig(model={"limit": 5}).model
    assert (report.name, report.split, report.limit) == ("digits_mlp", "all", 5)
    assert BasisRunConfig(model={"limit": 5}).model.name == "modadd"  # its default model
    named = LLCRunConfig(model={"name": "modadd"}).model  # a named model takes ModelSpec's defaults
    assert (named.name, named.dtype) == ("modadd", "float64")


def test_relative_paths_not_in_the_current_directory_are_read_beside_the_config(tmp_path, monkeypatch):
    # `degeneracy graph runs/graph.yaml` with `checkpoint: model.pt` beside it: "no such checkpoint"
    from degeneracy.commands.config import GraphRunConfig, load_yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("model.pt", "lib.safetensors", "pca.safetensors"):
        (tmp_path / "runs" / name).write_bytes(b"x")
    (tmp_path / "pca.safetensors").write_bytes(b"x")  # found from the current directory: kept
    path = tmp_path / "runs" / "graph.yaml"
    path.write_text(
        "model: {name: modadd, checkpoint: model.pt, checkpoint_config: {act_fn: relu}}\n"
        "basis_files: {lib: lib.safetensors, pca: pca.safetensors}\n"
    )
    cfg = load_yaml(path, GraphRunConfig)
    assert cfg.model.checkpoint == str(tmp_path / "runs" / "model.pt")
    assert cfg.model.checkpoint_config == {"act_fn": "relu"}
    assert cfg.basis_files == {"lib": str(tmp_path / "runs" / "lib.safetensors"), "pca": "pca.safetensors"}
    path.write_text("methods: [lib, pca, global]\nbasis_files: {global: missing.safetensors}\n")
    with pytest.raises(ValueError, match=r"basis_files.global: no such file 'missing.safetensors'"):
        load_yaml(path, GraphRunConfig)  # nowhere: named as written
