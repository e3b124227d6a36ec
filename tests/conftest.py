"""Shared fixtures: tiny slices of the water data and an isolated output tree per test.

The slices are written to a temporary directory (never into the repo), so
every test exercises the real gap_fit, quippy, Optuna storage and MLflow store
in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import ase.io
import pytest

from hpo.config import load_config, output_overrides

SHARED_WATER = Path(os.environ.get("HPO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "water"))

# Cheap GAP settings: a fit on 10 frames takes about a second.
TINY_GAP = ["model.n_max=2", "model.l_max=2", "model.n_sparse=20", "model.cutoff=3.0", "search=gap_small"]


def require_shared_water() -> Path:
    if not (SHARED_WATER / "gap_input_50.xyz").is_file():
        pytest.skip(f"water data not found in {SHARED_WATER} (set HPO_DATA_DIR)")
    return SHARED_WATER


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data directory with 10/14 training frames and 6 validation frames, named like the real files."""
    source = require_shared_water()
    target = tmp_path_factory.mktemp("tiny_water")
    train = ase.io.read(source / "gap_input_100.xyz", ":14")
    ase.io.write(target / "gap_input_50.xyz", train[:10], format="extxyz")
    ase.io.write(target / "gap_input_100.xyz", train, format="extxyz")
    ase.io.write(target / "gap_validate.xyz", ase.io.read(source / "gap_validate.xyz", ":6"), format="extxyz")
    return target


@pytest.fixture
def tiny_overrides(tiny_data, tmp_path) -> list[str]:
    return [f"dataset.data_dir={tiny_data}", *output_overrides(tmp_path), *TINY_GAP]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    def make(*extra: str):
        return load_config([*tiny_overrides, *extra])

    return make
