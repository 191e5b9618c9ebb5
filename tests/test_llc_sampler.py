"""The SGLD sampler: vectorised chains, determinism, engines, bad chains, diagnostics and results I/O."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from degeneracy.data import Batch
from degeneracy.llc import LLCResult, LLCWarning, estimate_llc, sample_sgld
from degeneracy.llc.diagnostics import chain_llc_variance, find_bad_chains, step_size_stability
from degeneracy.llc.sgld import ParamLayout, SGLDConfig, chain_generator, noise_block_steps, run_sgld_chains

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _inputs(n: int = 40, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SETTINGS = dict(nbeta=200.0, localization=10.0, step_size=1e-3, num_chains=3, num_draws=60, num_burnin=20)


@pytest.mark.parametrize("engine", ["batched", "vmap"])
def test_vectorised_chains_equal_sequential_loop(engine: str) -> None:
    model, x = _mlp(), _inputs()
    kw = dict(SETTINGS, batch_size=16, seed=3, engine=engine, warn=False)
    together = estimate_llc(model, x, vectorize=True, **kw)
    one_by_one = estimate_llc(model, x, vectorize=False, **kw)
    assert together.config["engine"] == engine
    torch.testing.assert_close(together.loss_traces, one_by_one.loss_traces, rtol=0, atol=1e-12)
    torch.testing.assert_close(together.burnin_traces, one_by_one.burnin_traces, rtol=0, atol=1e-12)
    assert together.mean == pytest.approx(one_by_one.mean, abs=1e-10)
    # a chain's draws depend on its own seed only: running a subset of chains reproduces them
    assert not torch.equal(together.loss_traces[0], together.loss_traces[1])


def test_functional_vectorised_equals_sequential() -> None:
    def loss(w: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return (batch * w).square().sum() + w.abs().pow(3).sum()

    data = [torch.randn(4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    kw = dict(nbeta=50.0, localization=1.0, step_size=1e-3, num_chains=4, num_draws=50, seed=7, warn=False)
    a = sample_sgld(loss, torch.zeros(4, dtype=torch.float64), data, vectorize=True, **kw)
    b = sample_sgld(loss, torch.zeros(4, dtype=torch.float64), data, vectorize=False, **kw)
    torch.testing.assert_close(a.loss_traces, b.loss_traces, rtol=0, atol=1e-12)


def test_batched_engine_matches_vmap_engine() -> None:
    model, x = _mlp(), _inputs()
    kw = dict(SETTINGS, batch_size=10, seed=0, warn=False)
    fast = estimate_llc(model, x, engine="batched", **kw)
    general = estimate_llc(model, x, engine="vmap", **kw)
    torch.testing.assert_close(fast.loss_traces, general.loss_traces, rtol=1e-9, atol=1e-12)


def test_auto_engine_falls_back_when_forward_is_not_batch_agnostic() -> None:
    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(x.shape[0], -1))  # merges every dimension after the first

    torch.manual_seed(0)
    model = Flattening().double()
    x = torch.randn(12, 2, 3, dtype=torch.float64)
    result = estimate_llc(model, x, **SETTINGS, warn=False)
    assert result.config["engine"] == "vmap"
    with pytest.raises(ValueError, match="batched"):
        estimate_llc(model, x, **SETTINGS, engine="batched", warn=False)


def test_seed_changes_noise_and_chain_generators_are_independent() -> None:
    model, x = _mlp(), _inputs()
    a = estimate_llc(model, x, **SETTINGS, seed=0, warn=False)
    b = estimate_llc(model, x, **SETTINGS, seed=1, warn=False)
    assert not torch.equal(a.loss_traces, b.loss_traces)
    draws = [torch.randn(3, generator=chain_generator(0, c)) for c in range(3)]
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(torch.randn(3, generator=chain_generator(0, 1)), draws[1])


def test_model_parameters_and_mode_are_untouched() -> None:
    model, x = _mlp(), _inputs()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_llc(model, x, **SETTINGS, warn=False)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_sgld_update_matches_hand_computation() -> None:
    # one step on L(w) = ½ a w² from w0 = θ* = 1: w1 = w0 − η/2 (nβ a w0 + γ (w0 − θ*)) + √η ξ
    a, nbeta, gamma, eta = 3.0, 10.0, 2.0, 1e-2
    center = torch.tensor([1.0], dtype=torch.float64)
    layout = ParamLayout(("w",), ((1,),))

    def chain_loss(views: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        return 0.5 * a * views["w"].square().sum(1)

    config = SGLDConfig(nbeta, gamma, eta, num_chains=2, num_draws=1, seed=5)
    run = run_sgld_chains(chain_loss, layout, center, iter([None] * 2), config)
    for c in range(2):
        block = noise_block_steps(1)
        xi = torch.randn((block, 1), generator=chain_generator(5, c), dtype=torch.float64)[0]
        expected = 1.0 - eta / 2 * (nbeta * a * 1.0) + math.sqrt(eta) * float(xi)
        assert float(run.final_params[c]) == pytest.approx(expected, abs=1e-14)
    assert run.loss_traces.shape == (2, 1)
    assert float(run.loss_traces[0, 0]) == pytest.approx(0.5 * a)


def test_thinning_and_burnin_shapes() -> None:
    model, x = _mlp(), _inputs()
    r = estimate_llc(model, x, **{**SETTINGS, "num_burnin": 7, "num_draws": 9}, thinning=3, warn=False)
    assert r.loss_traces.shape == (3, 9)
    assert r.burnin_traces.shape == (3, 7)
    assert r.chain_estimates.shape == (3,)
    assert r.init_loss == 0.0
    assert r.draws_per_second > 0
    assert r.config["thinning"] == 3 and r.config["num_draws"] == 9


def test_diverging_and_nan_chains_are_reported_and_excluded() -> None:
    traces = torch.tensor(
        [[0.1, 0.2, 0.1, 0.2], [0.1, float("nan"), 0.1, 0.1], [0.1, 5.0, 50.0, 500.0], [0.2, 0.1, 0.2, 0.1]],
        dtype=torch.float64,
    )
    bad = find_bad_chains(traces, None, init_loss=0.0, nbeta=10.0, num_parameters=4)
    assert set(bad) == {1, 2}
    assert "non-finite" in bad[1] and "diverged" in bad[2]


def test_exploding_step_size_excludes_chains_with_a_warning() -> None:
    def quartic(w: torch.Tensor, batch: object) -> torch.Tensor:
        return w.pow(4).sum()

    with pytest.warns(LLCWarning, match="excluded"):
        r = sample_sgld(
            quartic,
            torch.full((2,), 1.0, dtype=torch.float64),
            nbeta=100.0,
            step_size=0.05,
            num_chains=4,
            num_draws=20,
            seed=0,
        )
    assert len(r.excluded_chains) == 4
    assert math.isnan(r.mean)
    assert not r.good_chains.any()


def test_mixture_of_good_and_bad_chains_averages_only_good_ones() -> None:
    # a loss whose chains blow up only when they start far out: chain-dependent fate via the noise
    def loss(w: torch.Tensor, batch: object) -> torch.Tensor:
        return 0.5 * w.square().sum()

    r = sample_sgld(
        loss, torch.zeros(3, dtype=torch.float64), nbeta=10.0, step_size=1e-2, num_chains=3, num_draws=200
    )
    # tamper: make chain 1 non-finite and recompute the summary through the public loader path
    traces = r.loss_traces.clone()
    traces[1, 5] = float("inf")
    bad = find_bad_chains(traces, None, 0.0, 10.0, 3)
    assert list(bad) == [1]
    good_mean = float((10.0 * traces[[0, 2]].mean(1)).mean())
    assert good_mean == pytest.approx(float(r.chain_estimates[[0, 2]].mean()))


def test_variance_estimator_and_step_size_warning() -> None:
    traces = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(chain_llc_variance(traces, 2.0), torch.tensor([4.0, 0.0], dtype=torch.float64))
    assert step_size_stability(1e-3, 10.0, 1.0, 1.0) is None
    assert "large" in step_size_stability(0.1, 10.0, 0.0, 1.0)
    assert "unstable" in step_size_stability(1.0, 10.0, 0.0, 1.0)

    def quad(w: torch.Tensor, batch: object) -> torch.Tensor:
        return 0.5 * 4.0 * w.square().sum()

    with pytest.warns(LLCWarning, match="step size"):
        sample_sgld(quad, torch.zeros(2, dtype=torch.float64), nbeta=10.0, step_size=0.02, num_draws=20)


def test_non_stationary_chains_warn() -> None:
    def quad(w: torch.Tensor, batch: object) -> torch.Tensor:
        return 0.5 * w.square().sum()

    # a tiny step size and no burn-in: the excess loss is still climbing from 0
    with pytest.warns(LLCWarning, match="not stationary"):
        sample_sgld(quad, torch.zeros(20, dtype=torch.float64), nbeta=10.0, step_size=1e-4, num_draws=300)


def test_negative_estimate_warns_when_not_at_a_minimum() -> None:
    def slope(w: torch.Tensor, batch: object) -> torch.Tensor:
        return w.sum() + 0.5 * w.square().sum()

    with pytest.warns(LLCWarning, match="not a\\s+local minimum"):
        r = sample_sgld(slope, torch.zeros(2, dtype=torch.float64), nbeta=10.0, step_size=1e-2, num_draws=200)
    assert r.mean < 0


def test_save_load_roundtrip(tmp_path) -> None:
    model, x = _mlp(), _inputs()
    r = estimate_llc(model, x, **SETTINGS, warn=False)
    path = r.save(tmp_path / "llc.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))
    back = LLCResult.load(path)
    assert back.mean == r.mean and back.std == r.std and back.nbeta == r.nbeta
    torch.testing.assert_close(back.loss_traces, r.loss_traces)
    torch.testing.assert_close(back.chain_estimates, r.chain_estimates)
    assert back.config == r.config
    assert back.excluded_chains == r.excluded_chains
    assert back.warnings == r.warnings
    # no pickle: the file is plain safetensors with a JSON header
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) >= {"loss_traces", "chain_estimates"}


def test_custom_loss_callable_and_minibatches() -> None:
    model, x = _mlp(), _inputs(60)
    y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(2))

    def cross_entropy(m: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch.inputs), batch.extras[0])

    data = [(x[:30], y[:30]), (x[30:], y[30:])]
    r = estimate_llc(
        model, data, loss=cross_entropy, **{**SETTINGS, "localization": 100.0}, batch_size=20, warn=False
    )
    full = float(nn.functional.cross_entropy(model(x), y))
    assert r.init_loss == pytest.approx(full, rel=1e-12)
    # the batched engine applies to labelled losses too (issue 13; it was "vmap" before)
    assert r.config["engine"] == "batched" and r.config["loss"] == "cross_entropy"
    assert math.isfinite(r.mean)
    # vectorised and sequential agree for custom losses too
    s = estimate_llc(
        model,
        data,
        loss=cross_entropy,
        **{**SETTINGS, "localization": 100.0},
        batch_size=20,
        vectorize=False,
        warn=False,
    )
    torch.testing.assert_close(r.loss_traces, s.loss_traces, rtol=0, atol=1e-12)


def test_kl_behavioral_loss_and_dict_inputs() -> None:
    class KeywordModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 4)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features)

    torch.manual_seed(0)
    model = KeywordModel().double()
    data = {"features": _inputs(30)}
    r = estimate_llc(model, data, loss="kl", **SETTINGS, warn=False)
    assert r.config["loss"] == "behavioral-kl" and r.config["engine"] == "vmap"
    assert r.mean > 0


def test_invalid_arguments(unchecked) -> None:
    model, x = _mlp(), _inputs()
    with unchecked(), pytest.raises(ValueError, match="loss"):
        estimate_llc(model, x, loss="hinge", **SETTINGS)
    with pytest.raises(ValueError, match="nbeta"):
        estimate_llc(model, x, **{**SETTINGS, "nbeta": -1.0})
    with pytest.raises(ValueError, match="unknown parameter"):
        estimate_llc(model, x, **SETTINGS, params=["nope"])
    with unchecked(), pytest.raises(ValueError, match="engine"):
        estimate_llc(model, x, **SETTINGS, engine="jit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step size"):
        sample_sgld(lambda w, b: w.sum() * 0, torch.zeros(2), nbeta=1.0)


def test_parameter_subset_is_sampled_alone() -> None:
    model, x = _mlp(), _inputs()
    r = estimate_llc(model, x, **SETTINGS, params=["2.weight", "2.bias"], warn=False)
    assert r.num_parameters == 7 * 3 + 3
    # the last layer alone is linear in its parameters: a rank-(3·8) quadratic; λ̂ ≤ 24/2
    assert 0 < r.mean < 12.5


def test_default_nbeta_and_warnings_can_be_silenced() -> None:
    model, x = _mlp(), _inputs(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = estimate_llc(model, x, num_chains=2, num_draws=10, num_burnin=0, warn=False)
    assert r.nbeta == pytest.approx(50 / math.log(50))


def test_t_critical_values() -> None:
    from degeneracy.llc.diagnostics import t_critical_99

    # two-sided 1 % quantiles of Student's t (published tables)
    for dof, value in [(1, 63.657), (3, 5.841), (10, 3.169), (15, 2.947), (30, 2.750), (1000, 2.581)]:
        assert t_critical_99(dof) == pytest.approx(value, rel=0.015)
    assert t_critical_99(0) == math.inf


# --------------------------------------------------------------------------------------------------
# Metropolis-adjusted Langevin (sampler="mala")

_CURVATURES = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)


def _quadratic(w: torch.Tensor, batch: object) -> torch.Tensor:
    return 0.5 * (_CURVATURES * w.square()).sum()


def test_mala_removes_the_step_size_bias_of_sgld_on_a_quadratic() -> None:
    # Gibbs posterior exp(−nβ L − γ/2 ‖w‖²) is N(0, diag 1/a_i), a_i = nβ h_i + γ, so
    # E[nβ L] = ½ Σ nβ h_i / a_i exactly; Euler SGLD's stationary variance is 1/(a_i (1 − η a_i / 4)).
    nbeta, gamma = 100.0, 1.0
    stiffness = nbeta * _CURVATURES + gamma
    eta = 1.5 / float(stiffness.max())  # η a_max = 1.5: SGLD inflates the stiffest variance by 1.6
    exact = float(0.5 * (nbeta * _CURVATURES / stiffness).sum())
    sgld_limit = float(0.5 * (nbeta * _CURVATURES / (stiffness * (1 - eta * stiffness / 4))).sum())
    assert sgld_limit - exact > 0.4  # the bias to detect
    kw = dict(
        nbeta=nbeta, localization=gamma, step_size=eta, num_chains=16, num_draws=2500, num_burnin=500, seed=11
    )
    w0 = torch.zeros(6, dtype=torch.float64)
    mala = sample_sgld(_quadratic, w0, sampler="mala", warn=False, **kw)
    sgld = sample_sgld(_quadratic, w0, warn=False, **kw)
    assert 0.5 < mala.config["acceptance"] < 0.99
    assert len(mala.config["chain_acceptance"]) == 16
    assert "sampler" not in sgld.config  # the default run's record is unchanged
    assert abs(mala.mean - exact) < 4 * mala.stderr, (mala.mean, mala.stderr, exact)
    assert mala.stderr < 0.08
    assert abs(sgld.mean - exact) > 6 * sgld.stderr, (sgld.mean, sgld.stderr, exact)
    assert abs(sgld.mean - sgld_limit) < 4 * sgld.stderr, (sgld.mean, sgld.stderr, sgld_limit)


def test_mala_vectorised_chains_equal_sequential_loop() -> None:
    def loss(w: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return (batch * w).square().sum() + w.abs().pow(3).sum()

    data = [torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    kw = dict(nbeta=50.0, localization=1.0, step_size=2e-2, num_chains=4, num_draws=80, num_burnin=10, seed=7)
    a = sample_sgld(
        loss, torch.zeros(4, dtype=torch.float64), data, vectorize=True, sampler="mala", warn=False, **kw
    )
    b = sample_sgld(
        loss, torch.zeros(4, dtype=torch.float64), data, vectorize=False, sampler="mala", warn=False, **kw
    )
    torch.testing.assert_close(a.loss_traces, b.loss_traces, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.burnin_traces, b.burnin_traces, rtol=0, atol=1e-12)
    assert a.config["chain_acceptance"] == b.config["chain_acceptance"]
    # some proposals were rejected (the test exercises the accept/reject branch) and chains differ
    assert 0.0 < a.config["acceptance"] < 1.0
    assert not torch.equal(a.loss_traces[0], a.loss_traces[1])


def test_mala_with_sgld_step_equal_when_every_proposal_is_accepted() -> None:
    # at a tiny step almost every proposal is accepted, and an accepted MALA step is the SGLD step with
    # the same noise: the traces agree while no rejection has happened
    kw = dict(nbeta=10.0, localization=1.0, step_size=1e-6, num_chains=2, num_draws=30, seed=5, warn=False)
    w0 = torch.zeros(6, dtype=torch.float64)
    mala = sample_sgld(_quadratic, w0, sampler="mala", **kw)
    sgld = sample_sgld(_quadratic, w0, **kw)
    assert mala.config["acceptance"] == 1.0
    torch.testing.assert_close(mala.loss_traces, sgld.loss_traces, rtol=1e-10, atol=1e-15)


def test_mala_rejects_minibatches(unchecked) -> None:
    def loss(w: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return (batch * w).square().sum()

    data = [torch.randn(3, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    w0 = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mala.*distinct batches"):
        sample_sgld(loss, w0, data, nbeta=10.0, step_size=1e-3, sampler="mala")
    with unchecked(), pytest.raises(ValueError, match="unknown sampler"):
        sample_sgld(loss, w0, data[:1], nbeta=10.0, step_size=1e-3, sampler="hmc")  # type: ignore[arg-type]
    model, x = _mlp(), _inputs()
    with pytest.raises(ValueError, match="mala.*distinct batches"):
        estimate_llc(model, x, **SETTINGS, batch_size=16, sampler="mala")
    full = estimate_llc(model, x, **SETTINGS, sampler="mala", warn=False)  # full batch is allowed
    assert full.config["sampler"] == "mala" and 0.0 < full.config["acceptance"] <= 1.0


def test_dtype_rule_of_the_run_layer() -> None:
    """Floating inputs in another dtype than the model's are an error naming dtype=; with dtype= a
    cast copy of the model is sampled (the caller's model untouched) and the inputs are cast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x32 = torch.randn(20, 3)
    with pytest.raises(ValueError, match="dtype="):
        estimate_llc(model, x32, **SETTINGS, warn=False)
    cast = estimate_llc(model, x32, **SETTINGS, dtype="float64", warn=False)
    same = estimate_llc(model, x32.double(), **SETTINGS, warn=False)
    torch.testing.assert_close(cast.loss_traces, same.loss_traces, rtol=0, atol=0)
    assert next(model.parameters()).dtype == torch.float64
    half = estimate_llc(model, x32, **SETTINGS, dtype=torch.float32, warn=False)
    assert half.config["dtype"] == "float32" and next(model.parameters()).dtype == torch.float64


def test_files_saved_with_num_params_load_and_the_former_name_warns(tmp_path) -> None:
    from degeneracy.io import load_tensors, save_tensors
    from degeneracy.llc import EffectiveParameterCount, load_effective_parameter_count, load_llc

    traces = torch.zeros(2, 3, dtype=torch.float64)
    estimates = torch.full((2,), 0.5, dtype=torch.float64)
    r = LLCResult(0.5, 0.0, estimates, estimates.clone(), traces, traces[:, :0], 0.0, 10.0, 7)
    ones = [torch.ones(1, dtype=torch.float64) for _ in range(5)]
    count = EffectiveParameterCount(*ones, method="sgld", num_parameters=3)
    cases = ((r, load_llc, LLCResult.KIND), (count, load_effective_parameter_count, count.KIND))
    for result, load, kind in cases:
        path = result.save(tmp_path / "new.safetensors")
        tensors, meta = load_tensors(path, kind=kind)
        assert "num_parameters" in meta and "num_params" not in meta
        meta["num_params"] = meta.pop("num_parameters")  # a file written before the rename
        save_tensors(tmp_path / "old.safetensors", tensors, meta)
        back = load(tmp_path / "old.safetensors")
        assert back.num_parameters == result.num_parameters
        with pytest.warns(DeprecationWarning, match="num_parameters"):
            assert back.num_params == result.num_parameters
    with pytest.warns(DeprecationWarning, match="num_parameters"):
        old = LLCResult(0.5, 0.0, estimates, estimates, traces, traces[:, :0], 0.0, 10.0, num_params=7)
    assert old.num_parameters == 7
    with pytest.warns(DeprecationWarning, match="num_parameters"):
        assert find_bad_chains(traces, None, init_loss=0.0, nbeta=10.0, num_params=4) == {}
