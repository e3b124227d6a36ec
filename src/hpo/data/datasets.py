"""The data of one run, as the commands ask for them: training and validation sets for a fit, the test
split for ``promote``, the frames a trained model came from for ``md`` and ``polarize``.

Every preset (``locate.layout_of``) ends in the same ``Datasets``: frame sets with their keys and
isolated-atom energies, so no caller asks which preset it was. Own data (``dataset=files|pool``):

1. read every file (``dataset.train/val/test`` or ``dataset.files``), find the keys (``dataset.keys``,
   null entries detected and printed), convert to eV and Angstrom (``dataset.units``);
2. e0 (``dataset.e0``): a mapping, ``isolated_atoms`` (from the isolated-atom frames of the data) or
   ``average`` (gap_fit's ``e0_method=average``); isolated atoms are then removed from every split;
3. split (``pool``: permuted with ``dataset.split.seed``), check that every frame carries what the model
   needs (errors name the original file, frame and key), and write each split under
   ``experiments_dir/datasets/<name>-<digest>/`` with the detected keys: gap_fit reads its training set there.

The workshop layout reads its named files as they are (gap_fit reads them in place, and their sha256 is the
lineage a promoted model records), with the keys and e0 of the dataset config (``dataset.property_keys``,
``dataset.e0``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np
from omegaconf import OmegaConf

from hpo.safe_files import atomic_write
from hpo.data.locate import Workshop, layout_of, locate, train_file
from hpo.data.read import (
    KEY_CANDIDATES, FrameSet, Keys, Source, check_finite, e0_of, frame_energy, frame_forces, read_frames, read_source,
    sha256sum, tensor_of, units_of,
)
from hpo.data.split import (
    SPLIT_NAMES, Split, check_species_covered, outside, own_splits, refuse_shared_frames, subset_frames,
)
from hpo.errors import DataError
from hpo.models import kind
from hpo.paths import resolve_path


@dataclass
class Datasets:
    """The training and validation frames of one run (the test frames are read by ``load_test_set`` only).

    ``keys`` and ``e0`` are what gap_fit is told (key names in ``train.path``, isolated-atom energies in
    eV, ``e0_average``: gap_fit's ``e0_method=average`` instead).
    """

    train: FrameSet
    val: FrameSet
    keys: Keys = field(default_factory=Keys)
    e0: dict[str, float] | None = None
    e0_average: bool = False

    # ``dataset_cfg`` is no longer read (the loaders fill keys and e0 for every preset); the parameter
    # stays for the model kinds that pass it.
    def fit_keys(self, dataset_cfg=None) -> Keys:
        return self.keys

    def fit_e0(self, dataset_cfg=None) -> dict[str, float] | None:
        """Isolated-atom energies for gap_fit; None: ``e0_method=average``."""
        if self.e0_average:
            return None
        return dict(self.e0) if self.e0 is not None else None

    def solver_e0(self, dataset_cfg=None) -> dict[str, float]:
        """Isolated-atom energies for hpo's own solver: with ``e0_average`` the value gap_fit's
        ``e0_method=average`` takes (the mean over training frames of energy per atom, every species)."""
        if not self.e0_average:
            return self.fit_e0()
        mean = float(np.mean(self.train.energies / self.train.n_atoms))
        return {symbol: mean for symbol in sorted({s for atoms in self.train.frames for s in atoms.get_chemical_symbols()})}

    @property
    def hashes(self) -> dict[str, str]:
        return {f"sha256.{self.train.path.name}": self.train.sha256, f"sha256.{self.val.path.name}": self.val.sha256}


def load_datasets(cfg) -> Datasets:
    """Find and read the training file of ``dataset.train_size`` and the validation file.

    Own data (``dataset=files|pool``): keys detected, units converted, isolated atoms taken out and the
    splits written under ``experiments_dir/datasets/`` (``load_own``).
    """
    data = _load_workshop(cfg) if isinstance(layout_of(cfg.dataset), Workshop) else load_own(cfg)
    resolve_data_defaults(cfg, data)
    return data


def resolve_data_defaults(cfg, data: Datasets) -> None:
    """Model parameters set to ``auto`` take the values the model kind derives from these data
    (``ModelKind.data_defaults``), written into ``cfg.model`` and said in one line each."""
    params = OmegaConf.to_container(cfg.model, resolve=True)
    for name, (value, why) in kind(params["kind"]).data_defaults(params, data).items():
        OmegaConf.update(cfg, f"model.{name}", value, force_add=True)
        print(f"[hpo] model.{name}=auto -> {value} ({why})", flush=True)


def load_test_set(cfg, data: Datasets) -> FrameSet | None:
    """The test frames of the dataset config, disjoint from training and validation; None if it has none.

    Only ``promote`` calls this, once, for the model it registers: no trial, sweep, learning curve or
    promotion rule reads the test set, so its errors are free of the optimism of selection. With
    ``dataset.test_excludes_train`` the frames of ``dataset.test_file`` that are in the training set are
    dropped (the workshop files are nested: gap_input_400.xyz contains every smaller training file).
    """
    if not isinstance(layout_of(cfg.dataset), Workshop):
        return load_own_test(cfg, data)
    name = cfg.dataset.get("test_file")
    if not name:
        return None
    path = locate(cfg.dataset, name)
    need = kind(cfg.model.kind).targets
    pool = read_frames(path, cfg.dataset.property_keys, need, dict(cfg.dataset.e0) if "energy" in need else None)
    if cfg.dataset.get("test_excludes_train"):
        keep = np.array(outside(data.train.frames, pool.frames), dtype=int)
        if not len(keep):
            return None
        target = resolve_path(cfg.experiments_dir).resolve() / "test_splits" / f"{path.stem}-minus-{data.train.path.stem}.xyz"
        pool = subset_frames(pool, keep, target)
    refuse_shared_frames({"training": data.train, "validation": data.val, "test": pool})
    return pool


def model_data(cfg, lineage: dict | None = None, train_size: int | None = None, need: tuple[str, ...] | None = None) -> Datasets:
    """The training and validation frames a trained model came from, for commands that use a model
    (``md``: MD starts and stability ranges; ``polarize``: reference statistics and the polarizability key).

    Own data: the splits as loaded for fitting (``need``: the quantities every frame must carry; None:
    those of the config's model kind, as ``load_datasets``). Workshop layout: the validation file and the
    training file of ``train_size``, else of the model's ``lineage`` (its size may differ from
    ``dataset.train_size``), read as they are; a local file that differs from the one in the lineage is
    said in a warning.
    """
    if not isinstance(layout_of(cfg.dataset), Workshop):
        return load_datasets(cfg) if need is None else load_own(cfg, need=need)
    dataset = cfg.dataset
    name = dataset.train_files[train_size] if train_size is not None else training_file_of(dataset, lineage or {})
    train_path = locate(dataset, name)
    recorded = (lineage or {}).get(f"sha256.{name}")
    train = read_frames(train_path, dataset.property_keys, need=())
    if recorded and recorded != train.sha256:
        print(f"[hpo] warning: {train_path} differs from the file the model was trained on (sha256 in its lineage): "
              "stability ranges come from the local file", flush=True)
    val = read_frames(locate(dataset, dataset.validation_file), dataset.property_keys, need=())
    return Datasets(train=train, val=val, keys=Workshop(dataset).given_keys(), e0=dict(dataset.e0))


def training_file_of(dataset_cfg, lineage: dict) -> str:
    """The workshop training file of a model: from the version's lineage (its ``train_file`` or
    ``sha256.<file>`` tag naming one of ``dataset.train_files``), else the one of ``dataset.train_size``."""
    if lineage.get("train_file"):
        return str(lineage["train_file"])
    known = {str(name) for name in dataset_cfg.train_files.values()}
    named = [key.removeprefix("sha256.") for key in lineage if key.startswith("sha256.") and key.removeprefix("sha256.") in known]
    return named[0] if len(named) == 1 else train_file(dataset_cfg)


def has_polarizability(dataset_cfg) -> bool:
    """Whether the data carry polarizabilities (for the SA-GPR stages): the workshop layout names its key
    (``dataset.property_keys.polarizability``); own data have a detected (or ``dataset.keys.polarizability``) key."""
    layout = layout_of(dataset_cfg)
    if isinstance(layout, Workshop):
        return layout.given_keys().polarizability is not None
    return read_source(layout.files(include_test=False), dataset_cfg, quiet=True).keys.polarizability is not None


# --------------------------------------------------------------------------- the workshop layout


def _load_workshop(cfg) -> Datasets:
    dataset = cfg.dataset
    train_path, val_path = Workshop(dataset).files(include_test=False).values()
    need = kind(cfg.model.kind).targets
    e0 = dict(dataset.e0) if "energy" in need else None
    train = read_frames(train_path, dataset.property_keys, need, e0)
    val = read_frames(val_path, dataset.property_keys, need, e0)
    check_species_covered(train, val)
    refuse_shared_frames({"training": train, "validation": val})
    return Datasets(train=train, val=val, keys=Workshop(dataset).given_keys(), e0=dict(dataset.e0))


# --------------------------------------------------------------------------- own data (dataset=files|pool)


def _require(split: Split, keys: Keys, need: tuple[str, ...]) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Energies and forces of a split; DataError naming the original file, frame and key of a missing one."""
    energies, forces = [], []
    for atoms, (name, index) in zip(split.frames, split.origin):
        where = f"{name}, frame {index}"
        if "energy" in need:
            if keys.energy is None:
                raise DataError(f"{where}: no energy key found (tried {', '.join(KEY_CANDIDATES['energy'])}); set dataset.keys.energy")
            energies.append(frame_energy(atoms, keys.energy, where, "dataset.keys.energy"))
        if "force" in need and keys.forces is not None:
            forces.append(frame_forces(atoms, keys.forces, where, "dataset.keys.forces"))
        if "polarizability" in need:
            if keys.polarizability is None:
                raise DataError(f"{where}: no polarizability key found; set dataset.keys.polarizability")
            if tensor_of(atoms, keys.polarizability) is None:
                raise DataError(f"{where}: polarizability key {keys.polarizability!r} is missing or not 9 numbers (dataset.keys.polarizability)")
    bad = [(o, e) for o, e in zip(split.origin, energies) if not math.isfinite(e)]
    if bad:
        (name, index), value = bad[0]
        raise DataError(f"{name}, frame {index}: energy {keys.energy!r} is not finite: {value!r}")
    return (np.array(energies) if energies else None), forces


def _digest(cfg, source: Source, e0, average: bool) -> str:
    """Names the directory of the written splits: everything they depend on."""
    dataset = cfg.dataset
    recipe = {
        "files": {label: sha256sum(path) for label, path in source.paths.items()},
        "keys": source.keys.__dict__,
        "units": units_of(dataset),
        "e0": e0,
        "average": average,
        "split": dict(dataset.get("split") or {}),
        "train_size": dataset.get("train_size"),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write(split: Split, path: Path, keys: Keys, need) -> FrameSet:
    energies, forces = _require(split, keys, need)
    with atomic_write(path) as tmp:  # replaced whole: a worker's gap_fit reading the old copy is unaffected
        ase.io.write(tmp, split.frames, format="extxyz")
    found = FrameSet(path=path, frames=split.frames, sha256=sha256sum(path), energies=energies, forces=forces, keys=keys)
    check_finite(found)
    return found


def prepare(cfg, include_test: bool = True, need: tuple[str, ...] | None = None) -> tuple[dict[str, FrameSet], Datasets]:
    """The FrameSets of every split of an own dataset (written for gap_fit) and the fit settings.

    ``need``: the quantities every frame must carry; None: the targets of the config's model kind.
    """
    need = kind(cfg.model.kind).targets if need is None else need
    layout = layout_of(cfg.dataset)
    source = read_source(layout.files(include_test=include_test or cfg.dataset.source == "pool"), cfg.dataset)
    keys = source.keys
    if "force" in need and keys.forces is None:
        print("[hpo] no forces in the data: energies only", flush=True)
    e0, average = e0_of(cfg.dataset, source) if "energy" in need else (None, False)
    splits = own_splits(cfg.dataset, source)
    directory = resolve_path(cfg.experiments_dir).resolve() / "datasets" / f"{cfg.dataset.name}-{_digest(cfg, source, e0, average)}"
    sets = {name: _write(split, directory / f"{name}.xyz", keys, need) for name, split in splits.items()}
    refuse_shared_frames({SPLIT_NAMES[name]: frame_set for name, frame_set in sets.items()})
    for name in sets.keys() - {"train"}:
        check_species_covered(sets["train"], sets[name], SPLIT_NAMES[name])
    data = Datasets(train=sets["train"], val=sets["val"], keys=keys, e0=e0, e0_average=average)
    return sets, data


def load_own(cfg, need: tuple[str, ...] | None = None) -> Datasets:
    """``load_datasets`` of ``dataset=files|pool``: training and validation sets (``need``: see ``prepare``)."""
    _, data = prepare(cfg, include_test=False, need=need)
    print(f"[hpo] own data: {len(data.train)} training, {len(data.val)} validation frames in {data.train.path.parent}", flush=True)
    return data


def load_own_test(cfg, data: Datasets) -> FrameSet | None:
    """``load_test_set`` of ``dataset=files|pool``: the test split, disjoint from ``data``; None without one."""
    sets, _ = prepare(cfg, include_test=True)
    test = sets.get("test")
    if test is None:
        return None
    refuse_shared_frames({"training": data.train, "validation": data.val, "test": test})
    return test
