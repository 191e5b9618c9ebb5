"""The behavioral loss and its Hessian at θ* (paper eq 6, 10, 11; METHOD §6).

Planted networks with known structure; the Hessian is checked against ``torch.func.hessian`` of the
behavioral loss (an independent implementation). float64 throughout, fixed seeds. Moved here from
``test_accounting.py`` with the Hessian code's split; the planted models stay there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.accounting import (
    HessianSpectrum,
    behavioral_loss,
    hessian_analysis,
    hessian_rank,
    hessian_spectrum,
    load_hessian_spectrum,
    rank_at,
)
from degeneracy.accounting.hessian import BehavioralHessian
from degeneracy.io import ResultFileError
from tests.test_accounting import _bundled, planted_mlp, planted_transformer, torch_func_hessian


@pytest.fixture(scope="module")
def planted() -> tuple[nn.Sequential, torch.Tensor]:
    return planted_mlp()


# --- behavioral loss ---------------------------------------------------------------------------------


def test_behavioral_loss_zero_at_reference_and_matches_formula(planted) -> None:
    model, x = planted
    assert float(behavioral_loss(model, model, x).detach()) == 0.0
    assert float(behavioral_loss(model, dict(model.named_parameters()), x, kind="kl").detach()) == 0.0
    other = planted_mlp(seed=2)[0]
    with torch.no_grad():
        f, g = other(x), model(x)
    mse = (f - g).pow(2).sum(1).mean()
    p, q = torch.log_softmax(g, -1), torch.log_softmax(f, -1)
    kl = (p.exp() * (p - q)).sum(1).mean()
    torch.testing.assert_close(behavioral_loss(other, model, x).detach(), mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(behavioral_loss(other, model, x, kind="kl").detach(), kl, rtol=1e-12, atol=0)
    # the reference may be given as parameters and the data in batches
    as_params = behavioral_loss(other, model.state_dict(), x, batch_size=64)
    torch.testing.assert_close(as_params.detach(), mse, rtol=1e-12, atol=0)


def test_behavioral_loss_rejects_unknown_kind(planted, unchecked) -> None:
    model, x = planted
    with unchecked(), pytest.raises(ValueError, match="kind"):
        behavioral_loss(model, model, x, kind="l1")  # type: ignore[arg-type]


# --- Hessian -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_exact_hessian_equals_torch_func_hessian(planted, kind: str) -> None:
    model, x = planted
    spectrum = hessian_analysis(model, x, kind=kind, method="exact")
    reference = torch.linalg.eigvalsh(torch_func_hessian(model, x, kind)).flip(0)
    assert spectrum.eigenvalues.shape == (sum(p.numel() for p in model.parameters()),)
    assert bool((spectrum.eigenvalues[:-1] >= spectrum.eigenvalues[1:]).all())
    torch.testing.assert_close(
        spectrum.eigenvalues, reference.clamp_min(0), rtol=0, atol=1e-10 * reference[0]
    )
    floor = spectrum.floor
    assert spectrum.rank() == rank_at(reference, floor=floor)
    assert spectrum.rank() == int(
        torch.linalg.matrix_rank(torch_func_hessian(model, x, kind), hermitian=True)
    )
    torch.testing.assert_close(spectrum.trace, float(reference.sum()), rtol=1e-10, atol=0)


def test_hessian_spectrum_returns_all_eigenvalues_descending(planted) -> None:
    model, x = planted
    values = degeneracy.hessian_spectrum(model, x).eigenvalues
    assert isinstance(values, torch.Tensor) and values.dtype == torch.float64
    assert values.numel() == sum(p.numel() for p in model.parameters())
    assert bool((values[:-1] >= values[1:]).all())


def test_kronecker_gram_equals_generic_gram() -> None:
    model = nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.LeakyReLU(0.1), nn.Linear(4, 3, bias=False)
    )
    model = model.double()
    x = torch.randn(150, 6, dtype=torch.float64)
    for kind in ("mse", "kl"):
        h = BehavioralHessian(model, x, kind, dtype=torch.float64)  # type: ignore[arg-type]
        fast = h.linear_gram(batch_size=64)
        assert fast is not None
        generic = sum(block.T @ block for block in h.jacobian_blocks()) / h.n
        torch.testing.assert_close(
            torch.linalg.eigvalsh(fast), torch.linalg.eigvalsh(generic), rtol=0, atol=1e-12
        )


def test_exact_hessian_on_the_output_side_pads_zeros(planted) -> None:
    model, x = planted
    few = x[:4]  # 4 examples × 3 outputs = 12 rows < 123 parameters
    spectrum = hessian_analysis(model, few, method="exact")
    assert spectrum.gram_side == "outputs"
    assert len(spectrum) == spectrum.num_parameters
    reference = torch.linalg.eigvalsh(torch_func_hessian(model, few)).flip(0)
    torch.testing.assert_close(
        spectrum.eigenvalues, reference.clamp_min(0), rtol=0, atol=1e-10 * reference[0]
    )
    assert spectrum.rank() <= 12


def test_lanczos_trace_and_rank_estimates_agree_with_exact(planted) -> None:
    model, x = planted
    exact = hessian_analysis(model, x, method="exact")
    lanczos = hessian_analysis(
        model,
        x,
        method="lanczos",
        k=10,
        dtype=torch.float64,
        tol=1e-10,
        trace_probes=64,
        rank_probes=16,
        rank_steps=60,
    )
    torch.testing.assert_close(lanczos.eigenvalues, exact.eigenvalues[:10], rtol=1e-8, atol=1e-10)
    assert lanczos.residuals is not None and lanczos.matvecs is not None
    assert abs(lanczos.trace - exact.trace) <= 4 * lanczos.trace_stderr
    # stochastic rank at an ε inside a spectral gap of the exact spectrum
    eps = 1e-6 * float(exact.eigenvalues[0])
    est, err = lanczos.rank_estimate(eps)
    assert abs(est - exact.rank(eps)) <= max(4 * err, 3.0)
    with pytest.raises(ValueError, match="rank_estimate"):
        lanczos.rank()


def test_rank_conventions() -> None:
    values = torch.tensor([4.0, 1.0, 1e-3, 0.0], dtype=torch.float64)
    assert rank_at(values, 0.0) == 3
    assert rank_at(values, 1e-2) == 2
    assert rank_at(values, 0.1, relative=True) == 2  # threshold 0.4
    spectrum = HessianSpectrum(values, 4, "exact", "mse", 10, floor=0.0)
    assert spectrum.nullity(1e-2) == 2


def test_spectrum_save_load_roundtrip(planted, tmp_path) -> None:
    model, x = planted
    spectrum = hessian_analysis(model, x, method="exact")
    path = spectrum.save(tmp_path / "spectrum.json")
    loaded = HessianSpectrum.load(path)
    torch.testing.assert_close(loaded.eigenvalues, spectrum.eigenvalues)
    assert loaded.rank() == spectrum.rank()


def test_last_position_logits_equals_the_model_and_gives_the_same_hessian() -> None:
    from degeneracy.accounting import last_position_logits

    model, x = planted_transformer()
    with torch.no_grad():
        torch.testing.assert_close(last_position_logits(model, x), model(x)[:, -1], rtol=0, atol=1e-12)
    slow = hessian_analysis(model, x, method="exact", position=-1)
    fast = hessian_analysis(model, x, method="exact", forward=last_position_logits)
    torch.testing.assert_close(
        fast.eigenvalues, slow.eigenvalues, rtol=0, atol=1e-10 * float(slow.eigenvalues[0])
    )


@pytest.mark.slow
def test_modadd_block_lanczos_matches_single_vector_lanczos() -> None:
    from degeneracy.accounting.hessian import block_krylov_top

    model, x = _bundled("modadd")
    x = x[:600]
    h = BehavioralHessian(model, x, "mse", position=-1)
    top_block, res_block, _ = block_krylov_top(h.matmat, h.num_parameters, 10, block_size=8, tol=1e-7)
    top_single, _, _ = block_krylov_top(h.matmat, h.num_parameters, 10, block_size=1, tol=1e-7)
    torch.testing.assert_close(top_block, top_single, rtol=1e-4, atol=0)
    assert bool((res_block <= 1e-6 * top_block[0]).all())


# --- the API: one function, one result, old names and keywords ----------------------------------------


def test_hessian_analysis_is_a_deprecated_alias_with_the_same_numbers(planted) -> None:
    model, x = planted
    new = hessian_spectrum(model, x, method="exact")
    with pytest.warns(DeprecationWarning, match="hessian_spectrum"):
        old = hessian_analysis(model, x, method="exact")
    assert torch.equal(new.eigenvalues, old.eigenvalues) and new.floor == old.floor


def test_old_keywords_warn_and_give_the_same_spectrum(planted) -> None:
    model, x = planted
    new = hessian_spectrum(
        model,
        x,
        method="lanczos",
        k=4,
        dtype=torch.float64,
        num_rank_probes=3,
        num_rank_steps=20,
        num_trace_probes=4,
    )
    with pytest.warns(DeprecationWarning, match="num_rank_probes"):
        old = hessian_spectrum(
            model, x, method="lanczos", k=4, dtype=torch.float64, rank_probes=3, rank_steps=20, trace_probes=4
        )
    assert torch.equal(new.eigenvalues, old.eigenvalues)
    assert new.trace == old.trace and new.rank_estimate(1e-6) == old.rank_estimate(1e-6)
    tm, tx = planted_transformer()
    with pytest.warns(DeprecationWarning, match="positions"):
        by_old = hessian_spectrum(tm, tx, method="exact", position=-1)
    assert torch.equal(by_old.eigenvalues, hessian_spectrum(tm, tx, method="exact", positions=-1).eigenvalues)


def test_hessian_rank_is_the_spectrum_rank(planted) -> None:
    model, x = planted
    spectrum = hessian_spectrum(model, x, method="exact")
    eps = 1e-6 * float(spectrum.eigenvalues[0])
    assert hessian_rank(model, x, eps, method="exact") == spectrum.rank(eps)
    assert hessian_rank(model, x, 1e-6, relative=True, method="exact") == spectrum.rank(1e-6, relative=True)
    # a threshold inside the computed top of a Lanczos spectrum needs no stochastic estimate
    top = hessian_spectrum(model, x, method="lanczos", k=5, dtype=torch.float64, tol=1e-10)
    between = 0.5 * float(top.eigenvalues[2] + top.eigenvalues[3])
    assert hessian_rank(model, x, between, method="lanczos", k=5, dtype=torch.float64, tol=1e-10) == 3


def test_spectrum_file_kind_is_checked(planted, tmp_path) -> None:
    model, x = planted
    path = hessian_spectrum(model, x, method="exact").save(tmp_path / "spectrum.json")
    assert load_hessian_spectrum(path).num_parameters == sum(p.numel() for p in model.parameters())
    other = tmp_path / "other.json"
    other.write_text('{"result": "degeneracy_report", "rows": []}')
    with pytest.raises(ResultFileError, match="expected 'hessian_spectrum'"):
        HessianSpectrum.load(other)
    with pytest.raises(ResultFileError, match="no such file"):
        load_hessian_spectrum(tmp_path / "missing.json")


def test_floating_inputs_in_another_dtype_need_an_explicit_dtype(planted) -> None:
    model, x = planted
    with pytest.raises(ValueError, match="dtype"):
        BehavioralHessian(model, x.float())
    h = BehavioralHessian(model, x.float(), dtype=torch.float64)
    assert h.inputs[0].dtype == torch.float64


def test_kronecker_gram_leaves_no_hooks(planted) -> None:
    model, x = planted
    h = BehavioralHessian(model, x, "mse", dtype=torch.float64)
    assert h.linear_gram() is not None
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_old_import_paths_still_work() -> None:
    from degeneracy.accounting.behavioral import behavioral_loss as old_loss
    from degeneracy.accounting.fast_forward import last_position_logits
    from degeneracy.accounting.hessian import block_krylov_top, hutchinson_trace, lanczos_top, slq_nodes
    from degeneracy.adapters.transformer_lens.forward import last_position_logits as new_logits
    from degeneracy.linalg import block_krylov_top as krylov

    assert old_loss is degeneracy.behavioral.behavioral_loss and last_position_logits is new_logits
    assert block_krylov_top is krylov and callable(hutchinson_trace) and callable(lanczos_top)
    assert callable(slq_nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert degeneracy.accounting.rank_at(torch.tensor([1.0, 0.0])) == 1


def test_old_callers_of_hessian_spectrum_still_read_eigenvalues(planted) -> None:
    """``hessian_spectrum`` returned the eigenvalue tensor before it returned a ``HessianSpectrum``:
    indexing still works, and tensor methods warn and act on ``.eigenvalues``."""
    model, x = planted
    spectrum = degeneracy.hessian_spectrum(model, x, method="exact")
    assert torch.equal(spectrum[:3], spectrum.eigenvalues[:3])
    with pytest.warns(DeprecationWarning, match="eigenvalues"):
        total = spectrum.sum()
    assert torch.equal(total, spectrum.eigenvalues.sum())
