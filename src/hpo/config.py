"""Compose the Hydra config and check it before any fit.

Config is data under ``conf/`` (``src/hpo/conf``, shipped inside the package); this module only reads it. ``validate`` checks
the composed tree against the allowed values declared below and raises a
``ConfigError`` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from hpo.errors import ConfigError
from hpo.models import kind
from hpo.models.base import has_dotted
from hpo.models.rules import allowed, describe, is_number as _is_number
from hpo.paths import CONF_DIR, resolve_path


PARAM_TYPES = ("float", "int", "categorical")
DATASET_SOURCES = ("files", "pool")

# Mappings whose keys are the user's to choose: a key added with `+` is accepted only under one of these
# (anywhere else an added key is a typo that would be silently ignored, e.g. +study.n_trial=5).
OPEN_MAPPINGS = (
    "search.space",
    "dataset.e0",
    "dataset.train_files",
    "dataset.sha256",
    "figures.metrics",
    "figures.param_units",
    "figures.flexible_towards",
    "sweep.flexible_towards",
    "report.metrics",
    "sweep.metrics",
    "learning_curve.metrics",
    "report.param_units",
    "sweep.param_units",
)


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/`` with Hydra overrides, as the CLI does (for tests, scripts and the pipeline's stages)."""
    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():  # inside a running `python -m hpo` command
        cfg = compose(config_name=config_name, overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
    check_added_keys(cfg, overrides)
    return cfg


def config_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of the composed config (mappings and leaves; Hydra's own node excluded)."""
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                name = f"{prefix}{key}"
                keys.append(name)
                walk(value, name + ".")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return [k for k in keys if k != "hydra" and not k.startswith("hydra.")]


def nearest_key(key: str, candidates: list[str]) -> str | None:
    """The existing key ``key`` was most likely meant to be (same parent first), or None."""
    parent = key.rpartition(".")[0]
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    for pool in (siblings, candidates):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    leaf = key.rpartition(".")[2]  # the right name under the wrong parent: +n_trials=5
    by_leaf = [c for c in candidates if difflib.get_close_matches(leaf, [c.rpartition(".")[2]], n=1, cutoff=0.8)]
    return by_leaf[0] if by_leaf else None


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a key added with ``+`` that does not exist in ``conf/``, unless it goes into an open mapping
    (``OPEN_MAPPINGS``: search.space, dataset.e0, ...): Hydra adds any key, and nothing reads a misspelt
    one, so ``+study.n_trial=5`` would run 30 trials without a word. (``++key=value``, Hydra's
    add-or-override, is taken as deliberate.)"""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    added = [o for o in parsed if o.is_add()]
    if not added:
        return
    keys = config_keys(cfg)
    added_keys = {o.key_or_group for o in added}
    deleted = {o.key_or_group for o in parsed if o.is_delete()}
    for override in added:
        key = override.key_or_group
        if key.startswith("hydra.") or "/" in key or (CONF_DIR / key).is_dir():  # Hydra's own node, config groups
            continue
        if key in deleted or any(key == open_ or key.startswith(f"{open_}.") for open_ in OPEN_MAPPINGS):
            continue  # ~key +key=... replaces a key conf/ has
        existing = [k for k in keys if k not in added_keys and not any(k.startswith(f"{a}.") for a in added_keys)]
        hint = nearest_key(key, existing)
        group = key.partition(".")[0]
        # worded as hpo.schema words the same mistake when a command validates its config
        what = {"model": f"a parameter of model {str(cfg.model.get('kind'))!r}"}.get(group, f"a key of the {group} config" if "." in key else "a key of the config")
        raise ConfigError(
            f"{key} is not {what}" + (f" (did you mean {hint}?)" if hint else "")
            + f"; +key adds a key only under {', '.join(OPEN_MAPPINGS[:3])}, ... (`python -m hpo COMMAND --cfg job` prints the config)"
        )


def output_overrides(root: str | Path) -> list[str]:
    """The override that sends every output of a run (study storage, MLflow, trial directories, caches)
    under ``root``: benchmarks and tests run in throwaway directories this way."""
    return [f"root={root}"]


def model_params(cfg: DictConfig) -> dict[str, Any]:
    """The model config as a plain nested dict."""
    return OmegaConf.to_container(cfg.model, resolve=True)


def fill_auto(model: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """``model`` (built before the data were read) with each ``auto`` value replaced by ``cfg.model``'s, which
    ``load_datasets`` derived from the data."""
    def fill(node: dict, source: dict) -> dict:
        return {k: fill(v, source.get(k, {})) if isinstance(v, dict) else (source.get(k, v) if v == "auto" else v) for k, v in node.items()}

    return fill(model, model_params(cfg))


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_model(model: dict, prefix: str = "model") -> None:
    """Raise ``ConfigError`` for a model parameter outside its kind's table or an impossible combination."""
    kind(model.get("kind")).check(model, prefix)


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raise ``ConfigError`` on the first wrong value."""
    from hpo import schema

    schema.check(cfg)
    model = model_params(cfg)
    check_model(model)
    targets = kind(model["kind"]).targets

    dataset = cfg.dataset
    if dataset.get("source") is not None and dataset.source not in DATASET_SOURCES:
        _fail("dataset.source", dataset.source, f"one of {DATASET_SOURCES} (conf/dataset/files.yaml, pool.yaml), or absent (water)")
    if dataset.get("source") in DATASET_SOURCES:
        _validate_own_dataset(dataset, targets)
    else:
        sizes = [int(k) for k in dataset.train_files]
        if int(dataset.train_size) not in sizes:
            _fail("dataset.train_size", dataset.train_size, f"one of {sorted(sizes)} (dataset.train_files)")
        if "energy" in targets:
            for symbol, energy in dataset.e0.items():
                if not _is_number(energy):
                    _fail(f"dataset.e0.{symbol}", energy, "a number (eV)")
    files = (cfg.get("data") or {}).get("files")
    if files is not None and (not OmegaConf.is_list(files) or not all(isinstance(f, str) and f for f in files)):
        _fail("data.files", files, "null or a list of file paths")
    _validate_loss(cfg, model)

    study = cfg.study
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
    fidelity = kind(cfg.model.kind).fidelity
    if fidelity != "train_size" and len(rungs) > 1:  # the pruner cuts the kind's own steps: no subsets as well
        _fail("study.fidelity_rungs", rungs, f"[1.0] for model.kind={cfg.model.kind}: its fidelity is the {fidelity}, which study.pruner cuts short")
    if study.pruner != "none" and len(rungs) < 2 and fidelity == "train_size":
        _fail("study.pruner", study.pruner, "none unless study.fidelity_rungs has several rungs (e.g. [0.25, 0.5, 1.0])")
    if not _is_number(study.reduction_factor) or study.reduction_factor < 2 or int(study.reduction_factor) != study.reduction_factor:
        _fail("study.reduction_factor", study.reduction_factor, "an integer >= 2")
    _validate_storage_dir(cfg)
    if not isinstance(study.cv_folds, int) or isinstance(study.cv_folds, bool) or study.cv_folds < 1:
        _fail("study.cv_folds", study.cv_folds, "an integer >= 1 (1: no cross-validation)")
    if not isinstance(cfg.threads, int) or cfg.threads < 1:
        _fail("threads", cfg.threads, "an integer >= 1")
    _validate_space(cfg, model)
    _validate_promote(cfg.promote)


def _validate_own_dataset(dataset, targets) -> None:
    """dataset=files / dataset=pool: paths, split fractions, keys, units and e0."""
    from hpo.data.read import E0_MODES, ENERGY_UNITS, KEY_CANDIDATES, LENGTH_UNITS

    def path(key: str, value, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value:
            _fail(key, value, "a path to an extended XYZ file" + (" or null" if optional else f" (set {key}=PATH)"))

    if dataset.source == "files":
        path("dataset.train", dataset.get("train"))
        path("dataset.val", dataset.get("val"))
        path("dataset.test", dataset.get("test"), optional=True)
        if dataset.get("train_size") is not None:
            _fail("dataset.train_size", dataset.train_size, "null with dataset=files (the whole training file; dataset=pool takes subsets)")
    else:
        files = dataset.get("files")
        if not OmegaConf.is_list(files) or not files:
            _fail("dataset.files", files, "a non-empty list of extended XYZ files (dataset.files=[a.xyz,b.xyz])")
        for index, value in enumerate(files):
            path(f"dataset.files[{index}]", value)
        split = dataset.get("split") or {}
        for name in ("val", "test"):
            value = split.get(name)
            if not _is_number(value) or not 0 <= value < 1:
                _fail(f"dataset.split.{name}", value, "a fraction of the pool in [0, 1)")
        if not split["val"] > 0:
            _fail("dataset.split.val", split["val"], "a fraction in (0, 1): the study needs validation frames")
        if split["val"] + split["test"] >= 1:
            _fail("dataset.split", OmegaConf.to_container(split), "val + test < 1 (the rest is the training set)")
        if not isinstance(split.get("seed"), int) or isinstance(split.get("seed"), bool):
            _fail("dataset.split.seed", split.get("seed"), "an integer")
        size = dataset.get("train_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            _fail("dataset.train_size", size, "null (every training frame) or an integer >= 1")
    keys = dataset.get("keys") or {}
    for name, value in keys.items():
        if name not in KEY_CANDIDATES:
            _fail(f"dataset.keys.{name}", value, f"keys of {', '.join(KEY_CANDIDATES)} only")
        if value is not None and (not isinstance(value, str) or not value):
            _fail(f"dataset.keys.{name}", value, f"null (detected among {', '.join(KEY_CANDIDATES[name])}) or a key name")
    units = dataset.get("units") or {}
    for name, table in (("energy", ENERGY_UNITS), ("length", LENGTH_UNITS)):
        value = units.get(name)
        if not isinstance(value, str) or value.lower() not in {unit.lower() for unit in table}:
            _fail(f"dataset.units.{name}", value, f"one of {', '.join(table)}")
    e0 = dataset.get("e0")
    if "energy" in targets:
        if isinstance(e0, str):
            if e0 not in E0_MODES:
                _fail("dataset.e0", e0, f"one of {E0_MODES} or a mapping {{symbol: eV}}")
        elif OmegaConf.is_dict(e0):
            for symbol, energy in e0.items():
                if not _is_number(energy):
                    _fail(f"dataset.e0.{symbol}", energy, "a number (eV)")
        else:
            _fail("dataset.e0", e0, f"one of {E0_MODES} or a mapping {{symbol: eV}}")


def _validate_loss(cfg: DictConfig, model: dict) -> None:
    """study.loss weights and scales; val_loss only for models that record it (GAP)."""
    loss = cfg.study.get("loss")
    if loss is not None:
        for name in ("energy_weight", "force_weight"):
            value = loss.get(name)
            if not _is_number(value) or value < 0:
                _fail(f"study.loss.{name}", value, "a number >= 0")
        if not loss.energy_weight > 0 and not (loss.force_weight > 0 and "force" in kind(model["kind"]).fit_targets(model)):
            _fail("study.loss", OmegaConf.to_container(loss), "energy_weight > 0, or force_weight > 0 with model.fit_forces=true")
        for name in ("energy_scale", "force_scale"):
            value = loss.get(name)
            if value is not None and (not _is_number(value) or value <= 0):
                _fail(f"study.loss.{name}", value, "null (the validation set's standard deviation) or a positive number")
    loss_metrics = {"val_loss", "train_loss"}
    if not kind(model["kind"]).records_loss and loss_metrics & {cfg.study.metric, *cfg.study.objectives}:
        _fail("study.metric", cfg.study.metric, f"a metric of model {model['kind']!r}: its trials record no loss (study.loss)")


def check_data(cfg: DictConfig, data) -> None:
    """Checks that need the data, run after reading it and before any fit: the model's own parameters
    (the fit, trial 0) and the cheapest point of the search space must pass the model kind's preflight
    (e.g. GAP's memory estimate, which grows with the cutoff through the density of the training cells).
    Sampled trials over budget are pruned instead (``OverBudget``)."""
    from hpo.models.base import OverBudget, with_values

    model = model_params(cfg)
    model_kind = kind(model["kind"])
    frames = data.train.frames
    try:
        model_kind.preflight(model, frames)
    except OverBudget as exc:
        name = getattr(exc, "parameter", None)
        key = f"model.{name}" if name else "model"
        value = model.get(name) if name else None
        raise ConfigError(f"{key}={value!r} is not allowed for this data: {exc}") from None
    space = cfg.search.get("space") or {}
    lows = {str(n): spec.low for n, spec in space.items() if spec.get("type") in ("float", "int")}
    if not lows:
        return
    try:
        model_kind.preflight(with_values(model, lows), frames)
    except OverBudget as exc:
        name = getattr(exc, "parameter", None)
        key = f"search.space.{name}.low" if name in lows else "search.space"
        value = lows.get(name, OmegaConf.to_container(space))
        raise ConfigError(f"{key}={value!r} is not allowed for this data: even the cheapest point of the search space is over budget: {exc}") from None


def _validate_promote(promote: DictConfig) -> None:
    """promote.within and the stability gate's numbers (pick and ensemble are vocabularies: ``hpo.schema``)."""
    if not _is_number(promote.within) or promote.within < 0:
        _fail("promote.within", promote.within, "a fraction >= 0 of the best metric")
    screen = promote.get("screen")
    if screen is None:
        return
    if not isinstance(screen.k, int) or isinstance(screen.k, bool) or screen.k < 0:
        _fail("promote.screen.k", screen.k, "an integer >= 0 (0: no screening)")
    if not isinstance(screen.steps, int) or isinstance(screen.steps, bool) or screen.steps < 1:
        _fail("promote.screen.steps", screen.steps, "an integer >= 1")
    starts = list(screen.start_frames)
    if not starts or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in starts):
        _fail("promote.screen.start_frames", starts, "indices into the validation file")


def _validate_storage_dir(cfg: DictConfig) -> None:
    """A study database goes into a directory that exists, or into hpo's own experiments_dir (created on
    demand): a typo in a path must not silently create a new tree and a new, empty study."""
    from hpo.safe_files import sqlite_file

    url = str(cfg.study.storage)
    database = sqlite_file(url) or (Path(url.removeprefix("journal:")).expanduser() if url.startswith("journal:") else None)
    if database is None:
        return
    directory = output_path(database.parent)
    experiments = output_path(cfg.experiments_dir)
    if not directory.is_dir() and experiments not in (directory, *directory.parents):
        _fail("study.storage", url, f"a database in an existing directory ({directory} does not exist) or under experiments_dir")


def _validate_space(cfg: DictConfig, model: dict) -> None:
    kind_of_model = kind(model["kind"])
    space = cfg.search.get("space")
    if space is None or len(space) == 0:
        _fail("search.space", space, "a mapping of model parameters to distributions")
    for name, spec in space.items():
        key = f"search.space.{name}"
        if not has_dotted(model, str(name)):
            _fail(key, OmegaConf.to_container(spec), f"a parameter of model {model['kind']!r} (not in conf/model/)")
        param_type = spec.get("type")
        if param_type not in PARAM_TYPES:
            _fail(f"{key}.type", param_type, f"one of {PARAM_TYPES}")
        if param_type == "categorical":
            choices = spec.get("choices")
            if not choices:
                _fail(f"{key}.choices", choices, "a non-empty list")
            rule = kind(model["kind"]).parameters.get(str(name))
            for choice in choices:
                if rule is not None and not allowed(rule, choice):
                    _fail(f"{key}.choices", list(choices), f"values model.{name} may take: {describe(rule)}")
            continue
        low, high = spec.get("low"), spec.get("high")
        for bound, value in (("low", low), ("high", high)):
            if not _is_number(value):
                _fail(f"{key}.{bound}", value, "a number")
        if low > high:
            _fail(f"{key}.low", low, f"low <= high (high={high})")
        if param_type == "int" and (int(low) != low or int(high) != high):
            _fail(f"{key}", f"[{low}, {high}]", "integer bounds for type int")
        if spec.get("log", False) and low <= 0:
            _fail(f"{key}.low", low, "a positive number when log: true")
        step = spec.get("step")
        if step is not None and (not _is_number(step) or step <= 0 or spec.get("log", False)):
            _fail(f"{key}.step", step, "a positive number, and no step together with log: true")
        rule = kind_of_model.parameters.get(str(name))
        if rule is not None:
            for bound, value in (("low", low), ("high", high)):
                if not allowed(rule, int(value) if param_type == "int" else value):
                    _fail(f"{key}.{bound}", value, f"a value model.{name} may take: {describe(rule)}")


def output_path(path: str | Path) -> Path:
    """Every path in the config follows one rule: ``~`` expanded, relative paths against the working
    directory (the outputs' defaults are absolute already: they are built on ``root``)."""
    return resolve_path(path).resolve()
