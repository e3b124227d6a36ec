"""Which trial a promotion registers: ``promote.trial``, or the one ``promote.pick`` chooses, and the ranked
candidates the stability screen tries; a trial's model files (refitted when they are gone)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo.models.base import with_values
from hpo.registry.resolve import PromoteError
from hpo.search.objective import score
from hpo.search.selection import best_trial, cheapest_within, primary
from hpo.search.storage import StudyError



def pick_trial(study: optuna.Study, promote_cfg) -> optuna.trial.FrozenTrial:
    """``promote.trial`` if given, else the trial ``promote.pick`` chooses."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not finished:
        raise PromoteError(f"study {study.study_name!r} has no finished trial to promote; run `hpo optimize` first")
    number = promote_cfg.trial
    if number is None and promote_cfg.pick == "best":
        return best_trial(study)
    if number is None:
        try:
            return cheapest_within(study, float(promote_cfg.within), str(promote_cfg.cost))
        except StudyError as exc:
            raise PromoteError(str(exc)) from None
    for trial in finished:
        if trial.number == number:
            return trial
    raise PromoteError(
        f"promote.trial={number} is not a finished trial of study {study.study_name!r}; "
        f"finished: {[t.number for t in finished]}"
    )


def candidate_trials(study: optuna.Study, promote_cfg, k: int) -> list[optuna.trial.FrozenTrial]:
    """The trials to screen, in order of preference: ``promote.trial`` alone, else the k best by the
    validation metric (``pick=best``) or the k cheapest within ``promote.within`` of the best."""
    first = pick_trial(study, promote_cfg)
    if promote_cfg.trial is not None or k <= 1:
        return [first]
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    if promote_cfg.pick == "best":
        ranked = sorted(finished, key=lambda t: (sign * primary(t), t.number))
    else:
        best = primary(best_trial(study))
        bound = best + sign * abs(best) * float(promote_cfg.within)
        close = [t for t in finished if sign * primary(t) <= sign * bound and promote_cfg.cost in t.user_attrs]
        ranked = sorted(close, key=lambda t: (t.user_attrs[promote_cfg.cost], sign * primary(t)))
    rest = [t for t in ranked if t.number != first.number]
    return [first, *rest][:k]


def model_files(cfg, study, trial, data) -> tuple[list[Path], Path]:
    """The trial's model files and working directory; refitted on the training set when they are gone."""
    files = [Path(p) for p in trial.user_attrs.get("model_files", [])]
    workdir = Path(trial.user_attrs.get("workdir", ""))
    if not files or not all(p.exists() for p in files):
        # The trial's files are gone (another machine, cleaned up): refit on the full training set.
        model = with_values(hpo_config.model_params(cfg), trial.params)
        workdir = hpo_config.output_path(cfg.experiments_dir) / "promote" / f"{study.study_name}-trial{trial.number}"
        files = score(cfg, model, data, workdir).model_files
    return files, workdir
