"""Promote a study's trial to the MLflow model registry: pick (``pick``), screen with MD (``screen``, kinds that
drive MD), make the production model (``ModelKind.production_model``), evaluate on the test split
(``evaluate``) and register (``register``).

The new version gets lineage tags (study, trial, parameters, data hashes, metrics, how the model was made,
package versions) and the alias ``champion``, which later stages (``md``, ``polarize``) load.
"""

from __future__ import annotations

import time
from pathlib import Path

from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo import plots
from hpo.data import load_datasets
from hpo.models import kind
from hpo.models.base import TrialFailure, with_values
from hpo.redact import redact
from hpo.registry.evaluate import print_test_summary, test_errors_of
from hpo.registry.pick import candidate_trials, model_files
from hpo.registry.register import find_version, register
from hpo.registry.resolve import PromoteError, for_kind
from hpo.registry.screen import screen_candidates, screen_key, screen_settings
from hpo.search.study_record import config_for_study
from hpo.search.scoring import context_of
from hpo.search.selection import primary
from hpo.search.storage import load_study
from hpo.tracking import Tracker, flatten, provenance_tags


def promote(cfg) -> dict:
    """Register the best (or ``promote.trial``) trial's model; return the version's lineage.

    A kind that drives MD, with ``promote.screen.k > 0``: the k best finished trials (by the validation metric,
    or by cost within ``promote.within`` for ``pick=cheapest_within``) are screened in rank order with a
    short MD from validation frames, each a nested MLflow run with its stability verdict; the first
    stable one is registered (tag ``md_stable=true``). None stable: ``PromoteError`` naming every
    candidate and why. ``promote.trial=N`` screens that trial only and registers it even when
    unstable (``md_stable=false``, with a warning).

    The registered model is then evaluated once on the test split (``hpo.data.load_test_set``):
    ``test_*`` metrics on the promote run and tags on the version, next to the hand-tuned default
    trial's test error when the study has one.
    """
    cfg = config_for_study(cfg)  # the model kind and training size the study itself records
    hpo_config.validate(cfg)
    study = load_study(cfg.study)
    model_kind = kind(cfg.model.kind)
    screen = screen_settings(cfg)
    candidates = candidate_trials(study, cfg.promote, screen["k"] if screen else 1)
    name = for_kind(cfg.promote.registered_model, model_kind.name)
    tracker = Tracker(cfg.tracking)
    key = screen_key(cfg, study, candidates, screen)
    existing = find_version(
        tracker, name, study.study_name, candidates[0].number, key if screen and cfg.promote.trial is None else None, screened=bool(screen)
    )
    if existing is not None:
        print(f"[hpo] {name} version {existing.version} already holds study {study.study_name!r} trial {existing.tags.get('trial')}")
        tracker.client.set_registered_model_alias(name, cfg.promote.alias, existing.version)
        return dict(existing.tags, version=existing.version, name=name)

    data = load_datasets(cfg)
    context = context_of(cfg, data, model_kind)
    search_time = sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        if t.datetime_complete and t.datetime_start
    )
    promote_dir = hpo_config.output_path(cfg.experiments_dir) / "promote" / f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_tags = {"command": "promote", "run_type": "promote", "study": study.study_name, **provenance_tags()}
    with tracker.run(f"promote-{study.study_name}", tags=run_tags) as run_id:
        tracker.log_config(run_id, cfg)
        tracker.log_datasets(run_id, {"training": data.train, "validation": data.val})
        if screen:
            trial, files, workdir, screened = screen_candidates(cfg, study, candidates, data, screen, tracker, run_id, promote_dir, model_kind, context)
        else:
            trial = candidates[0]
            files, workdir = model_files(cfg, study, trial, data)
            screened = None
        model = with_values(hpo_config.model_params(cfg), trial.params)
        try:
            # what the kind registers may be remade from the trial (ModelKind.production_model)
            files, production = model_kind.production_model(model, data, files, promote_dir / "production", context)
        except TrialFailure as exc:
            raise PromoteError(f"trial {trial.number}: {exc}") from None
        if production:
            workdir = files[0].parent
            tracker.log(run_id, metrics=production)
        # the registered model carries its posterior (predictive std in md, polarize and hpo.load_model)
        files = model_kind.attach_posterior(model, data, files, context)
        metrics = {k: v for k, v in trial.user_attrs.items() if isinstance(v, float)}
        lineage = {
            "study": study.study_name,
            "storage": redact(str(cfg.study.storage)),
            "trial": trial.number,
            "objective": primary(trial),
            "pick": "trial" if cfg.promote.trial is not None else cfg.promote.pick,
            "search_time_s": round(search_time, 1),
            "n_trials": len(study.trials),
            "train_file": data.train.path.name,
            # the trial's own MLflow run: its metrics, plots and parameters (the version's run is the promote run)
            "trial_run_id": trial.user_attrs.get("mlflow_run_id", ""),
            "train_size": len(data.train),
            **{f"param.{k}": v for k, v in flatten(model).items()},
            **{f"metric.{k}": v for k, v in metrics.items()},
            **data.hashes,
            **provenance_tags(),
        }
        if screened is not None:
            lineage.update(screened.tags, screen_key=key)
        lineage.update(model_kind.lineage_tags(workdir))
        tracker.client.set_tag(run_id, "mlflow.runName", f"promote-{study.study_name}-trial{trial.number}")
        tracker.log(run_id, tags=lineage)

        test_metrics, test_tags = test_errors_of(cfg, study, trial, files, data, model_kind, context, promote_dir, tracker, run_id)
        lineage.update(test_tags, **{k: f"{v:.6g}" for k, v in test_metrics.items()})
        tracker.log(run_id, metrics=test_metrics, tags=test_tags)
        if "calibration_plot" in test_tags:
            tracker.log_artifacts(run_id, [Path(test_tags["calibration_plot"])])
        if screened is not None:
            tracker.log(run_id, metrics={f"screen.{k}": v for k, v in screened.metrics.items()})
            tracker.log_artifacts(run_id, screened.figures, "screen")

        if len(study.directions) > 1:  # show where the promoted model sits on the accuracy-cost front
            figure = hpo_config.output_path(cfg.experiments_dir) / "promote" / f"{study.study_name}-pareto.png"
            title = f"{model_kind.display_name} study {study.study_name}: promoted trial {trial.number} ({lineage['pick']})"
            tracker.log_artifacts(run_id, [plots.pareto_plot(figure, study, list(cfg.study.objectives), title, picked=trial)])
        version = register(cfg, tracker, run_id, name, study, trial, files, model_kind, lineage, data.val.frames[:2])
    print(
        f"[hpo] registered {name} version {version.version} (alias {cfg.promote.alias!r}) from study "
        f"{study.study_name!r} trial {trial.number}: {cfg.study.metric}={primary(trial):.5g}"
    )
    print_test_summary(cfg, trial, test_metrics)
    return dict(lineage, version=version.version, name=name)
