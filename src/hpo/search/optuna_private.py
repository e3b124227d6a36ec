"""Every use hpo makes of Optuna's internals, in one module (issue 23, item 5).

Optuna has no public API for these. ``tests/unit/search/test_optuna_private.py`` checks each against the installed Optuna
and fails naming the internal that changed; pyproject.toml bounds optuna to the tested minor release.

- ``sampler_rngs``: the random states a sampler draws from (``_rng``; TPE's start-up ``_random_sampler``).
  hpo reseeds them before every trial with a seed of the trial number, as Optuna's own ``reseed_rng`` does
  with a random one, so that whoever runs trial N draws the same parameters.
- ``storage_of`` and ``trial_id``: ``Study._storage`` and ``FrozenTrial._trial_id``, to end a trial that another
  (dead) process left RUNNING: the public ``Trial`` API reaches only the caller's own trial.
- ``heartbeat_enabled``: whether a storage runs Optuna's heartbeats (``optuna.storages._heartbeat``).
"""

from __future__ import annotations

import optuna


class OptunaInternalsChanged(RuntimeError):
    """The installed Optuna no longer has an internal hpo relies on (see this module's docstring)."""


def sampler_rngs(sampler: optuna.samplers.BaseSampler) -> list:
    """The ``LazyRandomState`` objects of ``sampler`` (and of its start-up sampler); raises when a sampler that
    draws at random has none (a renamed attribute would otherwise turn off per-trial seeding silently)."""
    found = [sampler._rng] if hasattr(sampler, "_rng") else []
    inner = getattr(sampler, "_random_sampler", None)
    found += sampler_rngs(inner) if inner is not None else []
    if not found and isinstance(sampler, (optuna.samplers.RandomSampler, optuna.samplers.TPESampler, optuna.samplers.GridSampler)):
        raise OptunaInternalsChanged(f"optuna {optuna.__version__}: {type(sampler).__name__} has no _rng: per-trial seeding needs updating")
    for state in found:
        if not hasattr(state, "rng") or not hasattr(state.rng, "seed"):
            raise OptunaInternalsChanged(f"optuna {optuna.__version__}: {type(sampler).__name__}._rng has no .rng.seed()")
    return found


def storage_of(study: optuna.Study):
    """The storage object behind ``study``."""
    try:
        return study._storage
    except AttributeError:
        raise OptunaInternalsChanged(f"optuna {optuna.__version__}: Study._storage is gone") from None


def trial_id(trial: optuna.trial.FrozenTrial) -> int:
    """The storage's key of ``trial``."""
    try:
        return trial._trial_id
    except AttributeError:
        raise OptunaInternalsChanged(f"optuna {optuna.__version__}: FrozenTrial._trial_id is gone") from None


def heartbeat_enabled(storage) -> bool:
    """Whether ``storage`` records Optuna's trial heartbeats (RDB storages built with ``heartbeat_interval``)."""
    try:
        from optuna.storages._heartbeat import is_heartbeat_enabled
    except ImportError:
        raise OptunaInternalsChanged(f"optuna {optuna.__version__}: optuna.storages._heartbeat.is_heartbeat_enabled is gone") from None
    return is_heartbeat_enabled(storage)
