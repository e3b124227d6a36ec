"""Tests of hpo.search.storage: opening a study (unreachable or changed), drivers named, per-trial seeds,
dead trials on the journal storage."""

from __future__ import annotations

import sys
import time

import pytest
from optuna.trial import TrialState

from hpo.search import loop, space, storage
from hpo.config import load_config
from hpo.search.storage import StudyError, make_storage, trial_seed
from hpo.search.space import search_space


def test_storage_that_cannot_be_opened(tiny_cfg):
    cfg = tiny_cfg("study.storage=sqlite:////proc/no/such/dir/optuna.db")
    with pytest.raises(storage.StudyError, match=r"study.storage='sqlite:////proc/no/such/dir/optuna.db' cannot be opened"):
        storage.open_study(cfg, space.search_space(cfg))


@pytest.mark.slow
def test_changed_search_space_names_parameter(tiny_cfg):
    loop.run(tiny_cfg("study.n_trials=1"))
    cfg = tiny_cfg("++search.space.n_max={type:categorical,choices:[2,3]}")
    with pytest.raises(storage.StudyError, match=r"already sampled n_max as IntDistribution.*give a new study.name"):
        storage.open_study(cfg, space.search_space(cfg))


PLANTED = "PLANTED-s3cr3t"


def test_missing_driver_names_what_to_install():
    with pytest.raises(StudyError) as raised:
        make_storage(f"postgresql+pg8000://alice:{PLANTED}@127.0.0.1:1/db", 30, 90)
    message = str(raised.value)
    assert "needs a database driver that is not installed (pg8000): pip install pg8000" in message
    assert "pip install 'hpo[postgres]'" in message
    assert PLANTED not in message and "alice:***@" in message


@pytest.mark.parametrize("url", ["postgresql://alice@127.0.0.1:1/db", "postgresql+psycopg2://alice@127.0.0.1:1/db"])
def test_missing_postgres_driver_asks_for_the_extra(monkeypatch, url):
    """Neither psycopg (plain postgresql:// on SQLAlchemy 2.1) nor psycopg2 importable."""
    import builtins

    real_import = builtins.__import__
    hidden = ("psycopg", "psycopg2", "psycopg_binary")

    def without_drivers(name, *args, **kwargs):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_drivers)
    for module in [m for m in sys.modules if m.split(".")[0] in hidden]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(StudyError, match=r"not installed \(psycopg2?\): pip install 'hpo\[postgres\]'"):
        make_storage(url, 30, 90)


def test_journal_trial_of_another_host_fails_after_the_grace(tmp_path):
    """On another host the pid cannot be checked: its trial fails once its heartbeat is older than the grace."""
    import optuna

    from hpo.search.storage import LIVENESS_ATTR, fail_dead_trials, make_storage

    study = optuna.create_study(storage=make_storage(f"journal:{tmp_path}/journal.log", 30, 90), study_name="s")
    fresh, stale = study.ask(), study.ask()
    now = time.time()
    fresh.set_user_attr(LIVENESS_ATTR, {"host": "another-node", "pid": "1", "heartbeat": f"{now:.0f}"})
    stale.set_user_attr(LIVENESS_ATTR, {"host": "another-node", "pid": "1", "heartbeat": f"{now - 3600:.0f}", "peak_rss_bytes": "2500000000"})
    failed = fail_dead_trials(study, grace_s=90)
    assert [(t.number, reason) for t, reason in failed] == [(stale.number, "killed: SIGKILL, likely out of memory (peak 2.50 GB)")]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {fresh.number: TrialState.RUNNING, stale.number: TrialState.FAIL}


def test_same_seed_same_suggestions(tiny_overrides, tmp_path):
    def suggestions(name):
        cfg = load_config([*tiny_overrides, f"study.name={name}"])
        params = search_space(cfg)
        study = storage.open_study(cfg, params)
        distributions = {p.name: space.distribution(p) for p in params}
        return [study.ask(distributions).params for _ in range(3)]

    assert suggestions("a") == suggestions("b")


def test_trial_seeds_differ_per_trial_and_repeat_per_study():
    assert trial_seed(0, 1) == trial_seed(0, 1)
    assert len({trial_seed(0, n) for n in range(100)}) == 100
    assert trial_seed(0, 1) != trial_seed(1, 1)
