"""hpo.data's presets: the workshop layout and own files end in the same Datasets, so callers never ask
which preset a config names (they ask the layout or the loaded data)."""

from __future__ import annotations

from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from hpo.config import load_config, output_overrides
from hpo.data import has_polarizability, layout_of, load_datasets, model_data
from hpo.data.locate import OwnFiles, Workshop
from hpo.data.read import Keys, frame_forces, read_frames

from helpers import TINY_GAP


def water(tmp_path: Path, data_dir: Path, *extra: str):
    return load_config([f"dataset.data_dir={data_dir}", *output_overrides(tmp_path), *TINY_GAP, *extra])


def test_keys_of_either_spelling_and_gap_fit_alias():
    assert Keys.of({"energy": "energy", "force": "force", "polarizability": "Polarizability"}) == Keys("energy", "force", "Polarizability")
    keys = Keys.of({"energy": "REF_energy", "forces": "REF_forces", "polarizability": None})
    assert keys.forces == keys.force == "REF_forces"
    assert Keys.of(keys) is keys


def test_workshop_preset_locates_named_files(tiny_data, tmp_path):
    cfg = water(tmp_path, tiny_data)
    layout = layout_of(cfg.dataset)
    assert isinstance(layout, Workshop) and layout.fixed_train_files
    assert layout.files(include_test=False) == {"gap_input_50.xyz": tiny_data / "gap_input_50.xyz",
                                               "gap_validate.xyz": tiny_data / "gap_validate.xyz"}
    assert list(layout.files()) == ["gap_input_50.xyz", "gap_validate.xyz", "gap_input_400.xyz"]
    assert layout.given_keys() == Keys("energy", "force", "Polarizability")
    assert has_polarizability(cfg.dataset)


def test_own_files_preset(tmp_path):
    cfg = load_config([*output_overrides(tmp_path), "dataset=files", "dataset.train=a.xyz", "dataset.val=b.xyz",
                       "dataset.keys.energy=REF_energy"])
    layout = layout_of(cfg.dataset)
    assert isinstance(layout, OwnFiles) and not layout.fixed_train_files
    assert layout.files() == {"train": Path.cwd() / "a.xyz", "val": Path.cwd() / "b.xyz"}
    assert layout.given_keys() == Keys(energy="REF_energy")


def test_workshop_datasets_carry_their_keys_and_e0(tiny_data, tmp_path):
    cfg = water(tmp_path, tiny_data)
    data = load_datasets(cfg)
    assert data.keys == Keys("energy", "force", "Polarizability")
    assert data.fit_e0() == dict(cfg.dataset.e0) and data.solver_e0() == dict(cfg.dataset.e0)
    assert data.train.path == tiny_data / "gap_input_50.xyz"  # read in place: its sha256 is the lineage


def test_model_data_follows_the_lineage_and_warns_on_a_changed_file(tiny_data, tmp_path, capsys):
    cfg = water(tmp_path, tiny_data)
    data = model_data(cfg, lineage={"train_file": "gap_input_100.xyz"})
    assert data.train.path.name == "gap_input_100.xyz" and len(data.train) == 14
    assert data.val.path.name == "gap_validate.xyz" and data.keys.polarizability == "Polarizability"
    assert "differs from the file" not in capsys.readouterr().out
    model_data(cfg, lineage={"sha256.gap_input_100.xyz": "0" * 64})
    assert f"{tiny_data / 'gap_input_100.xyz'} differs from the file the model was trained on" in capsys.readouterr().out
    assert model_data(cfg, train_size=100).train.path.name == "gap_input_100.xyz"


def test_one_reader_finds_forces_wherever_ase_put_them(tmp_path):
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.arrays["force"] = np.ones((2, 3))
    assert frame_forces(atoms, "force", "x, frame 0").sum() == 6
    with pytest.raises(Exception, match=r"x, frame 0: per-atom force column 'REF_forces' is missing \(dataset.keys.forces\)"):
        frame_forces(atoms, "REF_forces", "x, frame 0", "dataset.keys.forces")
    path = tmp_path / "one.xyz"
    atoms.info["energy"] = -1.0
    ase.io.write(path, [atoms], format="extxyz")
    found = read_frames(path, Keys(energy="energy", forces="force"))
    assert found.energies.tolist() == [-1.0] and found.forces[0].shape == (2, 3)


def test_own_test_split_carries_its_polarizability_key(tiny_data, tmp_path):
    """A model reads its targets under the key of the frames it is given: an own data set's test split
    (``dataset.keys`` detected, no ``dataset.property_keys``) gives SA-GPR its tensors."""
    from hpo.config import model_params
    from hpo.data import load_test_set
    from hpo.models import kind

    frames = ase.io.read(tiny_data / "gap_input_100.xyz", ":")
    for atoms in frames:
        atoms.info["alpha"] = atoms.info.pop("Polarizability")
    for name, part in (("train", frames[:8]), ("val", frames[8:11]), ("test", frames[11:])):
        ase.io.write(tmp_path / f"{name}.xyz", part, format="extxyz")
    cfg = load_config([*output_overrides(tmp_path), "model=sagpr", "dataset=files", *(f"dataset.{n}={tmp_path / n}.xyz" for n in ("train", "val", "test"))])
    data = load_datasets(cfg)
    test = load_test_set(cfg, data)
    assert data.keys.polarizability == test.keys.polarizability == data.train.keys.polarizability == "alpha"
    expected = np.array([np.reshape(atoms.info["alpha"], (3, 3)) for atoms in frames[11:]])
    # the SA-GPR kind's reference values of the test split: read under the split's own key (no context needed)
    np.testing.assert_allclose(kind("sagpr").reference(test, model_params(cfg), None).tensors, expected)


def test_each_preset_says_why_it_has_no_test_split(tmp_path):
    make = lambda *extra: load_config([*output_overrides(tmp_path), *extra])  # noqa: E731
    assert layout_of(make().dataset).no_test_reason() == "dataset.test_file='gap_input_400.xyz' has no frame outside the training set"
    files = make("dataset=files", "dataset.train=a.xyz", "dataset.val=b.xyz")
    assert layout_of(files.dataset).no_test_reason() == "dataset.test is not given"
    pool = make("dataset=pool", "dataset.files=[a.xyz]", "dataset.split.test=0.0")
    assert layout_of(pool.dataset).no_test_reason() == "dataset.split.test=0.0 keeps no frame for it"
