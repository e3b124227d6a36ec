"""Each bad input fails before any fit, with a message that names what is wrong."""

from __future__ import annotations

import subprocess
import sys

import ase.io
import pytest

from hpo import config as hpo_config
from hpo.search import loop, space, storage
from hpo.data import DataError, load_datasets, read_frames
from hpo.config import ConfigError


@pytest.fixture
def water_frames(tiny_data):
    return ase.io.read(tiny_data / "gap_input_50.xyz", ":3")


def write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.cutoff=-1.0", "model.cutoff=-1.0 is not allowed: a positive number"),
        ("model.n_max=0", "model.n_max=0 is not allowed: an integer >= 1"),
        ("model.atom_sigma=6.0", "model.atom_sigma=6.0 is not allowed: smaller than the cutoff"),
        ("model.covariance_type=cosine", "model.covariance_type='cosine' is not allowed: one of"),
        ("study.sampler=annealing", "study.sampler='annealing' is not allowed: one of ('tpe', 'random', 'grid')"),
        ("promote.screen.ensemble=npt", "promote.screen.ensemble='npt' is not allowed: one of ('nve', 'nvt')"),
        ("spectrum.correction=quantum", "spectrum.correction='quantum' is not allowed: one of ('harmonic',)"),
        ("model.kind=nequip", "model.kind='nequip' is not allowed"),
        ("dataset.train_size=75", "dataset.train_size=75 is not allowed: one of [50, 100, 200, 400]"),
        ("search.space.cutoff.low=seven", "search.space.cutoff.low='seven' is not allowed: a number"),
        ("search.space.cutoff.low=7.0", "search.space.cutoff.low=7.0 is not allowed: low <= high"),
        ("++search.space.cutoff={type:float,low:-1.0,high:3.0,log:true}", "search.space.cutoff.low=-1.0 is not allowed: a positive number when log"),
        ("search.space.n_max.low=0", "search.space.n_max.low=0 is not allowed: a value model.n_max may take"),
        ("+search.space.bogus={type:float,low:0,high:1}", "search.space.bogus="),
    ],
)
def test_config_errors_name_key_value_and_allowed(tiny_cfg, override, message):
    with pytest.raises(ConfigError) as error:
        hpo_config.validate(tiny_cfg(override))
    assert message in str(error.value)


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


def test_storage_that_cannot_be_opened(tiny_cfg):
    cfg = tiny_cfg("study.storage=sqlite:////proc/no/such/dir/optuna.db")
    with pytest.raises(storage.StudyError, match=r"study.storage='sqlite:////proc/no/such/dir/optuna.db' cannot be opened"):
        storage.open_study(cfg, space.search_space(cfg))


def test_changed_search_space_names_parameter(tiny_cfg):
    loop.run(tiny_cfg("study.n_trials=1"))
    cfg = tiny_cfg("++search.space.n_max={type:categorical,choices:[2,3]}")
    with pytest.raises(storage.StudyError, match=r"already sampled n_max as IntDistribution.*give a new study.name"):
        storage.open_study(cfg, space.search_space(cfg))


def test_cli_reports_bad_input_in_one_paragraph(tiny_overrides, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "optimize", *tiny_overrides, "model.n_max=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith("hpo: model.n_max=0 is not allowed: an integer >= 1")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "experiments").exists()  # nothing partial written


def test_unknown_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hpo", "optimise"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "unknown command 'optimise'" in done.stderr
