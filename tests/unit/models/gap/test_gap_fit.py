"""Tests of hpo.models.gap.gap_fit: the gap_fit command line, sparse index files, the descriptor memory
estimate and bound, e0_method=average, gap_fit crashing or killed by a signal."""

from __future__ import annotations

from types import SimpleNamespace
import subprocess
import time
import os
import math

import ase.io
import numpy as np
import pytest

from hpo.models.gap import gap_fit as gap, gap_fit
from hpo.config import load_config, model_params
from hpo.data import load_datasets
from hpo.search.objective import score

from helpers import GAP_PARAMS, files_overrides, make_cfg


def test_index_file_is_one_based(tmp_path):
    path = gap.write_sparse_index_file(tmp_path / "s.idx", [0, 7, 3])
    assert path.read_text() == "1\n8\n4\n"
    np.testing.assert_array_equal(gap.read_sparse_index_file(path), [0, 7, 3])


def test_cutoff_bound_is_sane_for_the_real_data(tiny_data):
    """The bound refuses the cutoff that killed gap_fit (100 Å: "Error allocating 58318997256 bytes") and
    lets the search space of conf/search/gap.yaml through on the largest training set."""
    from hpo.models.gap import gap_fit

    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    defaults = {"n_max": 4, "l_max": 6, "fit_forces": True}  # gap_fit fitting forces: gradients kept
    assert gap_fit.descriptor_memory_bytes({**defaults, "cutoff": 100.0}, frames) > 58318997256
    assert 15 < gap_fit.largest_cutoff({**defaults, "cutoff": 5.0}, frames, 16e9) < 40
    frames_400 = frames * 40  # the density and atoms of 400 water frames
    assert gap_fit.descriptor_memory_bytes({**defaults, "n_max": 8, "l_max": 8, "cutoff": 6.0}, frames_400) < 16e9


def test_numpy_solver_without_forces_has_no_gradient_bound(tiny_data):
    """hpo's numpy solver keeps no descriptor gradients unless force metrics are asked for."""
    from hpo.models.gap import gap_fit

    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    numpy_energy = {"n_max": 4, "l_max": 6, "cutoff": 100.0, "solver": "numpy", "fit_forces": False}
    assert gap_fit.descriptor_memory_bytes(numpy_energy, frames) < 1e7
    assert gap_fit.descriptor_memory_bytes({**numpy_energy, "fit_forces": True}, frames) > 1e10


def test_descriptor_estimate_matches_gap_fit(tiny_data, tmp_path):
    """The estimate is within 1.5x (above) of the descriptor arrays gap_fit lists for a real fit."""
    import re

    from hpo.models.gap import gap_fit

    cfg = load_config([f"dataset.data_dir={tiny_data}", "model.solver=gap_fit", "model.fit_forces=true", "model.n_max=2", "model.l_max=2", "model.n_sparse=20", "model.cutoff=3.0"])
    params = model_params(cfg)
    fitted = gap_fit.GAP(params, dict(cfg.dataset.e0), cfg.dataset.property_keys).fit(tiny_data / "gap_input_50.xyz", tmp_path)
    printed = (tmp_path / "gap_fit.out").read_text()
    arrays = re.findall(r"^Descriptor \d+ :: x(?:Prime)? +(\d+) +(\d+) +memory", printed, re.M)
    assert len(arrays) == 4
    actual = sum(8 * int(rows) * int(cols) for rows, cols in arrays)
    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    estimate = gap_fit.descriptor_memory_bytes(params, frames)
    assert actual <= estimate <= 1.5 * actual
    assert fitted.model_file_.is_file()


def test_gap_fit_killed_by_a_signal_is_named(tmp_path):
    """gap_fit killed by SIGKILL (what the kernel's OOM killer sends) mid-fit: the trial's reason is "killed"
    and the message names the signal and the likely cause, not a generic exit code."""
    from types import SimpleNamespace

    import ase.io

    from hpo.models.gap.gap_fit import GAP, GapFitError

    from helpers import require_shared_water

    ase.io.write(tmp_path / "train.xyz", ase.io.read(require_shared_water() / "gap_input_50.xyz", ":10"), format="extxyz")
    params = dict(descriptor="soap", l_max=6, n_max=8, atom_sigma=0.5, cutoff=5.0, cutoff_transition_width=1.0, central_weight=1.0,
                  n_sparse=100, delta=1.0, covariance_type="dot_product", zeta=2, sparse_method="cur_points",
                  default_sigma=dict(energy=0.01, force=0.5, virial=0.0, hessian=0.0), sparse_jitter=1e-8, fit_timeout_s=300)

    def kill_gap_fit(stop) -> None:  # beside the fit: the child named gap_fit of this process, as the OOM killer would
        while subprocess.run(["pkill", "-KILL", "-P", str(os.getpid()), "gap_fit"]).returncode != 0 and not stop():
            time.sleep(0.05)

    with pytest.raises(GapFitError) as raised:
        GAP(params, {"H": -13.6, "O": -2041.8}, SimpleNamespace(energy="energy", force="force"), energy_only=True).fit(
            tmp_path / "train.xyz", tmp_path / "fit", while_fitting=kill_gap_fit)
    assert raised.value.reason == "killed"
    assert "gap_fit killed by SIGKILL, likely out of memory" in str(raised.value)


def test_build_command_spells_every_gap_fit_argument():
    keys = SimpleNamespace(energy="energy", force="force")
    command = gap_fit.build_command(GAP_PARAMS, "train.xyz", {"O": -2026.4, "H": -12.1}, keys, seed=0)
    assert command[0] == "gap_fit" and "at_file=train.xyz" in command
    gap = next(a for a in command if a.startswith("gap="))
    assert gap.startswith("gap={soap l_max=6 n_max=4 atom_sigma=0.3 cutoff=5.0")
    assert "default_sigma={0.01 0.5 0.0 0.0}" in command
    assert "e0={H:-12.1:O:-2026.4}" in command  # species sorted
    assert "rnd_seed=1" in command  # gap_fit aborts on rnd_seed=0
    assert not any(a.startswith("config_file") for a in command)  # would silence every other argument
    energy_only = gap_fit.build_command(GAP_PARAMS, "train.xyz", {"H": 0.0}, keys, seed=0, energy_only=True)
    assert f"force_parameter_name={gap_fit.NO_FORCE_KEY}" in energy_only


def _fit(cfg, workdir):
    return score(cfg, model_params(cfg), load_datasets(cfg), workdir).metrics


@pytest.mark.slow
def test_e0_average_is_passed_to_gap_fit_and_matched_by_the_numpy_solver(emt, tmp_path):
    from hpo.models.gap.sparse_gap import SparseGap

    base = [*files_overrides(emt, test=False), "dataset.e0=average", "model.fit_forces=false"]
    found = _fit(make_cfg(tmp_path, *base, "model.solver=gap_fit"), tmp_path / "gap_fit")
    command = (tmp_path / "gap_fit" / "gap_fit.cmd").read_text()
    assert "e0_method=average" in command and "e0={" not in command
    assert math.isfinite(found["val_loss"]) and "val_force_rmse" not in found
    assert found["val_loss"] == pytest.approx(found["val_energy_rmse_per_atom"] / found["loss_energy_scale"])
    _fit(make_cfg(tmp_path, *base, "model.solver=numpy"), tmp_path / "numpy")
    data = load_datasets(make_cfg(tmp_path, *base))
    mean = np.mean(data.train.energies / data.train.n_atoms)  # gap_fit's average: of energy per atom over frames
    for solver in ("gap_fit", "numpy"):
        e0 = SparseGap.read(tmp_path / solver / "gap.xml").e0
        assert e0[13] == pytest.approx(mean, rel=1e-10) and e0[29] == pytest.approx(mean, rel=1e-10), solver
