"""Typed views of the composed config: one dataclass per config group, checked before any command runs.

Every value lives in ``conf/`` (no field here has a default: a key missing from the YAML is an error, so
no default hides in Python). ``check(cfg)`` merges each group into its schema, so a misspelt or unknown
key (``+study.n_trial=5``), a missing one, a value of the wrong type or one outside a fixed vocabulary
(``Choice`` enums: sampler, direction, pruner, pick, screen ensemble, spectrum window and correction) is
refused with the key's name;
``hpo.config.validate`` adds the cross-field rules. The model group's keys are those its kind ships in
``conf/model/<kind>.yaml`` (its values are checked by the kind's constraint table).
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpo.errors import ConfigError
from hpo.paths import CONF_DIR


class Choice(str, Enum):
    """A value from a fixed vocabulary: the schema names the allowed values, ``check`` refuses any other."""


class Sampler(Choice):
    tpe = "tpe"
    random = "random"
    grid = "grid"


class Direction(Choice):
    minimize = "minimize"
    maximize = "maximize"


class Pruner(Choice):
    none = "none"
    successive_halving = "successive_halving"
    hyperband = "hyperband"


class Pick(Choice):
    best = "best"
    cheapest_within = "cheapest_within"


class Ensemble(Choice):
    nve = "nve"
    nvt = "nvt"


class Window(Choice):
    hann = "hann"
    blackman = "blackman"
    triangle = "triangle"
    none = "none"


class Correction(Choice):
    harmonic = "harmonic"


@dataclass
class Tpe:
    n_startup_trials: int
    multivariate: Optional[bool]
    constant_liar: bool


@dataclass
class Loss:
    energy_weight: float
    force_weight: float
    energy_scale: Optional[float]
    force_scale: Optional[float]


@dataclass
class Study:
    name: str
    sampler: Sampler
    tpe: Tpe
    seed: int
    n_trials: int
    timeout_s: Optional[float]
    storage: str
    metric: str
    direction: Direction
    loss: Loss
    objectives: list[str]
    enqueue_default: bool
    fidelity_rungs: list[float]
    pruner: Pruner
    reduction_factor: int
    grid_points: int
    max_failure_rate: float
    min_trials_for_failure_rate: int
    n_workers: int
    heartbeat_s: int
    grace_s: int
    reconnect_s: int
    max_refused_trials: int
    cv_folds: int


@dataclass
class Tracking:
    tracking_uri: str
    artifact_location: Optional[str]
    experiment: str


@dataclass
class Screen:
    k: int
    steps: int
    start_frames: list[int]
    ensemble: Ensemble
    friction_per_fs: Optional[float]


@dataclass
class Promote:
    trial: Optional[int]
    pick: Pick
    within: float
    cost: str
    alias: str
    registered_model: str
    screen: Screen


@dataclass
class Spectrum:
    trajectory: str
    window: Window
    max_wavenumber_cm: float
    correlation_fs: Optional[float]
    correction: Optional[Correction]
    temperature_K: float
    min_frames: int


@dataclass
class Polarize:
    model_uri: str
    trajectory: str
    reference_train_size: int
    outlier_sigma: float
    uncertainty_factor: float


@dataclass
class Compare:
    models: Optional[list[str]]
    alias: str
    dir: str


@dataclass
class Pipeline:
    gap_trials: int
    gap_train_size: int
    sagpr_trials: int
    sagpr_train_size: int
    gap_overrides: list[str]
    sagpr_overrides: list[str]
    spectrum: bool


# Groups checked key by key; the others (dataset, model, search, figures, curves, report, md) hold
# kind- or data-dependent tables and are checked by hpo.config.validate.
GROUPS: dict[str, type] = {
    "study": Study, "tracking": Tracking, "promote": Promote, "polarize": Polarize, "pipeline": Pipeline, "spectrum": Spectrum,
    "compare": Compare,
}


def _known_keys(schema: type, prefix: str) -> list[str]:
    keys = []
    for f in fields(schema):
        keys.append(f"{prefix}.{f.name}")
        nested = globals().get(str(f.type))
        if is_dataclass(nested):
            keys += _known_keys(nested, f"{prefix}.{f.name}")
    return keys


def _unknown(section: DictConfig, schema: type, prefix: str) -> list[str]:
    names = {f.name: f for f in fields(schema)}
    found = []
    for key in section:
        if key not in names:
            found.append(f"{prefix}.{key}")
            continue
        nested = globals().get(str(names[key].type))
        if is_dataclass(nested) and isinstance(section[key], DictConfig):
            found += _unknown(section[key], nested, f"{prefix}.{key}")
    return found


def _choices(section: DictConfig, schema: type, prefix: str) -> None:
    """Refuse a value outside a ``Choice`` field's vocabulary, naming the key and the allowed values."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        value = section.get(f.name)
        field_type = hints[f.name]
        optional = typing.get_origin(field_type) is typing.Union and type(None) in typing.get_args(field_type)
        if optional:
            field_type = next(t for t in typing.get_args(field_type) if t is not type(None))
        if is_dataclass(field_type) and isinstance(value, DictConfig):
            _choices(value, field_type, f"{prefix}.{f.name}")
        elif isinstance(field_type, type) and issubclass(field_type, Choice) and not (optional and value is None):
            allowed = tuple(member.value for member in field_type)
            if value not in allowed:
                raise ConfigError(f"{prefix}.{f.name}={value!r} is not allowed: one of {allowed}")


def nearest(key: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the closest known key, or nothing."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for an unknown, missing or mistyped key of a checked group or of the model."""
    for group, schema in GROUPS.items():
        section = cfg.get(group)
        if section is None:
            raise ConfigError(f"the config has no {group} group (conf/{group}/)")
        unknown = _unknown(section, schema, group)
        if unknown:
            raise ConfigError(f"{unknown[0]} is not a key of the {group} config{nearest(unknown[0], _known_keys(schema, group))}")
        _choices(section, schema, group)
        try:
            # resolved first: interpolations point outside the group (study.name uses model.kind)
            values = OmegaConf.to_container(section, resolve=True, throw_on_missing=False)
            merged = OmegaConf.merge(OmegaConf.structured(schema), values)
            missing = sorted(OmegaConf.missing_keys(merged) - OmegaConf.missing_keys(OmegaConf.create(values)))
            if missing:
                raise ConfigError(f"{group}.{missing[0]} is missing from conf/{group}/ (every value lives in conf/)")
        except OmegaConfBaseException as exc:
            key = f"{group}.{exc.full_key}" if getattr(exc, "full_key", None) else group
            raise ConfigError(f"{key}: {str(getattr(exc, 'msg', exc)).splitlines()[0]}") from None
    check_model_keys(cfg)


def _leaves(tree: Any, prefix: str) -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}.{key}")]


def check_model_keys(cfg: DictConfig) -> None:
    """Every model key must be one its kind ships in conf/model/<kind>.yaml: a misspelt parameter would
    otherwise be ignored while the fit runs with the default."""
    name = cfg.model.get("kind")
    shipped_file = CONF_DIR / "model" / f"{name}.yaml"
    if not shipped_file.is_file():
        return  # hpo.config.validate names the unknown kind
    shipped = OmegaConf.to_container(OmegaConf.load(shipped_file))
    shipped = shipped.get("model", shipped) if "kind" not in shipped else shipped
    known = set(_leaves(shipped, "model"))
    for key in _leaves(OmegaConf.to_container(cfg.model), "model"):
        if key not in known:
            raise ConfigError(f"{key} is not a parameter of model {name!r}{nearest(key, sorted(known))}")
