"""Shared fixtures: tiny slices of the water data and an isolated output tree per test.

The slices are written to a temporary directory (never into the repo), so
every test exercises the real gap_fit, quippy, Optuna storage and MLflow store
in seconds.
"""

from __future__ import annotations

from pathlib import Path
import shutil

import ase.io
import pytest

from hpo.config import load_config, output_overrides
from hpo.data import shared_frames

from helpers import TINY_GAP, require_shared_water, TINY_SAGPR
from emt_data import write_emt_dataset

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data directory named like the real files: 10/14 training frames, 6 validation frames, and a
    "400" file of the 14 training frames plus 6 others (the test split of the 10- and 14-frame sets)."""
    source = require_shared_water()
    target = tmp_path_factory.mktemp("tiny_water")
    train = ase.io.read(source / "gap_input_100.xyz", ":14")
    ase.io.write(target / "gap_input_50.xyz", train[:10], format="extxyz")
    ase.io.write(target / "gap_input_100.xyz", train, format="extxyz")
    pool = ase.io.read(source / "gap_input_400.xyz", ":40")
    seen = {j for _, j in shared_frames(train, pool)}
    others = [atoms for j, atoms in enumerate(pool) if j not in seen][:6]
    ase.io.write(target / "gap_input_400.xyz", train + others, format="extxyz")
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


@pytest.fixture
def sagpr_cfg(tiny_data, tmp_path):
    base = [f"dataset.data_dir={tiny_data}", *output_overrides(tmp_path), *TINY_SAGPR]
    return lambda *extra: load_config([*base, *extra])


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny data set, free to be damaged."""
    target = tmp_path / "data"
    shutil.copytree(tiny_data, target)
    return target


@pytest.fixture(scope="module")
def emt(tmp_path_factory) -> dict[str, Path]:
    return write_emt_dataset(tmp_path_factory.mktemp("emt"))


@pytest.fixture(scope="module")
def mlruns(tmp_path_factory) -> list[str]:
    """One MLflow store for the data-check tests: creating a store costs ~10 s."""
    root = tmp_path_factory.mktemp("mlruns")
    return [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_location={root}/artifacts"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch in the test process on one thread for the module (2 shared cores), like MACE's training child
    (OMP_NUM_THREADS=1): the predictions, calculator and MD a MACE test runs in this process. With torch's default
    (a thread per core), a second busy process on the machine made them several times slower: the promote step
    of tests/e2e/test_mace.py took 12-20 s instead of 2.3 s, its 10 MD steps 4 s instead of 0.7 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def promoted_emt_gap(tmp_path_factory) -> dict:
    """A one-trial GAP study on the EMT set, screened (10 MD steps) and promoted as files-gap@champion, once per
    session: ``root`` (the output root), ``emt`` (the split files), ``lineage`` (promote's return) and ``printed``
    (what promote printed). Shared by the promote and compare tests, which only read it or add other models."""
    import contextlib
    import io

    from hpo.registry.promote import promote
    from hpo.search import loop
    from helpers import files_overrides, make_cfg

    emt = write_emt_dataset(tmp_path_factory.mktemp("emt-promoted"))
    root = tmp_path_factory.mktemp("promoted")
    cfg = make_cfg(root, *files_overrides(emt), "study.n_trials=1", "promote.screen.k=1", "promote.screen.steps=10")
    loop.run(cfg)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        lineage = promote(cfg)
    return {"root": root, "emt": emt, "lineage": lineage, "printed": printed.getvalue()}
