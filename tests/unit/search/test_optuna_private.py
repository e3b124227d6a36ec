"""The Optuna internals hpo uses (hpo.search.optuna_private), checked against the installed Optuna: a release
that renames or changes one fails here, by name, instead of turning off seeding or dead-trial cleanup."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hpo.search import optuna_private
from hpo.search.storage import trial_seeded


@pytest.mark.parametrize("make", [optuna.samplers.RandomSampler, optuna.samplers.TPESampler])
def test_sampler_random_states_are_where_hpo_reseeds_them(make):
    rngs = optuna_private.sampler_rngs(make(seed=1))
    assert rngs and all(isinstance(state.rng, np.random.RandomState) for state in rngs)
    if make is optuna.samplers.TPESampler:
        assert len(rngs) == 2  # its own and its start-up random sampler's

    def draws(construction_seed: int) -> list[float]:
        study = optuna.create_study(sampler=trial_seeded(make(seed=construction_seed), study_seed=7))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        return [t.params["x"] for t in study.trials]

    # the draws follow hpo's per-trial seed, not the sampler's own: the reseeding reaches Optuna's state
    assert draws(1) == draws(2)


def test_storage_and_trial_id_end_another_process_trial(tmp_path):
    storage = RDBStorage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=storage, study_name="s")
    study.ask()  # left RUNNING, as by a process that died
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    optuna_private.storage_of(study).set_trial_state_values(optuna_private.trial_id(running), TrialState.FAIL)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_heartbeat_detection(tmp_path):
    """As loop.optimize asks it: of the storage behind a study (Optuna wraps an RDB storage in a cache)."""

    def enabled(storage) -> bool:
        return optuna_private.heartbeat_enabled(optuna_private.storage_of(optuna.create_study(storage=storage)))

    assert enabled(RDBStorage(f"sqlite:///{tmp_path}/h.db", heartbeat_interval=60, grace_period=120))
    assert not enabled(RDBStorage(f"sqlite:///{tmp_path}/n.db"))
    assert not enabled(optuna.storages.InMemoryStorage())
