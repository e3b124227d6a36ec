"""Tests of hpo.calibration: the std scale recovers a known factor, coverage before and after."""

from __future__ import annotations

import numpy as np
import pytest


def test_calibration_scale_recovers_a_known_factor():
    from hpo import calibration

    rng = np.random.default_rng(0)
    std = rng.uniform(0.01, 0.1, 4000)  # heteroscedastic: a GP's std varies frame to frame
    errors = 2.5 * std * rng.standard_normal(4000)  # the model's std is 2.5 x too small
    test_std = rng.uniform(0.01, 0.1, 4000)
    test_errors = 2.5 * test_std * rng.standard_normal(4000)
    scale, found = calibration.calibrate("energy", {"val": (errors, std), "test": (test_errors, test_std)})
    assert scale == pytest.approx(2.5, rel=0.03)
    assert found["test_energy_raw_coverage_1std"] < 0.4  # before: far below nominal
    assert found["test_energy_coverage_1std"] == pytest.approx(calibration.NOMINAL[1], abs=0.03)
    assert found["test_energy_coverage_2std"] == pytest.approx(calibration.NOMINAL[2], abs=0.02)
    assert found["test_energy_z_rms"] == pytest.approx(1.0, abs=0.05)
