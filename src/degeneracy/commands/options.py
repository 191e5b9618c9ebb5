"""The keyword options a config passes to a library function (``options:``/``basis:`` to
:func:`degeneracy.interaction_basis`, ``edges:`` to :func:`degeneracy.interaction_graph`), typed and
checked when the config is read, before any model loads: each value against the function's annotation
(YAML's ``1e-3``, a string to YAML, is read as the number it means; ``center: maybe`` is an error naming
the option and the type), then the option set as a whole by the config the function builds from it
(:class:`~degeneracy.basis.BasisConfig` for each basis method, :class:`~degeneracy.edges.EdgeConfig`):
a negative ``batch_size`` or an unknown integration rule is found now, not after the first basis."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

__all__ = [
    "typed_options",
    "basis_options",
    "edge_options",
    "volume_options",
    "check_graph_options",
    "check_options",
    "check_sources",
]


def _adapters(function: Callable[..., Any]) -> dict[str, TypeAdapter]:
    """A pydantic validator per annotated parameter of ``function`` (none for types pydantic cannot
    check, such as ``torch.dtype``: those are checked by the function's own config)."""
    try:
        hints = typing.get_type_hints(inspect.unwrap(function))
    except (NameError, TypeError):  # pragma: no cover - annotations that do not resolve
        return {}
    adapters = {}
    for name, hint in hints.items():
        try:
            adapters[name] = TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - pydantic has no schema for this type: not checked here
            continue
    return adapters


def typed_options(options: dict[str, Any], function: Callable[..., Any]) -> dict[str, Any]:
    """``options`` with each value checked against (and read as) the annotation of ``function``'s
    keyword argument of that name; a ``ValueError`` names the option, the type and the value.

    >>> import degeneracy
    >>> typed_options({"gram_threshold": "1e-3", "center": True}, degeneracy.interaction_basis)
    {'gram_threshold': 0.001, 'center': True}
    >>> typed_options({"center": "maybe"}, degeneracy.interaction_basis)
    Traceback (most recent call last):
    ...
    ValueError: option 'center' of interaction_basis must be bool, got 'maybe'
    """
    adapters = _adapters(function)
    typed = {}
    for key, value in options.items():
        adapter = adapters.get(key)
        if adapter is None:
            typed[key] = value
            continue
        try:
            typed[key] = adapter.validate_python(value)
        except ValidationError:
            hint = inspect.signature(inspect.unwrap(function)).parameters[key].annotation
            raise ValueError(
                f"option {key!r} of {function.__name__} must be {hint}, got {value!r}"
            ) from None
    return typed


def basis_options(options: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Basis options typed (:func:`typed_options`) and checked together for each method by the
    :class:`~degeneracy.basis.BasisConfig` they make.

    >>> basis_options({"batch_size": "64"}, ["lib"])
    {'batch_size': 64}
    >>> basis_options({"batch_size": 0}, ["lib"])
    Traceback (most recent call last):
    ...
    ValueError: basis options: batch_size must be positive, got 0
    """
    import degeneracy
    from degeneracy.basis_result import BasisConfig, config_from

    typed = typed_options(options, degeneracy.interaction_basis)
    for method in methods:
        try:
            config_from(BasisConfig, typed, method=method)
        except ValueError as err:
            raise ValueError(f"basis options: {err}") from None
    return typed


def edge_options(options: dict[str, Any]) -> dict[str, Any]:
    """Edge options typed (:func:`typed_options`) and checked together by the
    :class:`~degeneracy.edges.EdgeConfig` they make.

    >>> edge_options({"integration_rule": "simpson"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: edges options: unknown integration rule 'simpson'; choose one of ('gradient', ...)
    """
    import degeneracy
    from degeneracy.basis_result import config_from
    from degeneracy.graph_result import EdgeConfig

    typed = typed_options(options, degeneracy.interaction_graph)
    try:
        config_from(EdgeConfig, typed)
    except ValueError as err:
        raise ValueError(f"edges options: {err}") from None
    return typed


def volume_options(options: dict[str, Any], num_parameters: int | None = None) -> dict[str, Any]:
    """The llc command's ``volume_options`` (keyword options of :func:`degeneracy.llc.volume_llc`, but
    for those the command sets), known and typed; with ``num_parameters``, also that the volume method
    can take that many parameters (checked before the first stage runs, not after it).

    >>> volume_options({"num_points": "200"})
    {'num_points': 200}
    >>> volume_options({}, num_parameters=3466)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: method: volume handles at most 12 parameters, this model has 3466; ...
    """
    from degeneracy.llc.volume import MAX_VOLUME_PARAMS, volume_llc

    taken = ("loss_fn", "center", "epsilons", "radius")
    valid = [n for n in inspect.signature(volume_llc).parameters if n not in taken]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"unknown volume_options {unknown}; valid options: {', '.join(valid)}")
    if num_parameters is not None and num_parameters > MAX_VOLUME_PARAMS:
        raise ValueError(
            f"method: volume handles at most {MAX_VOLUME_PARAMS} parameters, this model has "
            f"{num_parameters}; use method: sgld, or params: [...] to pick a few"
        )
    return typed_options(options, volume_llc)


def check_graph_options(cfg: Any) -> None:
    """A graph config's ``basis_files`` (:func:`~degeneracy.commands.basis_files.check_basis_files`)
    and its ``basis`` and ``edges`` options typed and checked, set back on the (frozen) config.

    >>> import types
    >>> cfg = types.SimpleNamespace(basis_files={}, methods=["lib"], basis={"center": "true"}, edges={})
    >>> check_graph_options(cfg)
    >>> cfg.basis
    {'center': True}
    """
    from degeneracy.basis_result import METHODS
    from degeneracy.commands.basis_files import check_basis_files

    check_basis_files(cfg.basis_files, cfg.methods, METHODS)
    object.__setattr__(cfg, "basis", basis_options(cfg.basis, cfg.methods))
    object.__setattr__(cfg, "edges", edge_options(cfg.edges))


def check_methods_built(cfg: Any) -> None:
    """A graph config's ``ablation.edge_methods`` and (when given) ``modules.methods`` name bases that it
    builds (``methods``), else a ``ValueError``: a method not built was skipped without a word.

    >>> from degeneracy.commands.config import GraphRunConfig
    >>> try:
    ...     GraphRunConfig.model_validate({"methods": ["lib"], "modules": {"methods": ["pca"]}})
    ... except ValueError as err:
    ...     print(err.errors()[0]["msg"].split(":")[0])
    Value error, modules.methods names ['pca'], a basis this run does not build (methods
    """
    asked = {
        "ablation.edge_methods": cfg.ablation.edge_methods or [],
        "modules.methods": cfg.modules.methods if "methods" in cfg.modules.model_fields_set else [],
    }
    for field, methods in asked.items():
        missing = [m for m in methods if m not in cfg.methods]
        if missing:
            raise ValueError(
                f"{field} names {missing}, a basis this run does not build (methods: {list(cfg.methods)}): "
                f"add it to methods, or take it out of {field}"
            )


def check_factory_split(cfg: Any) -> None:
    """A ``ValueError`` for ``ablation.split`` with a model of your own (``package.module:function``): a
    split is one of the bundled data, and the factory returns the same data whatever the split, so the
    ablations would run on the build data while the run says another split.

    >>> from degeneracy.commands.config import GraphRunConfig
    >>> try:
    ...     GraphRunConfig.model_validate({"model": {"name": "my:make"}, "ablation": {"split": "test"}})
    ... except ValueError as err:
    ...     print(err.errors()[0]["msg"].split(";")[0])
    Value error, ablation.split picks a split of the bundled data (modadd, digits_mlp)
    """
    if ":" in cfg.model.name and cfg.ablation.split is not None:
        raise ValueError(
            "ablation.split picks a split of the bundled data (modadd, digits_mlp); the factory "
            f"{cfg.model.name!r} returns its own data whatever the split: drop ablation.split, or evaluate "
            "on other data with a second run"
        )


def check_options(options: dict[str, Any], function: Callable[..., Any], *, taken: tuple[str, ...]) -> dict:
    """Keyword options of a config meant for ``function``: every key must be one of its keyword
    arguments (those in ``taken`` are set by the command itself), checked before anything runs.

    >>> import degeneracy
    >>> check_options({"centre": True}, degeneracy.interaction_basis, taken=("model", "data"))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown option 'centre' of interaction_basis; valid options: node_layers, method, center, ...
    """
    valid = [n for n in inspect.signature(function).parameters if n not in taken]
    for key in options:
        if key in taken:
            raise ValueError(f"option {key!r} of {function.__name__} is set by the command, not the config")
        if key not in valid:
            raise ValueError(
                f"unknown option {key!r} of {function.__name__}; valid options: {', '.join(valid)}"
            )
    return options


def check_sources(options: dict[str, Any], where: str) -> dict:
    """The stochastic-source options of a basis or edge config (:mod:`degeneracy.probes`), checked before
    anything runs: ``num_sources`` a positive count or ``null`` (exact), ``seed`` an integer,
    ``sources`` ``"rademacher"`` (a config file cannot name a draw function of your own).

    >>> check_sources({"num_sources": 8, "seed": 1}, "basis")
    {'num_sources': 8, 'seed': 1}
    >>> check_sources({"num_sources": 0}, "basis")
    Traceback (most recent call last):
    ...
    ValueError: basis option num_sources must be a positive number of ±1 sources (null: exact), got 0
    """
    count = options.get("num_sources")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(
            f"{where} option num_sources must be a positive number of ±1 sources (null: exact), got {count!r}"
        )
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where} option seed must be an integer, got {seed!r}")
    if options.get("sources", "rademacher") != "rademacher":
        raise ValueError(f"{where} option sources must be 'rademacher', got {options['sources']!r}")
    if count is not None and options.get("jacobian_mode") == "jvp":
        raise ValueError(
            f"{where} options num_sources and jacobian_mode='jvp' exclude each other: use 'auto'"
        )
    return options
