"""A study's own record of what it was run on, and the config of a command that reads the study.

``optimize`` stores the model kind and the data set (name, training size) as study user attributes
(``record``). Commands that read a study (``report``, ``promote``, ``learning-curve``/``sweep-param``
with ``from_study``) then compose their config from that record (``config_for_study``): ``python -m hpo
report study.name=water-sagpr-200`` needs no ``model=sagpr``, and a conflicting override is refused with
a message instead of a report drawn with the wrong metric or data.
"""

from __future__ import annotations

from typing import Iterable

import optuna
from omegaconf import DictConfig

from hpo.errors import ConfigError

# study user attribute -> the override that reproduces it
RECORDED = {"model_kind": "model", "dataset": "dataset", "train_size": "dataset.train_size"}


def record(study: optuna.Study, cfg) -> None:
    """Store what the study is run on (once; a resumed study keeps its first record)."""
    values = {"model_kind": str(cfg.model.kind), "dataset": str(cfg.dataset.name), "train_size": _size(cfg.dataset.train_size)}
    folds = int(cfg.study.cv_folds)
    # a study's values must compare like with like: a split's validation error and a CV mean do not
    earlier = study.user_attrs.get("cv_folds")
    if earlier is None:
        finished = [t for t in study.get_trials(deepcopy=False) if t.value is not None or t.values]
        earlier = int(finished[0].user_attrs.get("cv_folds", 1)) if finished else folds
    if int(earlier) != folds:
        raise ConfigError(
            f"study {study.study_name!r} scored its trials with study.cv_folds={earlier}, this run asks for {folds}: "
            "their values would not compare. Give this run another study.name (or the same cv_folds)."
        )
    values["cv_folds"] = folds
    for key, value in values.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)


def _size(value):
    """dataset.train_size as recorded: an int, or None (own data: every training frame)."""
    return None if value is None else int(value)


def recorded(study: optuna.Study) -> dict:
    """The study's record; for a study made before hpo kept one, the model kind its parameters belong to."""
    found = {k: study.user_attrs[k] for k in RECORDED if k in study.user_attrs}
    if "model_kind" not in found:
        guess = kind_of_params({name for t in study.get_trials(deepcopy=False) for name in t.params})
        if guess:
            found["model_kind"] = guess
    return found


def kind_of_params(names: set[str]) -> str | None:
    """The only model kind whose parameter table holds all ``names``, or None."""
    from hpo.models import KINDS, kind

    if not names:
        return None
    fits = [name for name in KINDS if names <= set(kind(name).parameters)]
    return fits[0] if len(fits) == 1 else None


def user_overrides() -> list[str] | None:
    """The overrides the user typed inside a ``python -m hpo`` command; None outside one (tests, scripts)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return None


def given(overrides: Iterable[str]) -> dict[str, str]:
    """``{key: value}`` of plain ``key=value`` overrides (``model=sagpr``, ``dataset.train_size=200``)."""
    out = {}
    for override in overrides:
        key, sep, value = str(override).lstrip("+").partition("=")
        if sep:
            out[key] = value
    return out


def config_for_study(
    cfg: DictConfig,
    study_name: str | None = None,
    overrides: list[str] | None = None,
    keys: Iterable[str] = ("model_kind", "train_size"),
) -> DictConfig:
    """``cfg`` recomposed for the model kind (and training size, ...) study ``study_name`` (default
    ``study.name``) records, unless it already agrees; a user override that contradicts the record
    raises ``ConfigError``. ``overrides`` defaults to the command line's.

    Use at the top of a command that reads a study: ``cfg = config_for_study(cfg)``; a command taking
    the study from another key passes its name and the keys that matter
    (``config_for_study(cfg, section.from_study, keys=("model_kind",))``).
    """
    from hpo.config import load_config
    from hpo.search.storage import load_study

    name = str(study_name or cfg.study.name)
    overrides = user_overrides() if overrides is None else list(overrides)
    record_ = recorded(load_study(cfg.study, name))
    typed = given(overrides or [])
    current = {"model_kind": str(cfg.model.kind), "dataset": str(cfg.dataset.name), "train_size": str(cfg.dataset.train_size)}
    additions = []
    for key in keys:
        if key not in record_ or str(record_[key]) == current[key]:
            continue
        override_key = RECORDED[key]
        if override_key in typed:
            raise ConfigError(
                f"study {name!r} was run with {override_key}={record_[key]}, but the command gives "
                f"{override_key}={typed[override_key]}: drop the override (the study's own record is used) "
                f"or name another study"
            )
        additions.append(f"{override_key}={record_[key]}")
    if not additions:
        return cfg
    if overrides is None:  # a caller outside the CLI composed cfg itself: it must compose the right one
        raise ConfigError(f"study {name!r} was run with {', '.join(additions)}: compose the config with them")
    print(f"[hpo] study {name!r} was run with {', '.join(additions)}: the config is composed with them", flush=True)
    if study_name is None and "study.name" not in typed:
        additions.append(f"study.name={name}")  # study.name's default follows model.kind: keep this study
    from hydra.errors import HydraException

    try:
        return load_config([*overrides, *additions])
    except HydraException as exc:  # e.g. model.n_sparse=... given for a study of SA-GPR models
        first = str(exc).splitlines()[0]
        raise ConfigError(f"study {name!r} was run with {', '.join(additions)}; the command's overrides do not fit it: {first}") from None
