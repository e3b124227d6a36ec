"""Registered models back from the MLflow registry: a folder of model files and the version's lineage.

``md`` and ``polarize`` take ``models:/name@alias``, ``models:/name/version`` or a local path.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from hpo.redact import redact

# Name of the pyfunc artifact that holds the model's own files.
MODEL_DIR = "model_files"  # name of the pyfunc artifact that holds the model's own files


def for_kind(template: str, kind_name: str) -> str:
    """A registered model's name or URI from its config template: ``{kind}`` is the model kind's name
    (``promote.registered_model``: ``water-{kind}`` -> ``water-gap``); a URI without it is returned as given."""
    return str(template).replace("{kind}", kind_name)


class PromoteError(RuntimeError):
    """Nothing to promote, or a model URI that does not resolve."""


def resolve_model(uri: str, tracking_uri: str, workdir: Path) -> Path:
    """A folder holding the model's files, for a local path or any MLflow model URI."""
    local = Path(uri).expanduser()
    if local.exists():
        return local.parent if local.is_file() else local
    mlflow.set_tracking_uri(tracking_uri)
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir)))
    except (MlflowException, OSError) as exc:
        raise PromoteError(
            f"model {uri!r} does not resolve in {redact(tracking_uri)}: {exc}. Promote a study first "
            "(`hpo promote study.name=...`) or give a local model file."
        ) from exc
    found = [p for p in root.rglob(MODEL_DIR) if p.is_dir()]
    if not found:
        raise PromoteError(f"model {uri!r} holds no {MODEL_DIR}/ folder: not a model promoted by hpo")
    return found[0]


def version_tags(uri: str, tracking_uri: str) -> dict[str, str]:
    """Lineage tags of a registered version (empty for local files and runs:/ URIs)."""
    if not uri.startswith("models:/"):
        return {}
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    path = uri.removeprefix("models:/")
    try:
        if "@" in path:  # models:/name@alias
            name, alias = path.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:  # models:/name/version
            name, number = path.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError):
        return {}
    return dict(version.tags, registered_model=name, version=version.version)

