"""The search space: one typed dimension per model parameter, sampled by Optuna.

``search.space`` in the config maps dotted model paths (``default_sigma.energy``) to a distribution;
``validate`` (hpo.config) has checked it against the model kind's constraint table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo.models.base import get_dotted


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


def search_space(cfg: DictConfig, quiet: bool = False) -> list[SearchParam]:
    """The typed view of ``search.space``, without the dimensions the model kind says cannot change the fit
    (``ModelKind.inactive_parameters``; each is named once unless ``quiet``)."""
    from hpo.config import model_params
    from hpo.models import kind

    inactive = kind(cfg.model.kind).inactive_parameters(model_params(cfg))
    params = []
    for name, spec in cfg.search.space.items():
        if str(name) in inactive:
            if not quiet:
                print(f"[hpo] search: {name} left out ({inactive[str(name)]})", flush=True)
            continue
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


def suggest(trial: optuna.Trial, space: list[SearchParam]) -> dict[str, object]:
    """Sample every dimension of the search space; names are dotted model paths.

    An enqueued trial (the hand-tuned default) may hold values outside the space: Optuna evaluates them
    as given and warns on every such trial; ``outside_space`` says it once, when the default is enqueued.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range")
        return _suggest(trial, space)


def outside_space(values: dict[str, object], space: list[SearchParam]) -> list[str]:
    """``name=value (space)`` of every value that lies outside its dimension of the search space."""
    found = []
    for param in space:
        value = values.get(param.name)
        if param.type == "categorical":
            inside = value in param.choices
            allowed = f"one of {list(param.choices)}"
        else:
            inside = value is not None and param.low <= value <= param.high
            allowed = f"[{param.low:g}, {param.high:g}]"
        if not inside:
            found.append(f"{param.name}={value!r} (search space {allowed})")
    return found


def _suggest(trial: optuna.Trial, space: list[SearchParam]) -> dict[str, object]:
    values = {}
    for param in space:
        if param.type == "float":
            values[param.name] = trial.suggest_float(param.name, param.low, param.high, log=param.log, step=param.step)
        elif param.type == "int":
            step = int(param.step or 1)
            values[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log, step=step)
        else:
            values[param.name] = trial.suggest_categorical(param.name, list(param.choices))
    return values


def default_values(model: dict, space: list[SearchParam]) -> dict[str, object]:
    return {param.name: get_dotted(model, param.name) for param in space}


def distribution(param: SearchParam):
    if param.type == "float":
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    return CategoricalDistribution(list(param.choices))


def grid(space: list[SearchParam], points: int) -> dict[str, list]:
    """The grid sampler's values: ``points`` per float/int dimension (log-spaced if log), every choice."""
    values = {}
    for param in space:
        if param.type == "categorical":
            values[param.name] = list(param.choices)
            continue
        spread = np.geomspace if param.log else np.linspace
        found = spread(param.low, param.high, points).tolist()
        values[param.name] = sorted({int(round(v)) for v in found}) if param.type == "int" else found
    return values
