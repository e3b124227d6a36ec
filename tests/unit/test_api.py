"""Tests of hpo.api: the champion as an ASE calculator."""

from __future__ import annotations

import pytest
from pathlib import Path

import mlflow
import numpy as np

# slow (pyproject.toml markers): the test runs on a promoted study (conftest, ~35 s to make)
pytestmark = pytest.mark.slow



def test_champion_as_an_ase_calculator(promoted, tiny_data):
    """``hpo.load_calculator`` on the registry URI gives quippy's energies and forces of the champion's XML."""
    import ase.io

    import hpo
    from hpo.models.gap import gap_fit

    cfg, lineage = promoted
    frames = ase.io.read(tiny_data / "gap_validate.xyz", ":2")
    calc = hpo.load_calculator("models:/water-gap@champion", tracking_uri=cfg.tracking.tracking_uri)
    energies, forces = [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (xml,) = list(model_dir.rglob(gap_fit.MODEL_FILE))
    reference_energies, reference_forces = gap_fit.predict(gap_fit.load(xml), frames)
    np.testing.assert_allclose(energies, reference_energies, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.concatenate(forces), np.concatenate(reference_forces), rtol=0, atol=1e-9)
    study = hpo.load_study(cfg.study.name, storage=cfg.study.storage)
    assert len(study.trials) == 2
