"""Tests of hpo.data.check_command: the data-check command in process and optimize's pre-fit checks, on the EMT set."""

from __future__ import annotations

import ase.io
import pytest

from hpo.data import DataError, check_command
from hpo.search import loop

from helpers import files_overrides, last_check_run, make_cfg


def _check_exit(cfg) -> int:
    try:
        check_command.check_command(cfg)
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.slow
def test_data_check_fails_on_nan_and_cross_split_duplicate_and_flags_shuffled_forces(emt, tmp_path, capsys, mlruns):
    frames = ase.io.read(emt["val"], ":")
    frames[3].info["REF_energy"] = float("nan")
    nan_val = tmp_path / "nan_val.xyz"
    ase.io.write(nan_val, frames, format="extxyz")
    cfg = make_cfg(tmp_path / "nan", *mlruns, "dataset=files", f"dataset.train={emt['train']}", f"dataset.val={nan_val}")
    assert _check_exit(cfg) == 1
    assert "finite" in capsys.readouterr().out
    assert last_check_run(cfg).data.tags["check.finite"] == "fail"
    # optimize stops before any fit, naming the file, the frame and the value
    with pytest.raises(DataError, match=r"nan_val\.xyz, frame 3: energy 'REF_energy' is not finite: nan"):
        loop.run(cfg)
    assert not (tmp_path / "nan" / "experiments" / cfg.study.name).exists()

    val = ase.io.read(emt["val"], ":") + [ase.io.read(emt["train"], "5")]
    leaked = tmp_path / "leaked_val.xyz"
    ase.io.write(leaked, val, format="extxyz")
    cfg = make_cfg(tmp_path / "dup", *mlruns, "dataset=files", f"dataset.train={emt['train']}", f"dataset.val={leaked}")
    assert _check_exit(cfg) == 1
    assert last_check_run(cfg).data.tags["check.duplicates"] == "fail"

    cfg = make_cfg(tmp_path / "shuffled", *mlruns, *files_overrides(emt, "shuffled_forces_"))
    assert _check_exit(cfg) == 1  # energy changes of consecutive MD frames contradict the work of these forces
    assert last_check_run(cfg).data.tags["check.forces_consistent"] == "fail"
    # optimize runs the same checks after reading the data and stops before any fit with the check's message
    with pytest.raises(DataError, match="data check failed: forces_consistent") as refused:
        loop.run(cfg)
    assert "To fit energies only: model.fit_forces=false" in str(refused.value)
    assert not (tmp_path / "shuffled" / "experiments" / cfg.study.name).exists()
    # forces that do not enter the fit cannot spoil it: the same check only warns, and the study runs
    energy_only = make_cfg(tmp_path / "energy_only", *mlruns, *files_overrides(emt, "shuffled_forces_"), "model.fit_forces=false", "study.n_trials=1")
    assert check_command.preflight(energy_only)["check.forces_consistent"] == "warn"


@pytest.mark.slow
def test_data_check_on_given_files(emt, tmp_path, mlruns):
    cfg = make_cfg(tmp_path, *mlruns, f"data.files=[{emt['train']},{emt['val']}]")
    assert _check_exit(cfg) == 0
    tags = last_check_run(cfg).data.tags
    assert tags["run_type"] == "data_check" and tags["check.keys_present"] == "pass"
