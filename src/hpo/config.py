"""Compose the Hydra config and check it before any fit.

Config is data under ``conf/``; this module only reads it. ``validate`` checks
the composed tree against the allowed values declared below and raises a
``ConfigError`` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from hpo.data import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"

MODEL_KINDS = ("gap", "sagpr")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "successive_halving", "hyperband")
DIRECTIONS = ("minimize", "maximize")
PARAM_TYPES = ("float", "int", "categorical")

# Allowed values of model parameters, as data: "positive" (> 0), "count" (integer >= 1),
# "optional_count" (null or integer >= 1), "non_negative_int" (integer >= 0), or a tuple of allowed strings. gap_fit exits 0 on
# some impossible values (delta < 0, zeta = 0), so every trial's parameters are checked too.
MODEL_CONSTRAINTS = {
    "gap": {
        "cutoff": "positive",
        "atom_sigma": "positive",
        "delta": "positive",
        "zeta": "count",
        "n_max": "count",
        "l_max": "non_negative_int",
        "n_sparse": "count",
        "default_sigma.energy": "positive",
        "default_sigma.force": "positive",
        "covariance_type": ("dot_product", "gaussian"),
        "sparse_method": ("cur_points", "random", "uniform", "none"),
        "fit_timeout_s": "positive",
        "memory_budget_gb": "positive",
        "force_metrics": (True, False),
        "cost_frames": "non_negative_int",
        "descriptor_cache_max_gb": "positive",
    },
    "sagpr": {
        "rc": "positive",
        "sigma": "positive",
        "n_max": "count",
        "l_max": "non_negative_int",
        "zeta": "count",
        "reg0": "positive",
        "reg2": "positive",
        "nc": "optional_count",
        "symmetry_tol": "positive",
        "cache_max_gb": "positive",
    },
}
ALLOWED_TEXT = {
    "positive": "a positive number",
    "count": "an integer >= 1",
    "optional_count": "null or an integer >= 1",
    "non_negative_int": "an integer >= 0",
}


class ConfigError(ValueError):
    """The composed config holds a value that is not allowed."""


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/`` with Hydra overrides, as the CLI does (for tests, scripts and the pipeline's stages)."""
    if GlobalHydra.instance().is_initialized():  # inside a running `python -m hpo` command
        return compose(config_name=config_name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))


def output_overrides(root: str | Path) -> list[str]:
    """Overrides that send every output of a run (study storage, MLflow, trial directories) under ``root``:
    benchmarks and tests run in throwaway directories this way."""
    return [
        f"experiments_dir={root}/experiments",
        f"study.storage=sqlite:///{root}/experiments/optuna.db",
        f"tracking.tracking_uri=sqlite:///{root}/mlruns/mlflow.db",
        f"tracking.artifact_location={root}/mlruns/artifacts",
    ]


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search space: a dotted path into ``model`` and its distribution."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


def search_space(cfg: DictConfig) -> list[SearchParam]:
    """The typed view of ``search.space``; ``validate`` has checked it."""
    params = []
    for name, spec in cfg.search.space.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        params.append(
            SearchParam(
                name=str(name),
                type=spec["type"],
                low=spec.get("low"),
                high=spec.get("high"),
                log=bool(spec.get("log", False)),
                step=spec.get("step"),
                choices=tuple(spec["choices"]) if "choices" in spec else None,
            )
        )
    return params


def model_params(cfg: DictConfig) -> dict[str, Any]:
    """The model config as a plain nested dict."""
    return OmegaConf.to_container(cfg.model, resolve=True)


def get_dotted(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value


def has_dotted(tree: dict, dotted: str) -> bool:
    try:
        get_dotted(tree, dotted)
    except (KeyError, TypeError):
        return False
    return True


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def allowed(rule, value) -> bool:
    if isinstance(rule, tuple):
        return value in rule
    if rule == "positive":
        return _is_number(value) and value > 0
    if rule == "optional_count" and value is None:
        return True
    integer = isinstance(value, int) and not isinstance(value, bool)
    return integer and value >= (0 if rule == "non_negative_int" else 1)


def check_model(model: dict, prefix: str = "model") -> None:
    """Raise ``ConfigError`` for a model parameter outside ``MODEL_CONSTRAINTS`` or an impossible combination."""
    kind = model.get("kind")
    if kind not in MODEL_KINDS:
        _fail(f"{prefix}.kind", kind, f"one of {MODEL_KINDS}")
    for name, rule in MODEL_CONSTRAINTS[kind].items():
        value = get_dotted(model, name) if has_dotted(model, name) else None
        if not allowed(rule, value):
            _fail(f"{prefix}.{name}", value, ALLOWED_TEXT.get(rule, f"one of {rule}"))
    if kind == "gap" and model["atom_sigma"] >= model["cutoff"]:
        _fail(f"{prefix}.atom_sigma", model["atom_sigma"], f"smaller than the cutoff ({model['cutoff']})")


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raise ``ConfigError`` on the first wrong value."""
    model = model_params(cfg)
    check_model(model)
    kind = model["kind"]

    dataset = cfg.dataset
    sizes = [int(k) for k in dataset.train_files]
    if int(dataset.train_size) not in sizes:
        _fail("dataset.train_size", dataset.train_size, f"one of {sorted(sizes)} (dataset.train_files)")
    if kind == "gap":
        for symbol, energy in dataset.e0.items():
            if not _is_number(energy):
                _fail(f"dataset.e0.{symbol}", energy, "a number (eV)")

    study = cfg.study
    if study.sampler not in SAMPLERS:
        _fail("study.sampler", study.sampler, f"one of {SAMPLERS}")
    if study.direction not in DIRECTIONS:
        _fail("study.direction", study.direction, f"one of {DIRECTIONS}")
    if not isinstance(study.n_trials, int) or study.n_trials < 1:
        _fail("study.n_trials", study.n_trials, "an integer >= 1")
    if study.timeout_s is not None and (not _is_number(study.timeout_s) or study.timeout_s <= 0):
        _fail("study.timeout_s", study.timeout_s, "null or a positive number of seconds")
    objectives = list(study.objectives)
    if not objectives or objectives[0] != study.metric or len(set(objectives)) != len(objectives):
        _fail("study.objectives", objectives, f"distinct trial metrics, the first the validation metric study.metric={study.metric!r}")
    if len(objectives) > 1 and study.pruner != "none":
        _fail("study.pruner", study.pruner, "none in a multi-objective study (Optuna prunes single-objective studies only)")
    if "md_ms_per_atom" in objectives and not model.get("cost_frames"):
        _fail("study.objectives", objectives, "md_ms_per_atom only with model.cost_frames > 0 (the frames it is timed on)")
    rungs = list(study.fidelity_rungs)
    if not rungs or not all(_is_number(r) and 0 < r <= 1 for r in rungs) or rungs != sorted(set(rungs)) or rungs[-1] != 1:
        _fail("study.fidelity_rungs", rungs, "increasing fractions of the training set in (0, 1], the last 1.0")
    if study.pruner not in PRUNERS:
        _fail("study.pruner", study.pruner, f"one of {PRUNERS}")
    if study.pruner != "none" and len(rungs) < 2:
        _fail("study.pruner", study.pruner, "none unless study.fidelity_rungs has several rungs (e.g. [0.25, 0.5, 1.0])")
    if not _is_number(study.reduction_factor) or study.reduction_factor < 2 or int(study.reduction_factor) != study.reduction_factor:
        _fail("study.reduction_factor", study.reduction_factor, "an integer >= 2")
    if not isinstance(cfg.threads, int) or cfg.threads < 1:
        _fail("threads", cfg.threads, "an integer >= 1")
    _validate_space(cfg, model)


def _validate_space(cfg: DictConfig, model: dict) -> None:
    space = cfg.search.get("space")
    if space is None or len(space) == 0:
        _fail("search.space", space, "a mapping of model parameters to distributions")
    for name, spec in space.items():
        key = f"search.space.{name}"
        if not has_dotted(model, str(name)):
            _fail(key, OmegaConf.to_container(spec), f"a parameter of model {model['kind']!r} (not in conf/model/)")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            _fail(f"{key}.type", kind, f"one of {PARAM_TYPES}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not choices:
                _fail(f"{key}.choices", choices, "a non-empty list")
            rule = MODEL_CONSTRAINTS[model["kind"]].get(str(name))
            for choice in choices:
                if rule is not None and not allowed(rule, choice):
                    _fail(f"{key}.choices", list(choices), f"values model.{name} may take: {ALLOWED_TEXT.get(rule, rule)}")
            continue
        low, high = spec.get("low"), spec.get("high")
        for bound, value in (("low", low), ("high", high)):
            if not _is_number(value):
                _fail(f"{key}.{bound}", value, "a number")
        if low > high:
            _fail(f"{key}.low", low, f"low <= high (high={high})")
        if kind == "int" and (int(low) != low or int(high) != high):
            _fail(f"{key}", f"[{low}, {high}]", "integer bounds for type int")
        if spec.get("log", False) and low <= 0:
            _fail(f"{key}.low", low, "a positive number when log: true")
        step = spec.get("step")
        if step is not None and (not _is_number(step) or step <= 0 or spec.get("log", False)):
            _fail(f"{key}.step", step, "a positive number, and no step together with log: true")
        rule = MODEL_CONSTRAINTS[model["kind"]].get(str(name))
        if rule is not None:
            for bound, value in (("low", low), ("high", high)):
                if not allowed(rule, int(value) if kind == "int" else value):
                    _fail(f"{key}.{bound}", value, f"a value model.{name} may take: {ALLOWED_TEXT.get(rule, rule)}")


def output_path(path: str | Path) -> Path:
    """Output locations in the config are relative to the working directory."""
    return Path(path).expanduser().resolve()
