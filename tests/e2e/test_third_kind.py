"""A third model kind, added as one folder (hpo/models/ridge/), its conf files and one registry line, runs every
command a kind takes part in: optimize, promote (with the MD screen its calculator drives), md and report, on
the EMT set of emt_data.py. Real Optuna, MLflow and ASE; nothing mocked."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from emt_data import write_emt_dataset
from hpo import md
from hpo.analysis import report
from hpo.config import load_config, output_overrides
from hpo.models import kind
from hpo.models.ridge.kind import RidgeCalculator, RidgeModel
from hpo.registry.promote import promote
from hpo.search import loop

pytestmark = pytest.mark.slow


def test_ridge_forces_are_the_gradient_of_its_energy():
    """The calculator's analytic forces against central differences of its energy (what MD integrates)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.numbers[:3] = 13
    atoms.rattle(0.1, seed=1)
    model = RidgeModel(np.array([13, 29]), 4.0, 1.5, 6, np.random.default_rng(0).normal(size=2 + 3 * 6))
    atoms.calc = RidgeCalculator(model)
    forces = atoms.get_forces()
    step, numeric = 1e-5, np.zeros_like(forces)
    for i in range(len(atoms)):
        for axis in range(3):
            shifted = [atoms.copy() for _ in range(2)]
            for sign, frame in zip((1, -1), shifted):
                frame.positions[i, axis] += sign * step
            plus, minus = model.energies(shifted)
            numeric[i, axis] = -(plus - minus) / (2 * step)
    np.testing.assert_allclose(forces, numeric, atol=1e-6)


def test_ridge_kind_runs_optimize_promote_md_and_report(tmp_path):
    emt = write_emt_dataset(tmp_path / "emt")
    base = [*output_overrides(tmp_path), "dataset=files", f"dataset.train={emt['train']}", f"dataset.val={emt['val']}",
            f"dataset.test={emt['test']}", "model=ridge"]
    study = loop.run(load_config([*base, "study.n_trials=3"]))
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3

    lineage = promote(load_config([*base, "promote.screen.k=2", "promote.screen.steps=10"]))
    assert lineage["name"] == "files-ridge" and lineage["param.kind"] == "ridge"
    assert lineage["md_stable"] == "true" and float(lineage["test_energy_rmse"]) > 0

    result = md.main(load_config([*base, "md.steps=10"]))  # models:/files-ridge@champion, the kind's calculator
    assert result["steps_completed"] == 10 and result["md_stable"]
    assert kind("ridge").drives_md

    page = report.write_report(load_config(base))
    assert "parity_energy.png" in {path.name for path in page.figures} and page.html.is_file()
