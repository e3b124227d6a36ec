"""Promote a study's trial to the MLflow model registry.

A promoted model is an MLflow pyfunc logged from code (the kind's ``pyfunc.py``; nothing pickled) whose
artifacts hold the model files (a GAP is an XML file plus any sparseX files: they travel as one
folder). The new version gets lineage tags (study, trial, parameters, data hashes, metrics, command
line, package versions) and the alias ``champion``, which later stages (``md``, ``polarize``) load.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo import plots
from hpo.data import load_datasets
from hpo.models import kind
from hpo.models.base import with_values
from hpo.redact import redact
from hpo.registry.resolve import MODEL_DIR, PromoteError
from hpo.search.objective import score
from hpo.search.selection import best_trial, cheapest_within, primary
from hpo.search.storage import StudyError, load_study
from hpo.tracking import Tracker, flatten, package_versions, provenance_tags

PICKS = ("best", "cheapest_within")


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


def promote(cfg) -> dict:
    """Register the best (or ``promote.trial``) trial's model; return the version's lineage."""
    hpo_config.validate(cfg)
    study = load_study(cfg.study)
    if cfg.promote.pick not in PICKS:
        raise hpo_config.ConfigError(f"promote.pick={cfg.promote.pick!r} is not allowed: one of {PICKS}")
    if not isinstance(cfg.promote.within, (int, float)) or cfg.promote.within < 0:
        raise hpo_config.ConfigError(f"promote.within={cfg.promote.within!r} is not allowed: a fraction >= 0 of the best metric")
    trial = pick_trial(study, cfg.promote)
    model = with_values(hpo_config.model_params(cfg), trial.params)
    name = cfg.promote.registered_model[model["kind"]]
    tracker = Tracker(cfg.tracking)
    existing = find_version(tracker, name, study.study_name, trial.number)
    if existing is not None:
        print(f"[hpo] {name} version {existing.version} already holds study {study.study_name!r} trial {trial.number}")
        tracker.client.set_registered_model_alias(name, cfg.promote.alias, existing.version)
        return dict(existing.tags, version=existing.version, name=name)

    data = load_datasets(cfg)
    files = [Path(p) for p in trial.user_attrs.get("model_files", [])]
    workdir = Path(trial.user_attrs.get("workdir", ""))
    if not files or not all(p.is_file() for p in files):
        # The trial's files are gone (another machine, cleaned up): refit on the full training set.
        workdir = hpo_config.output_path(cfg.experiments_dir) / "promote" / f"{study.study_name}-trial{trial.number}"
        files = score(cfg, model, data, workdir).model_files

    search_time = sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        if t.datetime_complete and t.datetime_start
    )
    metrics = {k: v for k, v in trial.user_attrs.items() if isinstance(v, float)}
    lineage = {
        "study": study.study_name,
        "storage": redact(str(cfg.study.storage)),
        "trial": trial.number,
        "objective": primary(trial),
        "pick": "trial" if cfg.promote.trial is not None else cfg.promote.pick,
        "search_time_s": round(search_time, 1),
        "n_trials": len(study.trials),
        **{f"param.{k}": v for k, v in flatten(model).items()},
        **{f"metric.{k}": v for k, v in metrics.items()},
        **data.hashes,
        **provenance_tags(),
    }
    command_file = workdir / "gap_fit.cmd"
    if command_file.is_file():
        lineage["gap_fit_command"] = command_file.read_text().strip()

    model_kind = kind(model["kind"])
    run_id = tracker.start_run(f"promote-{study.study_name}-trial{trial.number}", tags={"command": "promote", "run_type": "promote", **lineage})
    if len(study.directions) > 1:  # show where the promoted model sits on the accuracy-cost front
        figure = hpo_config.output_path(cfg.experiments_dir) / "promote" / f"{study.study_name}-pareto.png"
        title = f"{model_kind.display_name} study {study.study_name}: promoted trial {trial.number} ({lineage['pick']})"
        tracker.log_artifacts(run_id, [plots.pareto_plot(figure, study, list(cfg.study.objectives), title, picked=trial)])
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / MODEL_DIR
        bundle.mkdir()
        for path in files:
            if path.is_dir():  # an SA-GPR model is a folder of arrays and metadata
                shutil.copytree(path, bundle, dirs_exist_ok=True)
                continue
            # a GAP is its XML plus any sparseX companions written next to it
            for companion in sorted(path.parent.glob(path.name + "*")):
                if companion.is_file() and companion.suffix != ".gz":
                    shutil.copy(companion, bundle / companion.name)
        mlflow.set_tracking_uri(tracker.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(model_kind.pyfunc_code),
                artifacts={MODEL_DIR: str(bundle)},
                # Listing requirements ourselves skips MLflow's slow import-tracing subprocess.
                pip_requirements=[f"{pkg}=={ver}" for pkg, ver in package_versions().items() if ver != "not installed" and pkg != "hpo"],
            )
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v)[:5000] for k, v in lineage.items()})
    tracker.client.set_registered_model_alias(name, cfg.promote.alias, version.version)
    tracker.end_run(run_id)
    print(
        f"[hpo] registered {name} version {version.version} (alias {cfg.promote.alias!r}) from study "
        f"{study.study_name!r} trial {trial.number}: {cfg.study.metric}={primary(trial):.5g}"
    )
    return dict(lineage, version=version.version, name=name)


def find_version(tracker: Tracker, name: str, study_name: str, trial_number: int):
    """An existing version of ``name`` made from this very trial, so a repeated promote reuses it."""
    try:
        versions = tracker.client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get("study") == study_name and version.tags.get("trial") == str(trial_number):
            return version
    return None

