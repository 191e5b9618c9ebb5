"""Config files for the command line: which model, which data, which node layers, and the run config of
every command (basis, graph, degeneracy, llc).

Every run config embeds a :class:`ModelSpec`. Unknown fields are rejected (``extra="forbid"``), so a
typo in a YAML file is an error, not a silently ignored option; invalid values raise ``ValueError``
with the field named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from degeneracy.basis_result import METHODS
from degeneracy.commands.options import (
    basis_options,
    check_factory_split,
    check_graph_options,
    check_methods_built,
    check_options,
    check_sources,
)
from degeneracy.commands.placement import Device, place, run_device
from degeneracy.commands.user_data import NodeLayers, cast_data, check_data, check_model, factory, limit_data

__all__ = [
    "StrictModel",
    "ModelSpec",
    "load_yaml",
    "load_run",
    "resolve_model",
    "MODADD_NODE_LAYERS",
    "DIGITS_NODE_LAYERS",
    "BASIS_METHODS",
    "BasisRunConfig",
    "AblationOptions",
    "ModuleOptions",
    "GraphRunConfig",
    "DegeneracyRunConfig",
    "LLCSamplerConfig",
    "LLCRunConfig",
]

MODADD_NODE_LAYERS: list[Any] = [
    "blocks.0.hook_resid_pre",
    {"name": "resid_mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
    {"name": "resid_post", "module": "blocks.0.hook_resid_post", "positions": -1},
    {"name": "logits", "module": "output", "positions": -1},
]
DIGITS_NODE_LAYERS: list[Any] = ["fc1", "fc2", "out", "output"]
BASIS_METHODS = METHODS  # the basis methods interaction_basis knows
BASIS_TAKEN = ("model", "data", "node_layers", "method")
"""Arguments of ``interaction_basis`` that the commands set themselves (not config options)."""
GRAPH_TAKEN = ("model", "data", "basis", "sections", "progress")
"""Arguments of ``interaction_graph`` that the graph command sets itself."""


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields and is immutable.

    >>> class Point(StrictModel):
    ...     x: int = 0
    >>> Point(x=2).x
    2
    >>> try:
    ...     Point(y=2)  # a typo is an error, not an ignored field
    ... except ValueError as err:
    ...     print(err.errors()[0]["type"], err.errors()[0]["loc"])
    extra_forbidden ('y',)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _command_model_defaults(cls, data: Any) -> Any:
        """A ``model:`` without ``name`` changes this command's default model (``llc``: the digits MLP in
        float32), not :class:`ModelSpec`'s: ``model: {limit: 10}`` keeps the digits MLP."""
        field = cls.model_fields.get("model")
        given = data.get("model") if isinstance(data, dict) else None
        if field is None or not isinstance(given, dict) or "name" in given:
            return data
        if not isinstance(field.default, ModelSpec):
            return data
        return {**data, "model": {**field.default.model_dump(exclude_unset=True), **given}}


class ModelSpec(StrictModel):
    """Which model and data to analyse.

    ``name`` is a bundled model (``"modadd"``, ``"digits_mlp"``) or ``"package.module:function"``
    returning ``(model, data)``. ``split`` picks the bundled data: ``"train"`` (default), ``"test"``
    or ``"all"``. ``limit`` keeps the first examples only.

    ``checkpoint`` (with ``name: modadd``) replaces the bundled weights by a TransformerLens ``.pt``
    state dict, such as the companion paper's (:func:`degeneracy.models.load_transformer_lens_checkpoint`);
    ``checkpoint_config`` is its YAML config or a dict of ``HookedTransformerConfig`` fields (default:
    ``config.yaml`` beside the checkpoint). Its ``dataset:`` section (``frac_train``, ``seed``), when
    present, sets the train/test split of the data.

    >>> ModelSpec(name="digits_mlp", limit=100).model_dump()["limit"]
    100
    >>> try:
    ...     ModelSpec(split="validation")
    ... except ValueError as err:
    ...     print(err.errors()[0]["loc"], err.errors()[0]["type"])
    ('split',) literal_error
    """

    name: str = "modadd"
    split: Literal["train", "test", "all"] = "train"
    limit: int | None = Field(default=None, gt=0)
    dtype: Literal["float32", "float64"] = "float64"
    checkpoint: str | None = None
    checkpoint_config: str | dict[str, Any] | None = None


def _paths_beside(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config with its relative file paths (``model.checkpoint``, ``model.checkpoint_config``,
    ``basis_files``) that name no file from the current directory but one beside the config file
    pointing there: a config travels with the files it names."""

    def beside(value: Any) -> Any:
        if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
            return value
        return str(folder / value) if (folder / value).exists() else value

    out = dict(raw)
    spec = out.get("model")
    if isinstance(spec, dict):
        files = ("checkpoint", "checkpoint_config")
        out["model"] = {k: beside(v) if k in files else v for k, v in spec.items()}
    if isinstance(out.get("basis_files"), dict):
        out["basis_files"] = {k: beside(v) for k, v in out["basis_files"].items()}
    return out


def load_yaml(path: str | Path, model: type[BaseModel]) -> Any:
    """Read and validate a YAML config; errors name the file and the offending fields. A relative file
    path in it is read from the current directory, else from the config file's folder.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "llc.yaml"
    ...     _ = path.write_text("{loss: kl, sampler: {num_chains: 2}}")
    ...     cfg = load_yaml(path, LLCRunConfig)
    ...     _ = path.write_text("los: kl")  # a typo
    ...     try:
    ...         load_yaml(path, LLCRunConfig)
    ...     except ValueError as err:
    ...         message = str(err).replace(tmp, "TMP")
    >>> cfg.loss, cfg.sampler.num_chains
    ('kl', 2)
    >>> for line in message.splitlines()[:4]:
    ...     print(line)
    TMP/llc.yaml: invalid config
    1 validation error for LLCRunConfig
    los
      Extra inputs are not permitted [type=extra_forbidden, input_value='kl', input_type=str]
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if raw is None:
        raise ValueError(
            f"{path}: the config file is empty; write at least one field (the fields are listed by "
            "`degeneracy COMMAND --help`), e.g. `model: {name: modadd}`"
        )
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of fields, not a {type(raw).__name__}")
    try:
        return model.model_validate(_paths_beside(raw, path.parent))
    except ValidationError as err:
        raise ValueError(f"{path}: invalid config\n{err}") from err


def load_run(path: str | Path, config_type: type[BaseModel]) -> tuple[Any, Any, Any, list[Any] | None]:
    """``(config, model, data, default_node_layers)`` of a run: its YAML config read as ``config_type``
    (:func:`load_yaml`), then the config's ``model`` resolved (:func:`resolve_model`) and, for a config
    with a ``device`` field, placed on :func:`run_device`.

    >>> load_run("missing.yaml", LLCRunConfig)
    Traceback (most recent call last):
    ...
    ValueError: missing.yaml: no such config file
    """
    cfg = load_yaml(path, config_type)
    model, data, layers = resolve_model(cfg.model)
    if "device" in type(cfg).model_fields:
        model, data = place(model, data, run_device(cfg.device))
    return cfg, model, data, layers


def _modadd_checkpoint(spec: ModelSpec, dtype: Any, data_meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The modular-addition model from ``spec.checkpoint`` and the data split its config names."""
    from degeneracy.models import load_transformer_lens_checkpoint, modadd_config_dict

    config: Any = spec.checkpoint_config
    beside = Path(str(spec.checkpoint)).parent / "config.yaml"
    if config is None:
        config = beside if beside.exists() else {"act_fn": modadd_config_dict()["act_fn"]}
    meta = dict(data_meta)
    if isinstance(config, str | Path):
        raw = yaml.safe_load(Path(config).read_text()) if Path(config).exists() else None
        dataset = raw.get("dataset") if isinstance(raw, dict) else None
        if isinstance(dataset, dict):
            meta.update({k: dataset[k] for k in ("frac_train", "seed") if k in dataset})
    return load_transformer_lens_checkpoint(spec.checkpoint, config, dtype=dtype), meta


def resolve_model(spec: ModelSpec) -> tuple[Any, Any, list[Any] | None]:
    """Load ``(model, data, default_node_layers)`` for a :class:`ModelSpec` (model in eval mode, float64
    when asked). Data are inputs only (labels are attached by the bundled loaders' own helpers).

    >>> import sys, types, torch
    >>> toy = types.ModuleType("toy")  # stands in for a module of yours on the path
    >>> toy.make = lambda: (torch.nn.Linear(2, 1), torch.zeros(5, 2))
    >>> sys.modules["toy"] = toy
    >>> model, data, layers = resolve_model(ModelSpec(name="toy:make", limit=3))
    >>> del sys.modules["toy"]
    >>> next(model.parameters()).dtype, tuple(data.shape), layers, model.training
    (torch.float64, (3, 2), None, False)
    >>> resolve_model(ModelSpec(name="resnet"))
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'resnet': use 'modadd', 'digits_mlp' or 'package.module:function'
    """
    import torch

    dtype = getattr(torch, spec.dtype)
    if spec.name == "modadd":
        from degeneracy.models import load_modadd, load_modadd_metadata, modadd_all_inputs, modadd_dataset

        data_meta = load_modadd_metadata()["data"]
        if spec.checkpoint is not None:
            model, data_meta = _modadd_checkpoint(spec, dtype, data_meta)
        else:
            model = load_modadd(dtype=dtype)
        if spec.split == "all":
            data, _ = modadd_all_inputs()
        else:
            train, _, test, _ = modadd_dataset(frac_train=data_meta["frac_train"], seed=data_meta["seed"])
            data = train if spec.split == "train" else test
        layers: list[Any] | None = MODADD_NODE_LAYERS
    elif spec.checkpoint is not None:
        raise ValueError(
            f"checkpoint is for the modular-addition data (name: modadd), not {spec.name!r}; for another "
            "TransformerLens model write a factory calling degeneracy.models.load_transformer_lens_checkpoint"
        )
    elif spec.name == "digits_mlp":
        from degeneracy.models import digits_all_inputs, digits_dataset, load_digits_mlp

        model = load_digits_mlp(dtype=dtype)
        if spec.split == "all":
            data, _ = digits_all_inputs(dtype=dtype)
        else:
            xtr, _, xte, _ = digits_dataset(dtype=dtype)
            data = xtr if spec.split == "train" else xte
        layers = DIGITS_NODE_LAYERS
    elif ":" in spec.name:
        if spec.split != "train":  # the factory would return the same data: not the split asked for
            raise ValueError(f"model.split picks a split of the bundled data; the factory {spec.name!r} "
                             "returns its own data: drop split")
        func = factory(spec.name)
        made = func()
        if not (isinstance(made, tuple | list) and len(made) == 2):
            raise ValueError(
                f"model factory {spec.name!r} must return a pair (model, data), got {type(made).__name__}"
            )
        model, data = made
        model = check_model(model, spec.name).to(dtype)
        data = check_data(cast_data(data, dtype), dtype, spec.name)  # floats follow model.dtype
        layers = None
    else:
        raise ValueError(
            f"unknown model {spec.name!r}: use 'modadd', 'digits_mlp' or 'package.module:function'"
        )
    if spec.limit is not None:
        data = limit_data(data, spec.limit)
    return model.eval(), data, layers


# ---------------------------------------------------------------------------------------------------
# Run configs, one per command


def check_methods(methods: list[str]) -> list[str]:
    """The basis methods of a config, each one known (checked before any model is loaded).

    >>> check_methods(["lib", "pac"])
    Traceback (most recent call last):
    ...
    ValueError: unknown basis method 'pac'; choose from ('lib', 'global', 'pca', 'neuron')
    """
    for method in methods:
        if method not in BASIS_METHODS:
            raise ValueError(f"unknown basis method {method!r}; choose from {BASIS_METHODS}")
    return methods


class BasisRunConfig(StrictModel):
    """``degeneracy basis CONFIG.yaml``: a model, its node layers and the basis options.

    ``methods`` lists the bases to build; ``options`` are keyword arguments of
    :func:`degeneracy.interaction_basis` (``center``, ``gram_threshold``, ``integration_rule``, ...;
    ``num_sources: R`` with ``seed`` for stochastic ±1 sources in place of the exact Jacobian Grams,
    with eigenvalue standard errors: :mod:`degeneracy.probes`). ``device`` (``"cpu"``, ``"cuda:0"``):
    where the model and data go (default: :func:`run_device`).

    >>> cfg = BasisRunConfig.model_validate({"methods": ["lib"], "options": {"center": False}})
    >>> cfg.model.name, cfg.methods, cfg.options, cfg.node_layers
    ('modadd', ['lib'], {'center': False}, None)
    """

    model: ModelSpec = ModelSpec()
    node_layers: NodeLayers = None
    methods: list[str] = ["lib", "pca"]
    options: dict[str, Any] = {}
    device: Device = None

    @model_validator(mode="after")
    def _known(self) -> BasisRunConfig:
        """Methods and options are checked before any model is loaded or basis built."""
        import degeneracy

        check_methods(self.methods)
        check_options(self.options, degeneracy.interaction_basis, taken=BASIS_TAKEN)
        check_sources(self.options, "basis")
        object.__setattr__(self, "options", basis_options(self.options, self.methods))  # typed, checked
        return self


class AblationOptions(StrictModel):
    """Node ablation curves and edge-ablation bisection (see :mod:`degeneracy.ablation`).

    ``limit`` evaluates on the first examples only; ``edge_methods`` lists the bases whose edges are
    bisected (default: all ``methods``). ``metrics``: ``classification`` (default; needs labels),
    ``embedding`` (cosine similarity and MSE of the pooled embedding) or ``mse`` (regression outputs),
    the last two against the unablated model's output when the data has no labels
    (:data:`degeneracy.ablation.METRICS`). ``split`` evaluates on another split of the bundled data than
    the bases were built on (the companion paper builds on ``train`` and ablates on ``test``; default:
    the same data). ``delta`` is the tolerance (the accuracy drop allowed), ``scaling`` the bisection
    scale, ``dtype`` and ``batch_size`` those of the ablation passes (default: the basis's).

    >>> AblationOptions(delta=0.01, limit=256).node_points
    16
    >>> try:
    ...     AblationOptions(node_points=1)
    ... except ValueError as err:
    ...     print(err.errors()[0]["msg"])
    Input should be greater than or equal to 2
    """

    node_curves: bool = True
    node_points: int = Field(default=16, ge=2)
    edges: bool = True
    edge_methods: list[str] | None = None
    delta: float = Field(default=0.001, ge=0)
    limit: int | None = Field(default=None, gt=0)
    metrics: Literal["classification", "embedding", "mse"] = "classification"
    split: Literal["train", "test", "all"] | None = None
    scaling: Literal["logarithmic", "linear"] = "logarithmic"
    dtype: Literal["float32", "float64"] | None = None
    batch_size: int | None = Field(default=None, gt=0)


class ModuleOptions(StrictModel):
    """Leiden modules (see :func:`degeneracy.find_modules`).

    ``epsilon``: a number, ``"ablation"`` (the edge-ablation thresholds of the same basis; falls back to
    ``"fraction"`` when no ablation ran), ``"quantile"`` or ``"fraction"`` (``epsilon_fraction`` × each
    pair's largest edge; ``"relative"`` is its former name). ``first_layer`` /
    ``last_layer`` restrict the module graph to a range of node layers (e.g. without an unrotated
    output layer, whose neurons mix every feature).

    >>> ModuleOptions().epsilon, ModuleOptions(epsilon=0.01).epsilon
    ('ablation', 0.01)
    >>> ModuleOptions.model_validate({"relative": 1e-6}).epsilon_fraction  # the former name still reads
    1e-06
    """

    epsilon: float | Literal["ablation", "quantile", "fraction", "relative"] = "ablation"
    quantile: float = Field(default=0.5, ge=0, lt=1)
    epsilon_fraction: float = Field(
        default=1e-9, gt=0, validation_alias=AliasChoices("epsilon_fraction", "relative")
    )
    resolution: float = Field(default=1.0, gt=0)
    seed: int = 0
    methods: list[str] = ["lib"]
    first_layer: str | None = None
    last_layer: str | None = None


class GraphRunConfig(StrictModel):
    """``degeneracy graph CONFIG.yaml``: bases, interaction graphs, ablations, modules, Fourier labels.

    ``basis`` and ``edges`` are keyword options of :func:`degeneracy.interaction_basis` and
    :func:`degeneracy.interaction_graph` (both take ``num_sources``, ``seed``: stochastic ±1 sources
    with standard errors); ``shortcuts`` uses the (checked) TransformerLens section
    shortcuts; ``edge_limit`` computes edges on the first examples only; ``fourier`` (``null``: on for
    modular-addition data) adds Fourier labels of the features. ``device``: where the model and data
    go (default: :func:`run_device`). ``basis_files``: saved bases (by method) used instead of building
    them, refused if built on another model unless ``allow_other_model`` (``--allow-other-model``).

    >>> cfg = GraphRunConfig.model_validate({"methods": ["lib"], "ablation": {"limit": 256}})
    >>> cfg.methods, cfg.ablation.limit, cfg.ablation.node_points, cfg.modules.methods
    (['lib'], 256, 16, ['lib'])
    """

    model: ModelSpec = ModelSpec()
    node_layers: NodeLayers = None
    methods: list[str] = ["lib", "pca"]
    basis: dict[str, Any] = {}
    edges: dict[str, Any] = {}
    shortcuts: bool = True
    edge_limit: int | None = Field(default=None, gt=0)
    ablation: AblationOptions = AblationOptions()
    modules: ModuleOptions = ModuleOptions()
    fourier: bool | None = None
    device: Device = None
    basis_files: dict[str, str] = {}
    allow_other_model: bool = False

    @model_validator(mode="after")
    def _known(self) -> GraphRunConfig:
        """Methods and the basis and edge options are checked before any model is loaded."""
        import degeneracy

        check_methods(self.methods)
        check_methods(self.modules.methods)
        check_methods(self.ablation.edge_methods or [])
        check_options(self.basis, degeneracy.interaction_basis, taken=BASIS_TAKEN)
        check_options(self.edges, degeneracy.interaction_graph, taken=GRAPH_TAKEN)
        check_sources(self.basis, "basis")
        check_sources(self.edges, "edges")
        check_graph_options(self)  # basis_files; basis and edges options typed and checked
        check_methods_built(self)  # edge_methods and modules.methods among the methods built
        check_factory_split(self)  # a factory has no splits
        return self


class DegeneracyRunConfig(StrictModel):
    """``degeneracy degeneracy CONFIG.yaml``: degeneracy accounting.

    Attributes:
        model: which model and data (:class:`ModelSpec`).
        epsilon: noise scale ε: eigenvalues and synchronisation residuals ≤ ε count as zero.
        relative: ε relative to the largest eigenvalue of each matrix.
        kind: behavioral loss, ``"mse"`` (paper eq 6) or ``"kl"``.
        position: output position (``"auto"``: the last token for the bundled modular-addition
            transformer, all outputs otherwise; an integer; or ``null`` for every position).
        batch_size: batch size of every pass.
        jacobians: compute Jacobian Grams (Jacobian rank drops, t_a, relevant positions).
        jacobian_projections: estimate Jacobian Grams from this many random output projections.
        hessian: ``"auto"``, ``"exact"``, ``"lanczos"`` or ``"none"``.
        hessian_k, hessian_block_size, hessian_max_products, hessian_tol: block Lanczos settings.
        hessian_dtype: dtype of the Hessian products (``"auto"``: float64 for the exact path, float32
            for Lanczos, whose Krylov basis is float64 regardless).
        num_trace_probes, num_rank_probes, num_rank_steps: Hutchinson and SLQ settings of the Lanczos
            path (the former names ``trace_probes``, ``rank_probes``, ``rank_steps`` are accepted).
        plot_epsilons: extra ε lines on the spectrum plot.
        sparsify: run the Section 4 construction when the model is a chain of linear layers.
        union_max_parameters: compute the exact span of the free directions up to this N.
        seed: seeds every random choice.
        device: where the model and data go (``"cpu"``, ``"cuda:0"``; default: :func:`run_device`).

    >>> cfg = DegeneracyRunConfig.model_validate({"epsilon": 1e-3, "relative": True, "position": -1})
    >>> cfg.model.name, cfg.epsilon, cfg.positions, cfg.hessian  # "position" is the former name
    ('digits_mlp', 0.001, -1, 'auto')
    >>> try:
    ...     DegeneracyRunConfig(epsilon=2.0, relative=True)
    ... except ValueError as err:
    ...     print(err.errors()[0]["msg"])
    Value error, a relative epsilon must be below 1 (it multiplies the largest eigenvalue)
    """

    model: ModelSpec = ModelSpec(name="digits_mlp", split="all")
    epsilon: float = Field(default=0.0, ge=0.0)
    relative: bool = False
    kind: Literal["mse", "kl"] = "mse"
    positions: int | Literal["auto"] | None = Field(
        default="auto", validation_alias=AliasChoices("positions", "position")
    )
    batch_size: int | None = Field(default=None, gt=0)
    jacobians: bool = True
    jacobian_projections: int | None = Field(default=None, gt=0)
    hessian: Literal["auto", "exact", "lanczos", "none"] = "auto"
    hessian_k: int = Field(default=50, gt=0)
    hessian_block_size: int = Field(default=16, gt=0)
    hessian_max_products: int | None = Field(default=None, gt=0)
    hessian_tol: float = Field(default=1e-4, gt=0.0)
    hessian_dtype: Literal["auto", "float32", "float64"] = "auto"
    num_trace_probes: int = Field(
        default=0, ge=0, validation_alias=AliasChoices("num_trace_probes", "trace_probes")
    )
    num_rank_probes: int = Field(
        default=8, ge=0, validation_alias=AliasChoices("num_rank_probes", "rank_probes")
    )
    num_rank_steps: int = Field(
        default=40, gt=1, validation_alias=AliasChoices("num_rank_steps", "rank_steps")
    )
    plot_epsilons: list[float] = Field(default_factory=list)
    sparsify: bool = True
    union_max_parameters: int = Field(default=20_000, ge=0)
    seed: int = 0
    device: Device = None

    @model_validator(mode="after")
    def check_combinations(self) -> DegeneracyRunConfig:
        """Reject a relative ε ≥ 1 and a Lanczos budget below ``hessian_k``."""
        if self.relative and self.epsilon >= 1.0:
            raise ValueError("a relative epsilon must be below 1 (it multiplies the largest eigenvalue)")
        if self.hessian == "lanczos" and self.hessian_max_products is not None:
            if self.hessian_max_products < self.hessian_k:
                raise ValueError("hessian_max_products must be at least hessian_k")
        return self


class LLCSamplerConfig(StrictModel):
    """SGLD settings (see :func:`degeneracy.llc.estimate_llc`). ``nbeta: null`` means n / log n.

    >>> s = LLCSamplerConfig(num_draws=400, step_size=1e-4)
    >>> s.num_chains, s.num_draws, s.step_size, s.nbeta
    (4, 400, 0.0001, None)
    """

    nbeta: float | None = Field(default=None, gt=0)
    localization: float = Field(default=100.0, ge=0)
    step_size: float | Literal["auto"] = "auto"
    num_chains: int = Field(default=4, ge=1)
    num_draws: int = Field(default=200, ge=1)
    num_burnin: int = Field(default=100, ge=0)
    thinning: int = Field(default=1, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    engine: Literal["auto", "vmap", "batched"] = "auto"


class LLCRunConfig(StrictModel):
    """``degeneracy llc CONFIG.yaml``: the learning coefficient and N_eff(ε).

    Attributes:
        model: which model and data.
        loss: ``"behavioral"`` (mean squared output difference), ``"kl"`` (classifiers), or the training
            loss on labels: ``"cross_entropy"`` or ``"mse"`` (labels of the bundled data, or data
            ``(inputs, labels)`` from a factory; :func:`degeneracy.commands.llc.labelled_data`).
        positions: ``"last"`` keeps only the last position of ``(batch, pos, d)`` outputs (e.g. the
            answer position of the modular-addition transformer).
        params: names of the parameters to sample (default: all).
        sampler: SGLD settings of the single estimate (and defaults of the sweeps).
        nbetas: optional sweep of inverse temperatures (the λ(ε) curve).
        epsilons: optional loss scales for N_eff(ε) (nβ found per ε, or the volume method).
        method: ``"sgld"`` or ``"volume"`` for ``epsilons`` (volume: at most 12 parameters).
        volume_options: keyword arguments of :func:`degeneracy.llc.volume_llc` (``num_points``, ...).
        plots: write figures (needs matplotlib).
        progress: show progress bars.

    >>> cfg = LLCRunConfig.model_validate({"positions": "last", "nbetas": [20, 200], "sampler": {"seed": 1}})
    >>> cfg.model.dtype, cfg.positions, cfg.nbetas, cfg.sampler.seed, cfg.sampler.num_chains
    ('float32', 'last', [20.0, 200.0], 1, 4)
    """

    model: ModelSpec = ModelSpec(name="digits_mlp", dtype="float32")
    loss: Literal["behavioral", "kl", "cross_entropy", "mse"] = "behavioral"
    positions: Literal["all", "last"] = "all"
    params: list[str] | None = None
    sampler: LLCSamplerConfig = LLCSamplerConfig()
    nbetas: list[float] | None = Field(default=None, min_length=1)
    epsilons: list[float] | None = Field(default=None, min_length=1)
    method: Literal["sgld", "volume"] = "sgld"
    volume_options: dict[str, Any] = {}
    plots: bool = True
    progress: bool = True
