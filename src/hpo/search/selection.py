"""Which trials count and which one is chosen: read by the study loop, promotion, reports and curves."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import TrialState

from hpo.search.storage import StudyError


def primary(trial: optuna.trial.FrozenTrial) -> float:
    """The trial's validation metric: its only value, or the first of a multi-objective study."""
    return trial.values[0]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial with the best validation metric (in a multi-objective study: the front's most accurate)."""
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(study.best_trials, key=lambda t: sign * primary(t))


def default_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("is_default"):
            return trial
    return None


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``study.n_trials``: complete ones and those a pruner stopped after a rung.

    Trials pruned before any fit (over the memory budget) cost nothing and do not count.
    """
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return count(study, TrialState.COMPLETE) + sum(1 for t in pruned if t.intermediate_values)


def cheapest_within(study: optuna.Study, within: float, cost: str) -> optuna.trial.FrozenTrial:
    """The finished trial of lowest ``cost`` (a trial metric) whose validation metric is within
    ``within`` (a fraction) of the best: trade a little accuracy for a cheaper model."""
    best = primary(best_trial(study))
    minimize = study.directions[0] == optuna.study.StudyDirection.MINIMIZE
    bound = best + abs(best) * within if minimize else best - abs(best) * within
    close = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if (primary(t) <= bound if minimize else primary(t) >= bound) and cost in t.user_attrs
    ]
    if not close:
        raise StudyError(f"no finished trial of study {study.study_name!r} records {cost!r}; pick another cost metric")
    return min(close, key=lambda t: (t.user_attrs[cost], primary(t)))


def failure_verdict(study: optuna.Study, study_cfg) -> str | None:
    """A message when more than ``max_failure_rate`` of the ended trials failed, else None."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    attempts = len(failed) + count(study, TrialState.COMPLETE)
    if attempts < study_cfg.min_trials_for_failure_rate or len(failed) / attempts <= study_cfg.max_failure_rate:
        return None
    reasons = Counter(t.user_attrs.get("failure", "killed") for t in failed)
    last = failed[-1].user_attrs.get("failure_message", "")[-500:]
    return (
        f"{len(failed)} of {attempts} trials failed (study.max_failure_rate={study_cfg.max_failure_rate}); "
        f"reasons: {dict(reasons)}; last failure: {last}"
    )

