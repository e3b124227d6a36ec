"""The seams around hpo.data: no caller branches on the preset, errors and paths are leaves, and the
isolated-atom e0 is found once for the checks and the loaders."""

from __future__ import annotations

import ast
from pathlib import Path

import ase
import pytest

import hpo
from hpo.data import checks
from hpo.data.read import Keys, Source, e0_of, isolated_atom_e0
from hpo.errors import DataError

SRC = Path(hpo.__file__).resolve().parent


def test_no_preset_branch_outside_the_data_package():
    outside = [p for p in SRC.rglob("*.py") if SRC / "data" not in p.parents]
    assert [str(p) for p in outside if "is_own_data" in p.read_text()] == []


@pytest.mark.parametrize("module", ["errors.py", "paths.py"])
def test_leaf_modules_import_nothing_of_hpo(module):
    tree = ast.parse((SRC / module).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    assert [n for n in names if n.split(".")[0] == "hpo"] == []


def isolated(symbol: str, energy: float) -> ase.Atoms:
    atoms = ase.Atoms(symbol, cell=[10, 10, 10])
    atoms.info.update(config_type="isolated_atom", REF_energy=energy)
    return atoms


def test_isolated_atom_conflict_is_found_once_and_worded_by_each_caller(tmp_path):
    keys = Keys(energy="REF_energy")
    splits = {"train": [isolated("H", -13.6)], "val": [isolated("H", -13.5)]}
    e0, conflict = isolated_atom_e0(splits, keys)
    assert e0 == {"H": -13.6} and (conflict.symbol, conflict.second, conflict.label) == ("H", -13.5, "val")
    check = checks.isolated_atoms(splits, keys)
    assert check.verdict == "fail" and check.message == "isolated H atoms disagree between splits: -13.6, then -13.5 in val"
    source = Source(frames=splits, paths={"train": tmp_path / "a.xyz", "val": tmp_path / "b.xyz"}, keys=keys, report="")
    with pytest.raises(DataError, match=r"^isolated H atoms disagree between files: -13.6 and -13.5 \(val\)$"):
        e0_of({"e0": "isolated_atoms"}, source)
