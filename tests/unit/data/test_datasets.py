"""Tests of hpo.data: each bad data file fails before any fit with a message naming the file, frame and key;
dataset=files|pool: keys, units, e0, seeded disjoint splits written for gap_fit."""

from __future__ import annotations

import ase.io
import pytest
import numpy as np

from hpo import config as hpo_config
from hpo.data import DataError, load_datasets, read_frames, load_test_set, shared_frames
from hpo.config import load_config, model_params
from hpo.search.objective import score

from helpers import files_overrides, make_cfg


@pytest.fixture
def water_frames(tiny_data):
    return ase.io.read(tiny_data / "gap_input_50.xyz", ":3")


def write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


def test_missing_energy_names_file_frame_and_key(tmp_path, water_frames):
    del water_frames[1].calc.results["energy"]
    path = write(tmp_path / "bad.xyz", water_frames)
    keys = hpo_config.load_config().dataset.property_keys
    with pytest.raises(DataError, match=r"bad.xyz, frame 1: energy key 'energy' is missing"):
        read_frames(path, keys)


def test_wrong_force_shape(tmp_path, water_frames):
    keys = hpo_config.load_config().dataset.property_keys
    path = tmp_path / "bad.xyz"
    write(path, water_frames)
    text = path.read_text().replace("force:R:3", "force:R:2", 1)
    lines = text.splitlines()
    # drop the last force column of frame 0's atoms so the file stays well-formed
    n = int(lines[0])
    lines[2 : 2 + n] = [" ".join(line.split()[:-1]) for line in lines[2 : 2 + n]]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.xyz, frame 0: force column 'force' has shape \(12, 2\), expected \(12, 3\)"):
        read_frames(path, keys)


def test_species_without_e0(tmp_path, water_frames):
    water_frames[0].numbers[0] = 6
    path = write(tmp_path / "carbon.xyz", water_frames)
    keys = hpo_config.load_config().dataset.property_keys
    with pytest.raises(DataError, match=r"carbon.xyz, frame 0: species \['C'\] have no e0"):
        read_frames(path, keys, e0={"H": -12.1, "O": -2026.4})


def test_malformed_and_missing_files(tmp_path):
    keys = hpo_config.load_config().dataset.property_keys
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("12\nnot an extxyz comment\nO 0 0\n")
    with pytest.raises(DataError, match="garbage.xyz is not a readable extended XYZ file"):
        read_frames(garbage, keys)
    with pytest.raises(DataError, match="does not exist"):
        read_frames(tmp_path / "absent.xyz", keys)


def test_data_dir_without_the_files(tiny_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"dataset.data_dir .*empty lacks gap_input_50.xyz, gap_validate.xyz"):
        load_datasets(tiny_cfg(f"dataset.data_dir={empty}"))


def test_unreadable_file(tmp_path):
    """A path that exists but cannot be read as a file (root reads any mode, so a directory stands in)."""
    (tmp_path / "gap_validate.xyz").mkdir()
    keys = load_config().dataset.property_keys
    with pytest.raises(DataError, match=r"data file .*gap_validate.xyz is not a readable file"):
        read_frames(tmp_path / "gap_validate.xyz", keys)


def test_files_are_converted_split_and_written_for_gap_fit(emt, tmp_path):
    cfg = make_cfg(tmp_path, *files_overrides(emt))
    data = load_datasets(cfg)
    assert len(data.train) == 36 and len(data.val) == 9  # the 2 isolated atoms left the training set
    assert data.keys.energy == "REF_energy" and data.keys.force == "REF_forces"
    assert set(data.e0) == {"Al", "Cu"} and not data.e0_average
    written = ase.io.read(data.train.path, ":")
    assert data.train.path.parent.parent.name == "datasets" and len(written) == 36
    assert np.allclose([a.info["REF_energy"] for a in written], data.train.energies)
    test = load_test_set(cfg, data)
    assert len(test) == 9
    assert not shared_frames(data.train.frames, test.frames) and not shared_frames(data.val.frames, test.frames)


def test_missing_key_names_file_frame_and_key(emt, tmp_path):
    frames = ase.io.read(emt["train"], ":")
    del frames[7].arrays["REF_forces"]
    broken = tmp_path / "broken_train.xyz"
    ase.io.write(broken, frames, format="extxyz")
    cfg = make_cfg(tmp_path, "dataset=files", f"dataset.train={broken}", f"dataset.val={emt['val']}")
    with pytest.raises(DataError, match=r"broken_train\.xyz, frame 7: per-atom force column 'REF_forces' is missing"):
        load_datasets(cfg)
    cfg = make_cfg(tmp_path, *files_overrides(emt, test=False), "dataset.keys.energy=TotEnergy")
    with pytest.raises(DataError, match=r"emt_train\.xyz, frame 0: energy key 'TotEnergy' is missing \(dataset.keys.energy.*stores.*REF_energy"):
        load_datasets(cfg)


def test_e0_from_isolated_atoms_needs_them(emt, tmp_path):
    cfg = make_cfg(tmp_path, "dataset=files", f"dataset.train={emt['val']}", f"dataset.val={emt['test']}")
    with pytest.raises(DataError, match=r"no isolated-atom frame for Al, Cu.*dataset.e0=average"):
        load_datasets(cfg)
    data = load_datasets(make_cfg(tmp_path, "dataset=files", f"dataset.train={emt['val']}", f"dataset.val={emt['test']}", "dataset.e0={Al: 3.0, Cu: 3.5}"))
    assert data.e0 == {"Al": 3.0, "Cu": 3.5}


def test_pool_split_is_disjoint_and_reproducible(emt, tmp_path):
    pool = ["dataset=pool", f"dataset.files=[{emt['train']},{emt['val']},{emt['test']}]", "dataset.split.val=0.2", "dataset.split.test=0.2"]

    def splits(*extra):
        cfg = make_cfg(tmp_path, *pool, *extra)
        data = load_datasets(cfg)
        test = load_test_set(cfg, data)
        return data, test

    data, test = splits()
    assert (len(data.train), len(data.val), len(test)) == (32, 11, 11)  # 54 frames: isolated atoms out
    for a, b in ((data.train, data.val), (data.train, test), (data.val, test)):
        assert not shared_frames(a.frames, b.frames)
    again, _ = splits()
    assert [a.positions.tolist() for a in again.val.frames] == [a.positions.tolist() for a in data.val.frames]
    other, _ = splits("dataset.split.seed=1")
    assert [a.positions.tolist() for a in other.val.frames] != [a.positions.tolist() for a in data.val.frames]
    small, small_test = splits("dataset.train_size=10")
    assert len(small.train) == 10 and len(shared_frames(small.train.frames, data.train.frames)) == 10
    assert len(shared_frames(small.val.frames, data.val.frames)) == len(data.val) and len(small_test) == len(test)


def _fit(cfg, workdir):
    return score(cfg, model_params(cfg), load_datasets(cfg), workdir).metrics


@pytest.mark.slow
def test_hartree_bohr_file_gives_the_same_metrics(emt, tmp_path):
    ev = _fit(make_cfg(tmp_path / "ev", *files_overrides(emt, test=False)), tmp_path / "ev" / "fit")
    au_cfg = make_cfg(
        tmp_path / "au", *files_overrides(emt, "hartree_bohr_", test=False), "dataset.units.energy=Hartree", "dataset.units.length=Bohr"
    )
    au = _fit(au_cfg, tmp_path / "au" / "fit")
    compared = [k for k in ev if "rmse" in k or "mae" in k or k.endswith("loss")]
    assert "val_force_rmse" in compared and "val_loss" in compared
    for key in compared:
        assert au[key] == pytest.approx(ev[key], rel=1e-6), key
