"""A model into the MLflow model registry: an MLflow pyfunc logged from code (the kind's ``pyfunc.py``; nothing
pickled) whose artifacts hold what the kind bundles (``ModelKind.bundle``), a version with lineage tags and the
alias, or the version a trial or a screened promotion already has."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from hpo import serving
from hpo.models.base import ModelKind
from hpo.registry.resolve import MODEL_DIR
from hpo.tracking import Tracker, package_versions


def register(cfg, tracker: Tracker, run_id: str, name: str, study, trial, files: list[Path], model_kind: ModelKind, lineage: dict,
             example_frames=()):
    """Log the model's files as a pyfunc under ``run_id`` and register a version (or retag the version this
    trial already has, e.g. promoted earlier without screening); point the alias at it.

    The pyfunc carries what loading it elsewhere and serving it need: requirements pinned to the running
    versions, hpo's own included (the pyfunc code imports hpo), a signature (``hpo.serving``) and an input
    example (``example_frames`` as extended-XYZ rows)."""
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
        model_kind.bundle(files, bundle)
        mlflow.set_tracking_uri(tracker.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(model_kind.pyfunc_code),
                artifacts={MODEL_DIR: str(bundle)},
                # Listing requirements ourselves skips MLflow's slow import-tracing subprocess. No code_paths:
                # the pyfunc imports nothing but the pinned hpo and its dependencies.
                pip_requirements=requirements(model_kind),
                signature=serving.signature(model_kind.pyfunc_outputs()),
                input_example=serving.structures_input(list(example_frames)) if len(example_frames) else None,
            )
    # mlflow.start_run(run_id=...) ends the run it resumed as FINISHED; Tracker.run sets the final status
    # MLflow prints "Successfully registered model ..." and "Created version ..."; hpo says it in one line
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    tracker.client.set_registered_model_alias(name, cfg.promote.alias, version.version)
    return version


def requirements(model_kind: ModelKind) -> list[str]:
    """hpo's stack and the kind's own distributions, pinned at their installed versions; a kind's without its local
    build label (torch's ``+cpu`` names the index its wheel came from, not the release: any build of it will do)."""
    found = package_versions(model_kind.pyfunc_requirements).items()
    return [f"{pkg}=={ver.split('+')[0] if pkg in model_kind.pyfunc_requirements else ver}" for pkg, ver in found if ver != "not installed"]


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
