"""Fixtures of the hpo.analysis tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory) -> list[str]:
    """One MLflow store for the module: creating one costs seconds, and each test finds its runs by parent id."""
    root = tmp_path_factory.mktemp("mlruns")
    return [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_location={root}/artifacts"]
