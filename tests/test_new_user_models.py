"""A new user's models, loaded as researchers load them: regressions for what broke or was silently wrong.

Oracles: a model left in train mode (dropout, batch norm) against the same model in eval mode (the
analyses measure the function, so the results must be identical and the model's modes untouched,
a frozen submodule included); a Hugging Face GPT-2 with its default SDPA attention against the same
model with eager attention (the same function, so the same chains).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.ablation import edge_ablation, node_ablation_curves
from degeneracy.data import eval_mode

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::degeneracy.llc.LLCWarning")  # chains this short drift


class DropoutNet(nn.Module):
    """A residual MLP with LayerNorm, dropout, batch norm and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 5)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 5)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(x)
        h = h + self.drop(self.act(self.fc(self.norm(h))))
        return {"logits": self.head(self.bn(h))}


def dropout_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = DropoutNet().double()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model.eval(), x


def training_twin(model: nn.Module) -> nn.Module:
    """The same parameters in train mode, with one submodule (the LayerNorm) left in eval mode."""
    twin = copy.deepcopy(model).train()
    twin.norm.eval()
    return twin


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_eval_mode_restores_every_submodule():
    model, _ = dropout_net()
    twin = training_twin(model)
    before = modes(twin)
    with eval_mode(twin, None):
        assert not any(modes(twin).values())
    assert modes(twin) == before and not before["norm"] and before["drop"]


def test_behavioral_loss_of_a_model_in_train_mode_is_that_of_its_function():
    model, x = dropout_net()
    twin = training_twin(model)
    before = modes(twin)
    assert degeneracy.behavioral_loss(twin, twin, x).item() == 0.0  # was 0.17 with dropout noise
    assert degeneracy.behavioral_loss(twin, model, x, kind="kl").item() == 0.0
    assert modes(twin) == before


def test_hessian_and_report_of_a_model_in_train_mode():
    model, x = dropout_net()
    twin = training_twin(model)
    before = modes(twin)
    want = degeneracy.hessian_spectrum(model, x, method="exact").eigenvalues
    got = degeneracy.hessian_spectrum(twin, x, method="exact").eigenvalues  # was a vmap randomness error
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert want[0] > 0.0
    got_report, want_report = degeneracy.degeneracy_report(twin, x), degeneracy.degeneracy_report(model, x)
    assert str(got_report) == str(want_report)  # the counts, the Hessian rank and nullity
    assert "Hessian nullity" in str(want_report)
    assert modes(twin) == before


def test_ablations_of_a_model_in_train_mode():
    model, x = dropout_net()
    labels = model(x)["logits"].argmax(-1)
    layers = [{"name": "h", "module": "emb", "read": "output"}, "bn", "output"]  # the residual stream
    B = degeneracy.interaction_basis(model, x, layers, progress=False)
    G = degeneracy.interaction_graph(model, x, B, progress=False)
    twin = training_twin(model)
    before = modes(twin)
    want = node_ablation_curves(model, x, B, labels=labels)
    got = node_ablation_curves(twin, x, B, labels=labels)  # was scored on dropout samples
    for name in want:
        assert got[name].accuracy == want[name].accuracy
        assert got[name].loss == pytest.approx(want[name].loss, rel=1e-12, abs=1e-12)
    assert want["bn"].accuracy[-1] == 1.0
    got_edges = edge_ablation(twin, x, B, G, labels=labels, delta=0.01)
    want_edges = edge_ablation(model, x, B, G, labels=labels, delta=0.01)
    assert {p: r.num_needed for p, r in got_edges.items()} == {p: r.num_needed for p, r in want_edges.items()}
    assert modes(twin) == before


def test_llc_restores_every_submodule_mode():
    model, x = dropout_net()
    twin = training_twin(model)
    before = modes(twin)
    options = dict(num_chains=1, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    got = degeneracy.estimate_llc(twin, x, **options)
    want = degeneracy.estimate_llc(model, x, **options)
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-12, atol=1e-12)
    assert modes(twin) == before  # the frozen LayerNorm was put in train mode by model.train(True)


def tiny_gpt2(attn: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
    if attn is not None:
        cfg._attn_implementation = attn
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def padded_tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logp = model(**batch).logits[:, :-1].log_softmax(-1)
    target, valid = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].to(logp.dtype)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return (nll * valid).sum() / valid.sum()


@pytest.mark.parametrize("loss", [None, next_token_loss])
def test_llc_of_a_hugging_face_gpt2_with_its_default_sdpa_attention(loss):
    sdpa, eager = tiny_gpt2(), tiny_gpt2("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    batch = padded_tokens()
    options = dict(num_chains=2, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    extra = {} if loss is None else {"loss": loss}
    got = degeneracy.estimate_llc(sdpa, batch, **options, **extra)  # was: SDPA has no double backward
    want = degeneracy.estimate_llc(eager, batch, **options, **extra)
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-9, atol=1e-9)
    assert sdpa.config._attn_implementation == "sdpa"


def sentences(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The sequences of a right-padded batch, one unpadded batch each."""
    lengths = batch["attention_mask"].sum(1).tolist()
    return [{k: v[i : i + 1, :length] for k, v in batch.items()} for i, length in enumerate(lengths)]


def junk_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with other token ids at its padded positions."""
    padded = batch["attention_mask"] == 0
    ids = torch.where(padded, torch.full_like(batch["input_ids"], 7), batch["input_ids"])
    return {**batch, "input_ids": ids}


def test_hessian_of_a_padded_batch_is_that_of_its_sequences():
    model, batch = tiny_gpt2(), padded_tokens()
    want = degeneracy.hessian_spectrum(model, sentences(batch), method="exact").eigenvalues  # lengths 3..5
    got = degeneracy.hessian_spectrum(model, batch, method="exact").eigenvalues  # was a vmap error (SDPA)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want[0]))
    assert want[0] > 1.0
    top = degeneracy.hessian_spectrum(model, batch, method="lanczos", k=3).eigenvalues  # was: no forward AD
    torch.testing.assert_close(top, want[:3], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_behavioral_loss_of_a_padded_batch_is_that_of_its_sequences(kind):
    model, batch = tiny_gpt2(), padded_tokens()
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=generator))
    want = degeneracy.behavioral_loss(perturbed, model, sentences(batch), kind=kind)
    got = degeneracy.behavioral_loss(perturbed, model, batch, kind=kind)
    assert float(want) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    junk = degeneracy.behavioral_loss(perturbed, model, junk_padding(batch), kind=kind)
    torch.testing.assert_close(junk, want, rtol=1e-12, atol=0.0)


def test_llc_of_a_padded_batch_ignores_the_padding():
    model, batch = tiny_gpt2(), padded_tokens()
    options = dict(num_chains=2, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    want = degeneracy.estimate_llc(model, batch, **options)
    got = degeneracy.estimate_llc(model, junk_padding(batch), **options)  # the padded positions' outputs
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-10, atol=1e-10)
    assert want.config["step_size"] == got.config["step_size"]


class TiedLM(nn.Module):
    """An embedding, a ReLU MLP and an output head tied to the embedding (as language models tie them)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(self.embed(ids))))


def test_degeneracy_report_skips_a_head_tied_to_the_embedding():
    torch.manual_seed(0)
    model = TiedLM().double().eval()
    ids = torch.randint(0, 6, (16, 3), generator=torch.Generator().manual_seed(0))
    report = degeneracy.degeneracy_report(model, ids)  # was: ValueError "tuple.index(x): x not in tuple"
    assert any("head" in note and "shared" in note for note in report.notes)
    spectrum = degeneracy.hessian_spectrum(model, ids, method="exact")
    assert report.num_parameters == spectrum.num_parameters == 6 * 4 + 4 * 4 + 4  # the tied weight once
    assert report.hessian_nullity == spectrum.num_parameters - spectrum.rank()
    assert "fc" in str(report)  # the untied site is still analysed


@pytest.mark.slow  # 6 s: the report's statistics and two exact Hessians
def test_degeneracy_report_of_a_padded_gpt2():
    model, batch = tiny_gpt2(), padded_tokens()
    report = degeneracy.degeneracy_report(model, batch)  # was: the tied lm_head crashed discovery
    want = degeneracy.hessian_spectrum(model, sentences(batch), method="exact")
    assert report.hessian_nullity == want.num_parameters - want.rank()


def test_a_position_that_is_padding_in_some_sequences_warns():
    model, batch = tiny_gpt2(), padded_tokens()  # right padding: position -1 is padding in 2 of 4
    last = [
        {"name": "final", "module": "transformer.ln_f", "positions": -1},
        {"name": "logits", "module": "output", "positions": -1},
    ]
    with pytest.warns(UserWarning, match="padding .* left out of its statistics"):
        B = degeneracy.interaction_basis(model, batch, last, method="pca", progress=False)
    kept = {k: torch.cat([v[1:2], v[3:4]]) for k, v in batch.items()}  # the two unpadded sequences
    assert bool(kept["attention_mask"].all())
    want = degeneracy.interaction_basis(model, kept, last, method="pca", progress=False)
    torch.testing.assert_close(B["final"].eigenvalues, want["final"].eigenvalues, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # position 0 is valid in every sequence: no warning
        first = [{**layer, "positions": 0} for layer in last]
        degeneracy.interaction_basis(model, batch, first, method="pca", progress=False)


class TorchEncoder(nn.Module):
    """Token embedding, PyTorch's own transformer encoder (fused fast path in eval mode, SDPA) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))


def torch_encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (6, 3), generator=torch.Generator().manual_seed(0))
    return TorchEncoder().double().eval(), ids


def test_torch_transformer_encoder_accounting():
    model, ids = torch_encoder()
    spectrum = degeneracy.hessian_spectrum(model, ids, method="exact")
    report = degeneracy.degeneracy_report(model, ids)  # was: no forward AD for the fused encoder layer
    assert report.hessian_nullity == spectrum.num_parameters - spectrum.rank()
    assert 0 < spectrum.rank() < spectrum.num_parameters
    assert torch.backends.mha.get_fastpath_enabled()


def test_torch_transformer_encoder_llc():
    model, ids = torch_encoder()
    options = dict(num_chains=2, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    want = degeneracy.estimate_llc(model, ids, **options)  # was: no double backward for the fused layer
    twin = copy.deepcopy(model).train()  # dropout 0.1 in train mode
    got = degeneracy.estimate_llc(twin, ids, **options)
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-12, atol=1e-12)
    assert twin.training and not model.training and torch.backends.mha.get_fastpath_enabled()


def test_ablation_with_a_label_per_position_is_a_clear_error():
    model, batch = tiny_gpt2(), padded_tokens()
    B = degeneracy.interaction_basis(model, batch, ["transformer.ln_f", "output"], progress=False)
    per_position = model(**batch).logits.argmax(-1)  # (4, 5): next-token labels
    with pytest.raises(ValueError, match=r"one label per example .* shape \(4, 5\) for 4 examples"):
        node_ablation_curves(model, batch, B, labels=per_position)
    last = per_position[torch.arange(4), batch["attention_mask"].sum(1) - 1]  # each sequence's last token
    curve = node_ablation_curves(model, batch, B, labels=last)["transformer.ln_f"]
    assert curve.base_accuracy == 1.0 and curve.accuracy[-1] == 1.0


def test_behavioral_loss_fn_of_a_model_in_train_mode():
    from degeneracy.llc import behavioral_loss_fn

    model, x = dropout_net()
    twin = training_twin(model)
    want_fn, center = behavioral_loss_fn(model, x)
    got_fn, got_center = behavioral_loss_fn(twin, x)  # the volume method's loss, evaluated later
    generator = torch.Generator().manual_seed(2)
    theta = center + 0.05 * torch.randn(center.shape, dtype=center.dtype, generator=generator)
    assert got_fn(got_center).item() == 0.0  # was a dropout sample against the eval-mode reference
    torch.testing.assert_close(got_fn(theta), want_fn(theta), rtol=1e-12, atol=0.0)
    assert float(want_fn(theta)) > 0.0 and twin.training


def test_sparsify_a_model_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2)).double().train()
    x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[:, 2] = x[:, 0] - x[:, 1]  # a dependency among the inputs: zeros to gain in the first layer
    result = degeneracy.sparsify(model, x)
    assert result.verified and result.zeros_gained >= 6  # was not verified: dropout noise in the check
    assert model.training and not result.model.training
    torch.testing.assert_close(result.model(x), model.eval()(x), rtol=1e-10, atol=1e-10)


class GRUNet(nn.Module):
    """Token embedding, a GRU (no vmap batching rule) and a head on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(self.embed(ids))
        return self.head(states[:, -1])


def test_llc_of_a_gru_runs_chain_by_chain():
    torch.manual_seed(0)
    model = GRUNet().double().eval()
    ids = torch.randint(0, 6, (8, 3), generator=torch.Generator().manual_seed(0))
    reference = model(ids).detach()

    def behavioral(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:  # the same loss, written by a user
        return (m(batch) - reference).square().sum(-1).mean()

    options = dict(num_chains=2, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    with pytest.warns(degeneracy.llc.LLCWarning, match="cannot be vectorised"):
        got = degeneracy.estimate_llc(model, ids, **options)  # was: no batching rule for aten::gru
    assert got.config["engine"] == "sequential"
    with pytest.warns(degeneracy.llc.LLCWarning, match="cannot be vectorised"):
        want = degeneracy.estimate_llc(model, ids, loss=behavioral, **options)  # the user-loss path
    assert want.config["engine"] == "sequential"
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-10, atol=1e-10)
    assert float(got.chain_estimates.abs().max()) > 0.0


def test_sequential_behavioral_engine_reproduces_vmap():
    model, x = dropout_net()
    options = dict(num_chains=2, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    want = degeneracy.estimate_llc(model, x, engine="vmap", **options)
    got = degeneracy.estimate_llc(model, x, engine="sequential", **options)  # was a ValueError
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-12, atol=1e-12)


def test_hessian_of_a_gru_against_autograd():
    torch.manual_seed(0)
    model = GRUNet().double().eval()
    ids = torch.randint(0, 6, (8, 3), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="one example after another"):
        got = degeneracy.hessian_spectrum(model, ids, method="exact").eigenvalues  # was a vmap error
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    center = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, torch.split(theta, [s.numel() for s in shapes]), strict=True))
        params = {n: t.reshape(s) for (n, t), s in zip(params.items(), shapes, strict=True)}
        return torch.func.functional_call(model, params, (ids,)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(outputs, center, vectorize=False)  # row by row, no vmap
    hessian = 2.0 / ids.shape[0] * jacobian.T @ jacobian  # L_B = 1/n Σ ‖f_θ − f_θ*‖²: Gauss–Newton at θ*
    want = torch.linalg.eigvalsh(hessian).flip(0)
    torch.testing.assert_close(got, want, rtol=0.0, atol=1e-10 * float(want[0]))
    assert want[0] > 1e-3


def test_degeneracy_report_of_batches_of_different_lengths_is_a_clear_error():
    torch.manual_seed(0)
    model = TiedLM().double().eval()
    ids = torch.randint(0, 6, (8, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="per position, but 'fc@input' has 3 positions in one batch and 2"):
        degeneracy.degeneracy_report(model, [ids[:4], ids[4:, :2]])  # was: "zip() argument 2 is shorter"


def test_basis_of_a_float32_gpt2_as_loaded():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
    model = transformers.GPT2LMHeadModel(cfg).eval()  # float32, as from_pretrained loads it
    assert next(model.parameters()).dtype == torch.float32
    batch, layers = padded_tokens(), ["transformer.h.0", "transformer.ln_f", "output"]
    got = degeneracy.interaction_basis(model, batch, layers, progress=False)  # was: mixed dtype in ln_1
    want = degeneracy.interaction_basis(model, batch, layers, dtype="float64", progress=False)
    for name in layers:
        scale = float(want[name].eigenvalues.abs().max())
        torch.testing.assert_close(got[name].eigenvalues, want[name].eigenvalues, rtol=0.0, atol=1e-5 * scale)


def test_behavioral_llc_uses_a_loaders_batches_one_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    loader = torch.utils.data.DataLoader(x, batch_size=4)
    frozen = copy.deepcopy(model)  # θ*, not re-parametrised by the sampler

    def behavioral(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:  # the same loss, written by a user
        return (m(batch) - frozen(batch).detach()).square().sum(-1).mean()

    options = dict(num_chains=2, num_draws=5, num_burnin=5, nbeta=10.0, localization=10.0, seed=0)
    want = degeneracy.estimate_llc(model, loader, loss=behavioral, engine="vmap", **options)
    got = degeneracy.estimate_llc(model, loader, engine="vmap", **options)  # was the pooled full batch
    assert got.config["num_batches"] == want.config["num_batches"] == 2
    torch.testing.assert_close(got.chain_estimates, want.chain_estimates, rtol=1e-10, atol=1e-10)
    full = degeneracy.estimate_llc(model, x, engine="vmap", **options)  # one batch of 8 every step
    assert not torch.allclose(full.chain_estimates, got.chain_estimates, rtol=1e-6, atol=0.0)


def test_cross_entropy_on_a_causal_lms_labels_warns_that_they_are_not_shifted():
    model, batch = tiny_gpt2(), padded_tokens()
    labels = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)  # Hugging Face's convention
    data = {**batch, "labels": labels}
    options = dict(num_chains=1, num_draws=2, num_burnin=2, nbeta=10.0, localization=10.0, seed=0)
    with pytest.warns(degeneracy.llc.LLCWarning, match="shifts its labels inside"):
        result = degeneracy.estimate_llc(model, data, loss="cross_entropy", **options)
    logits = model(**batch).logits  # the built-in loss at θ*: unshifted, as documented
    same_position = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert result.init_loss == pytest.approx(float(same_position), rel=1e-12)
    assert result.init_loss != pytest.approx(float(model(**data).loss), rel=1e-3)  # the model's own loss
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*shifts its labels")
        degeneracy.estimate_llc(model, data, loss=lambda m, b: m(**b).loss, **options)
