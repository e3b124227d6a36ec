"""hpo.data.checks on files as a user would bring them: the EMT set (exact gradients), its
corrupted copies, and the workshop water data (whose force column does not follow the geometry)."""

from __future__ import annotations

import math
from pathlib import Path

import ase.io
import numpy as np
import pytest

from emt_data import to_hartree_bohr, write_emt_dataset
from helpers import require_shared_water
from hpo.data import checks as dc
from hpo.data import read, report
from hpo.errors import DataCheckError

EMT_KEYS = read.Keys(energy="REF_energy", forces="REF_forces")
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def emt_files(tmp_path_factory) -> dict[str, Path]:
    return write_emt_dataset(tmp_path_factory.mktemp("emt"))


def read_splits(paths: dict[str, Path], prefix: str = "") -> dict[str, list]:
    return {split: ase.io.read(paths[f"{prefix}{split}"], ":") for split in SPLITS}


@pytest.fixture(scope="module")
def emt(emt_files) -> dict[str, list]:
    return read_splits(emt_files)


@pytest.fixture(scope="module")
def water() -> list:
    return ase.io.read(require_shared_water() / "gap_input_50.xyz", ":")  # fails, never skips, without the data


def test_keys_detected_on_emt_files(emt):
    keys, report = read.detect_keys(emt["train"])
    assert keys == EMT_KEYS
    assert "'REF_energy' (info" in report and "'REF_forces' (arrays" in report and "polarizability: none" in report


def test_keys_detected_on_water_including_the_calculator_energy(water):
    keys, report = read.detect_keys(water)
    assert keys == read.Keys(energy="energy", forces="force", polarizability="Polarizability")
    assert "'energy' (calc.results" in report


def test_explicit_keys_win(water):
    keys, report = read.detect_keys(water, {"forces": "forces"})
    assert keys.forces == "forces" and keys.energy == "energy"
    assert "in 0/50 frames" in report
    assert dc.keys_present({"water": water}, keys).verdict == "fail"


def test_emt_set_passes_every_check(emt):
    checks = dc.run_checks(emt, EMT_KEYS)
    assert [c.verdict for c in checks] == ["pass"] * len(checks), report.render_table(checks)
    consistent = next(c for c in checks if c.name == "forces_consistent")
    assert all(b["correlation"] < -0.7 for b in consistent.details["bond_test"].values())
    assert consistent.details["md_pairs"] >= 20 and consistent.details["work_relative_error"] < 0.01
    assert dc.exit_code(checks) == 0


def test_shuffled_forces_fail(emt_files):
    shuffled = read_splits(emt_files, "shuffled_forces_")
    check = dc.forces_consistent(shuffled, EMT_KEYS)
    assert check.verdict == "fail", check.message
    assert all(b["correlation"] > -0.3 for b in check.details["bond_test"].values())
    assert check.details["work_relative_error"] > 0.5
    assert dc.exit_code(dc.run_checks(shuffled, EMT_KEYS)) == 1


@pytest.mark.parametrize(
    "factor, bond_verdict",
    [(-1.0, "warn"), (1 / 51.42208619083232, "pass")],
    ids=["gradients_not_forces", "forces_in_hartree_per_bohr"],
)
def test_forces_of_wrong_sign_or_units_fail_the_energy_work_test(emt, factor, bond_verdict):
    scaled = {split: [f.copy() for f in frames] for split, frames in emt.items()}
    for frames in scaled.values():
        for frame in frames:
            frame.arrays["REF_forces"] *= factor
    check = dc.forces_consistent(scaled, EMT_KEYS)
    assert check.verdict == "fail" and check.details["work_relative_error"] > 0.9, check.message
    # The correlation ignores the scale but not the sign.
    assert ("do not pull stretched bonds back" in check.message) == (bond_verdict == "warn")
    assert ("wrong sign" in check.message) == (factor < 0)


def test_water_force_column_is_flagged(water):
    keys, _ = read.detect_keys(water)
    check = dc.forces_consistent({"gap_input_50.xyz": water}, keys)
    # Snapshots, not consecutive MD frames: only the bond test can speak, and it warns.
    assert check.verdict == "warn", check.message
    assert abs(check.details["bond_test"]["gap_input_50.xyz"]["correlation"]) < 0.1
    assert check.details["md_pairs"] == 0
    assert "gap_input_50.xyz" in check.message and "'force'" in check.message


def test_hartree_bohr_copy_converts_back_to_the_ev_twin(emt, emt_files):
    atomic = read_splits(emt_files, "hartree_bohr_")
    for split in SPLITS:
        converted = read.convert_units(atomic[split], EMT_KEYS, energy_unit="Hartree", length_unit="bohr")
        for twin, frame in zip(emt[split], converted):
            assert np.allclose(frame.positions, twin.positions, rtol=0, atol=1e-8)
            assert np.allclose(frame.cell.array, twin.cell.array, rtol=0, atol=1e-8)
            assert frame.info["REF_energy"] == pytest.approx(twin.info["REF_energy"], rel=0, abs=1e-8)
            # extxyz writes columns with 8 decimals: 0.5e-8 Hartree/Bohr is 2.6e-7 eV/A, on top of
            # the eV file's own rounding. The in-memory test below holds forces to 1e-8.
            assert np.allclose(frame.arrays["REF_forces"], twin.arrays["REF_forces"], rtol=0, atol=4e-7)


def test_unit_conversion_round_trip_in_memory(emt):
    frames = emt["train"]
    back = read.convert_units(to_hartree_bohr(frames), EMT_KEYS, "Hartree", "Bohr")
    for twin, frame in zip(frames, back):
        assert frame.calc is None
        assert np.abs(frame.positions - twin.positions).max() < 1e-8
        assert np.abs(frame.arrays["REF_forces"] - twin.arrays["REF_forces"]).max() < 1e-8
        assert abs(frame.info["REF_energy"] - twin.info["REF_energy"]) < 1e-8
    with pytest.raises(DataCheckError, match="unknown energy unit 'Hartreee'; allowed: eV"):
        read.convert_units(frames, EMT_KEYS, "Hartreee")


def test_nan_energy_fails_naming_the_frame(emt):
    broken = {split: [f.copy() for f in frames] for split, frames in emt.items()}
    broken["val"][3].info["REF_energy"] = math.nan
    check = dc.finite(broken, EMT_KEYS)
    assert check.verdict == "fail"
    assert "val frame 3: REF_energy=nan" in check.message
    assert check.details["problems"] == [{"split": "val", "frame": 3, "key": "REF_energy", "value": "nan", "count": 1}]
    # The other checks skip the bad frame instead of crashing or reporting it twice.
    assert [c.verdict for c in dc.run_checks(broken, EMT_KEYS) if c.name != "finite"] == ["pass"] * 6


def test_missing_forces_fail_naming_the_frame(emt):
    broken = {"train": [f.copy() for f in emt["train"]]}
    del broken["train"][5].arrays["REF_forces"]
    check = dc.keys_present(broken, EMT_KEYS)
    assert check.verdict == "fail" and "train frame 5: REF_forces missing" in check.message


def test_duplicate_frame_across_splits_fails_naming_indices(emt):
    splits = {split: list(frames) for split, frames in emt.items()}
    copy = emt["train"][7].copy()
    copy.positions += copy.cell.array[0]  # the same geometry one lattice vector away
    splits["test"] = splits["test"] + [copy]
    check = dc.duplicates(splits)
    assert check.verdict == "fail", check.message
    assert check.details["across"] == [{"train": [7], "test": [len(emt["test"])]}]
    assert f"train frames [7], test frames [{len(emt['test'])}]" in check.message

    within = dc.duplicates({"train": emt["train"] + [emt["train"][7]]})
    assert within.verdict == "warn" and within.details["within"] == [{"train": [7, len(emt["train"])]}]


def test_isolated_atoms_give_e0(emt):
    e0, others = read.split_isolated_atoms(emt["train"], EMT_KEYS, "emt_train.xyz")
    assert set(e0) == {"Al", "Cu"} and len(others) == len(emt["train"]) - 2
    assert e0 == {f.get_chemical_symbols()[0]: f.info["REF_energy"] for f in emt["train"][:2]}

    clash = emt["train"][1].copy()
    clash.info["REF_energy"] += 0.1
    with pytest.raises(DataCheckError, match=r"emt_train.xyz: isolated (Al|Cu) atoms disagree: frame 1 .* frame 2"):
        read.split_isolated_atoms(emt["train"][:2] + [clash], EMT_KEYS, "emt_train.xyz")


def test_outliers_are_warned(emt):
    splits = {split: [f.copy() for f in frames] for split, frames in emt.items()}
    splits["val"][2].info["REF_energy"] += 5.0 * len(splits["val"][2])
    splits["test"][4].arrays["REF_forces"][0] = [40.0, 0.0, 0.0]
    energy = dc.energy_outliers(splits, EMT_KEYS)
    force = dc.force_outliers(splits, EMT_KEYS)
    assert energy.verdict == "warn" and [(f["split"], f["frame"]) for f in energy.details["frames"]] == [("val", 2)]
    assert force.verdict == "warn" and [(f["split"], f["frame"]) for f in force.details["frames"]] == [("test", 4)]


def test_statistics_table_and_plot(emt, tmp_path):
    stats = {split: report.statistics(frames, EMT_KEYS) for split, frames in emt.items()}
    train = stats["train"]
    assert (train["frames"], train["isolated_atoms"], train["atoms_min"], train["atoms_max"]) == (38, 2, 1, 16)
    assert set(train["species"]) == {"Al", "Cu"} and train["force_max"] > train["force_rms"] > 0
    table = report.render_table(dc.run_checks(emt, EMT_KEYS), stats)
    assert "forces_consistent  PASS" in table and "0 failed, 0 warnings" in table and "eV/atom" in table
    path = report.distributions_plot(tmp_path / "emt.png", emt["train"], EMT_KEYS, "EMT train")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
