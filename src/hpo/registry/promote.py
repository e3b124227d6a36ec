"""Promote a study's trial to the MLflow model registry.

A promoted model is an MLflow pyfunc logged from code (the kind's ``pyfunc.py``; nothing pickled) whose
artifacts hold the model files (a GAP is an XML file plus any sparseX files: they travel as one
folder). The new version gets lineage tags (study, trial, parameters, data hashes, metrics, command
line, package versions) and the alias ``champion``, which later stages (``md``, ``polarize``) load.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import mlflow.pyfunc
import optuna
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hpo import config as hpo_config
from hpo import plots
from hpo.data import layout_of, load_datasets, load_test_set
from hpo.models import kind
from hpo.models.base import TrialFailure, with_values
from hpo.redact import redact
from hpo.registry.resolve import MODEL_DIR, PromoteError
from hpo.search.objective import score
from hpo.search.loop import metric_unit
from hpo.search.origin import config_for_study
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
    """Register the best (or ``promote.trial``) trial's model; return the version's lineage.

    GAP with ``promote.screen.k > 0``: the k best finished trials (by the validation metric, or by
    cost within ``promote.within`` for ``pick=cheapest_within``) are screened in rank order with a
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
    if cfg.promote.pick not in PICKS:
        raise hpo_config.ConfigError(f"promote.pick={cfg.promote.pick!r} is not allowed: one of {PICKS}")
    if not isinstance(cfg.promote.within, (int, float)) or cfg.promote.within < 0:
        raise hpo_config.ConfigError(f"promote.within={cfg.promote.within!r} is not allowed: a fraction >= 0 of the best metric")
    model_kind = kind(cfg.model.kind)
    screen = screen_settings(cfg)
    candidates = candidate_trials(study, cfg.promote, screen["k"] if screen else 1)
    name = cfg.promote.registered_model[model_kind.name]
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
            trial, files, workdir, screened = screen_candidates(cfg, study, candidates, data, screen, tracker, run_id, promote_dir)
        else:
            trial = candidates[0]
            files, workdir = model_files(cfg, study, trial, data)
            screened = None
        model = with_values(hpo_config.model_params(cfg), trial.params)
        try:
            # e.g. a GAP solved with numpy is refitted by gap_fit on the same sparse points and compared
            files, production = model_kind.production_model(cfg, model, data, files, promote_dir / "production")
        except TrialFailure as exc:
            raise PromoteError(f"trial {trial.number}: {exc}") from None
        if production:
            workdir = files[0].parent
            tracker.log(run_id, metrics=production)
        # the registered model carries its posterior (predictive std in md, polarize and hpo.load_model)
        files = model_kind.attach_posterior(cfg, model, data, files)
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
        command_file = workdir / "gap_fit.cmd"
        if command_file.is_file():
            lineage["gap_fit_command"] = command_file.read_text().strip()
        tracker.client.set_tag(run_id, "mlflow.runName", f"promote-{study.study_name}-trial{trial.number}")
        tracker.log(run_id, tags=lineage)

        test_metrics, test_tags = test_errors_of(cfg, study, trial, files, data, model_kind, promote_dir, tracker, run_id)
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
    print_test_summary(cfg, trial, test_metrics, model_kind)
    return dict(lineage, version=version.version, name=name)


def register(cfg, tracker: Tracker, run_id: str, name: str, study, trial, files: list[Path], model_kind, lineage: dict, example_frames=()):
    """Log the model's files as a pyfunc under ``run_id`` and register a version (or retag the version this
    trial already has, e.g. promoted earlier without screening); point the alias at it.

    The pyfunc carries what loading it elsewhere and serving it need: requirements pinned to the running
    versions, hpo's own included (the pyfunc code imports hpo), a signature (``hpo.serving``) and an input
    example (``example_frames`` as extended-XYZ rows)."""
    from hpo import serving

    tags = {k: str(v)[:5000] for k, v in lineage.items()}
    earlier = find_version(tracker, name, study.study_name, trial.number, None)
    if earlier is not None:
        for key, value in tags.items():
            tracker.client.set_model_version_tag(name, earlier.version, key, value)
        tracker.client.set_registered_model_alias(name, cfg.promote.alias, earlier.version)
        return earlier
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
                # Listing requirements ourselves skips MLflow's slow import-tracing subprocess. No code_paths:
                # the pyfunc imports nothing but the pinned hpo and its dependencies.
                pip_requirements=[f"{pkg}=={ver}" for pkg, ver in package_versions().items() if ver != "not installed"],
                signature=serving.signature(model_kind.pyfunc_outputs()),
                input_example=serving.structures_input(list(example_frames)) if len(example_frames) else None,
            )
    # mlflow.start_run(run_id=...) ends the run it resumed as FINISHED; Tracker.run sets the final status
    # MLflow prints "Successfully registered model ..." and "Created version ..."; hpo says it in one line
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    tracker.client.set_registered_model_alias(name, cfg.promote.alias, version.version)
    return version


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


# --------------------------------------------------------------------------- #
# stability gate (GAP)
# --------------------------------------------------------------------------- #
ENSEMBLES = ("nve", "nvt")


def screen_settings(cfg) -> dict | None:
    """``promote.screen`` checked, or None when screening is off (k = 0, or a model kind without MD)."""
    screen = cfg.promote.get("screen")
    if screen is None:
        return None
    k, steps, starts = screen.k, screen.steps, list(screen.start_frames)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise hpo_config.ConfigError(f"promote.screen.k={k!r} is not allowed: an integer >= 0 (0: no screening)")
    if k == 0 or not kind(cfg.model.kind).drives_md:
        return None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise hpo_config.ConfigError(f"promote.screen.steps={steps!r} is not allowed: an integer >= 1")
    if not starts or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in starts):
        raise hpo_config.ConfigError(f"promote.screen.start_frames={starts!r} is not allowed: indices into the validation file")
    if screen.ensemble not in ENSEMBLES:
        raise hpo_config.ConfigError(f"promote.screen.ensemble={screen.ensemble!r} is not allowed: one of {ENSEMBLES}")
    return {"k": k, "steps": steps, "start_frames": starts, "ensemble": str(screen.ensemble), "friction_per_fs": screen.get("friction_per_fs")}


def screen_md_config(cfg, screen: dict):
    """``cfg.md`` with the screen's steps and ensemble (the thermostat friction of ``promote.screen`` for NVT)."""
    md_cfg = OmegaConf.to_container(cfg.md, resolve=True)
    md_cfg.update(steps=screen["steps"], ensemble=screen["ensemble"])
    if screen["ensemble"] == "nvt" and md_cfg.get("friction_per_fs") is None:
        if screen["friction_per_fs"] is None:
            raise hpo_config.ConfigError("promote.screen.ensemble=nvt needs promote.screen.friction_per_fs (md.friction_per_fs is null)")
        md_cfg["friction_per_fs"] = screen["friction_per_fs"]
    return OmegaConf.create(md_cfg)


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


def screen_key(cfg, study, candidates, screen: dict | None) -> str:
    """What a screened promotion depends on: a repeated promote with the same key reuses its version."""
    from hpo.cache import digest

    if not screen:
        return "none"
    md_settings = OmegaConf.to_container(cfg.md, resolve=True)
    return digest("promote-screen", study.study_name, [t.number for t in candidates], screen, md_settings)[:16]


@dataclass
class Screened:
    """Outcome of the gate: tags and metrics of the chosen candidate's screen, its figures."""

    tags: dict[str, str]
    metrics: dict[str, float]
    figures: list[Path] = field(default_factory=list)


def screen_trial(cfg, trial, files: list[Path], data, screen: dict, ranges, tracker: Tracker, parent: str, outdir: Path, model_kind=None):
    """Short MD of one candidate from each screen start frame, in one nested MLflow run, judged with the
    bounds of ``md.stability`` widened by the training data, their RDF and the candidate's own uncertainty
    (its posterior written beside its model first).

    Returns (stable, why, metrics, figures): ``why`` names the first unstable start frame's verdict.
    """
    from hpo import md as hpo_md
    from hpo.models import md_kind
    from hpo.models.gap.gap_fit import load

    model_kind = model_kind or md_kind()
    md_cfg = screen_md_config(cfg, screen)
    files = model_kind.attach_posterior(cfg, with_values(hpo_config.model_params(cfg), trial.params), data, files)
    threshold = hpo_md.uncertainty_threshold(model_kind, files, data.val.frames, data.val.path.name, md_cfg)
    xml = next(p for p in files if p.suffix == ".xml")
    tags = {"command": "promote", "run_type": "md_screen", "trial": trial.number, "study": cfg.study.name}
    stable, why, metrics, figures, tags_out = True, "", {}, [], {}
    potential = load(xml)  # parsing the XML costs seconds: once per candidate
    with tracker.run(f"screen-trial{trial.number}", tags=tags, parent_run_id=parent) as run_id:
        for start in screen["start_frames"]:
            where = outdir / f"trial{trial.number}" / f"start{start}"
            found, trace, blow_up = hpo_md.run(data.val.frames[start], potential, md_cfg, where)
            title = f"screen: trial {trial.number}, {md_cfg.ensemble.upper()} from {data.val.path.name}[{start}]"
            along = hpo_md.uncertainty_along(model_kind, files, trace.frames, threshold)
            judged = hpo_md.judge_trace(trace, ranges, md_cfg, where, title, training=data.train.frames,
                                        train_name=data.train.path.name, along=along)
            plot = plots.md_plot(where / "md.png", trace.time_fs, trace.potential, trace.kinetic, trace.temperature, title)
            tracker.log(run_id, metrics={f"start{start}.{k}": v for k, v in {**found, **judged.metrics}.items()},
                        tags={f"start{start}.{k}": v for k, v in {**judged.tags, "blow_up": blow_up or "none"}.items()})
            tracker.log_artifacts(run_id, [where / "trajectory.xyz", where / "energies.csv", plot, *judged.files], f"start{start}")
            figures += [f for f in judged.files if f.suffix == ".png"] + [plot]
            for key, value in judged.metrics.items():
                metrics[f"start{start}.{key}"] = value
            if not judged.verdict.stable and stable:
                stable, why = False, f"start frame {start}: {judged.verdict.reason}"
                tags_out["md_first_unstable_step"] = str(judged.verdict.first_unstable_step)
        tags_out.update(md_stable=str(stable).lower(), md_stability_reason=why or "none")
        tracker.log(run_id, metrics={"md_stable": 1.0 if stable else 0.0}, tags=tags_out)
    print(f"[hpo] screen trial {trial.number} ({cfg.study.metric}={primary(trial):.5g}): "
          f"{'stable' if stable else 'UNSTABLE, ' + why} (MLflow run {run_id})", flush=True)
    return stable, why, metrics, figures


def screen_candidates(cfg, study, candidates, data, screen: dict, tracker: Tracker, parent: str, outdir: Path):
    """The gate: screen every candidate, then register the stable one ranked first (candidates come ranked: by the
    validation metric, or by cost within ``promote.within``); ``promote.trial``: that one, stable or not."""
    from hpo import stability

    if max(screen["start_frames"]) >= len(data.val):
        raise hpo_config.ConfigError(
            f"promote.screen.start_frames={screen['start_frames']} is not allowed: indices 0..{len(data.val) - 1} of {data.val.path.name}"
        )
    ranges = stability.training_ranges(data.train.frames)
    print(f"[hpo] screening {len(candidates)} candidate(s) of study {study.study_name!r} with {screen['steps']} "
          f"{screen['ensemble'].upper()} steps from validation frames {screen['start_frames']} (promote.screen)", flush=True)
    results = []
    for trial in candidates:
        files, workdir = model_files(cfg, study, trial, data)
        stable, why, metrics, figures = screen_trial(cfg, trial, files, data, screen, ranges, tracker, parent, outdir)
        results.append((trial, files, workdir, stable, why, metrics, figures))
    summary = "; ".join(f"trial {t.number}: {'stable' if ok else why}" for t, _, _, ok, why, _, _ in results)
    ranking = [t.number for t, _, _, ok, _, _, _ in results if ok]  # candidates come ranked: so are these
    for trial, files, workdir, stable, why, metrics, figures in results:
        tags = {"md_stable": str(stable).lower(), "md_stability_reason": why or "none", "screened": summary[:4900],
                "screen_settings": str(screen), "screen_stable_ranked": ", ".join(map(str, ranking)) or "none"}
        if stable:
            if len(ranking) > 1:
                print(f"[hpo] stable candidates, best first: trials {ranking}; registering trial {trial.number}", flush=True)
            return trial, files, workdir, Screened(tags, metrics, figures)
        if cfg.promote.trial is not None:
            print(f"[hpo] warning: promote.trial={trial.number} is not stable in MD ({why}); registering it as asked, "
                  "tagged md_stable=false", flush=True)
            return trial, files, workdir, Screened(tags, metrics, figures)
    rejected = [(t.number, why) for t, _, _, _, why, _, _ in results]
    lines = "\n".join(f"  trial {n}: {why}" for n, why in rejected)
    raise PromoteError(
        f"no stable candidate among the {len(candidates)} best trials of study {study.study_name!r} "
        f"(promote.screen: {screen['steps']} {screen['ensemble'].upper()} steps from validation frames {screen['start_frames']}):\n{lines}\n"
        "Nothing registered. Screen more candidates (promote.screen.k), run more trials, or register one anyway with promote.trial=N."
    )


# --------------------------------------------------------------------------- #
# test errors
# --------------------------------------------------------------------------- #
def calibrate(cfg, trial, files, data, test, model_kind, outdir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The registered model's predictive std against its errors (``hpo.calibration``): the scale fitted on the
    validation split, stored in the model (every std it reports is multiplied by it), and the z-scores and
    coverage on validation and test before and after it; the calibration plot's path in the tags."""
    from hpo import calibration

    model = with_values(hpo_config.model_params(cfg), trial.params)
    splits = {"val": data.val, **({"test": test} if test is not None else {})}
    pairs = {name: model_kind.calibration_pairs(cfg, model, files, split, data) for name, split in splits.items()}
    if any(found is None for found in pairs.values()):
        return {}, {}
    quantity = pairs["val"][2]
    plot = outdir / f"calibration_{quantity}.png"
    scale, found = calibration.calibrate(quantity, {name: (e, s) for name, (e, s, _) in pairs.items()}, plot,
                                         f"{model_kind.display_name} {quantity} std, trial {trial.number}")
    model_kind.set_std_scale(files, scale)
    return found, {"std_scale": f"{scale:.6g}", "calibration_plot": str(plot)}


def test_errors_of(cfg, study, trial, files, data, model_kind, outdir: Path | None = None, tracker: Tracker | None = None,
                   run_id: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The promoted model's test errors (and the hand-tuned default trial's, ``default_test_*``), with tags
    describing the split, and with ``outdir`` the calibration of its std (``calibrate``). The test set is read
    here, once per promotion, and by nothing else."""
    from hpo.cache import frame_digests
    from hpo.search.selection import default_trial

    test = load_test_set(cfg, data)
    calibrated, calibration_tags = calibrate(cfg, trial, files, data, test, model_kind, outdir) if outdir is not None else ({}, {})
    if test is not None and tracker is not None:
        tracker.log_datasets(run_id, {"test": test})
    if test is None:
        why = layout_of(cfg.dataset).no_test_reason()
        print(f"[hpo] no test split ({why}): the registered model has no test error", flush=True)
        return calibrated, {"test_split": "none", **calibration_tags}
    model = with_values(hpo_config.model_params(cfg), trial.params)
    found = model_kind.test_errors(cfg, model, files, test, data.val)
    split = hashlib.sha256("".join(frame_digests(test.frames)).encode()).hexdigest()
    source = cfg.dataset.get("test_file") or test.path
    tags = {"test_split": "frames of " + str(source) + (" not in " + data.train.path.name if cfg.dataset.get("test_excludes_train") else ""),
            "test_size": str(len(test)), "test_split_sha256": split}
    default = default_trial(study)
    if default is not None:
        if default.number == trial.number:
            found.update({f"default_{k}": v for k, v in found.items()})
        else:
            default_files, _ = model_files(cfg, study, default, data)
            default_model = with_values(hpo_config.model_params(cfg), default.params)
            found.update({f"default_{k}": v for k, v in model_kind.test_errors(cfg, default_model, default_files, test, data.val).items()})
        tags["default_trial"] = str(default.number)
    return {**found, **calibrated}, {**tags, **calibration_tags}


def print_test_summary(cfg, trial, found: dict[str, float], model_kind) -> None:
    metric = str(cfg.study.metric)
    name = "test_" + metric.removeprefix("val_")
    # the metric's unit from the figures config; a weighted loss of several targets has none
    unit = metric_unit(cfg) or "unitless"
    if name not in found:
        print(f"[hpo] validation {primary(trial):.5g}, test: none (no test split) ({unit})", flush=True)
        return
    line = f"[hpo] validation {primary(trial):.5g}, test {found[name]:.5g} ({unit}; {metric} / {name})"
    if f"default_{name}" in found:
        line += f"; hand-tuned default trial: test {found['default_' + name]:.5g}"
    print(line, flush=True)


def find_version(tracker: Tracker, name: str, study_name: str, trial_number: int, key: str | None, screened: bool = False):
    """An existing version of ``name`` made by a screened promotion with the same ``screen_key`` (same
    candidates and settings), or (``key`` None) from this very trial, and with ``screened`` only if it
    carries a stability verdict: a repeated promote reuses it."""
    try:
        versions = tracker.client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get("study") != study_name:
            continue
        if key is not None and version.tags.get("screen_key") == key:
            return version
        if key is None and version.tags.get("trial") == str(trial_number) and (not screened or "md_stable" in version.tags):
            return version
    return None

