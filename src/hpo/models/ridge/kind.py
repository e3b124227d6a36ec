"""Ridge, a deliberately small model kind: energies as a ridge regression on per-species-pair histograms of
inverse distances, with analytic forces (an ASE calculator, so it drives MD). It exists to show that a kind is
one folder, its conf files and one registry line; it is no potential to run production MD with.

Descriptor of a frame: the atoms of each species, then for each unordered species pair the sum over atom
pairs within ``cutoff`` of Gaussians in 1/r (``n_basis`` centres evenly between 1/cutoff and 1/r_min, as wide
as their spacing) times a cosine cutoff; the per-species columns take the isolated-atom energies' role.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list

from hpo.models.base import ConfigError, FitContext, Fitted, ModelKind
from hpo.models.predictions import EnergyPredictions

MODEL_FILE = "ridge.npz"
PARAMETERS = {"cutoff": "positive", "r_min": "positive", "n_basis": "count", "alpha": "positive"}


@dataclass
class RidgeModel:
    """Weights over the descriptor columns; ``species``: the atomic numbers of the training frames, sorted."""

    species: np.ndarray
    cutoff: float
    r_min: float
    n_basis: int
    weights: np.ndarray

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(itertools.combinations_with_replacement(range(len(self.species)), 2))

    def _basis(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pairs, n_basis) basis values at distances ``d`` and their derivatives in d."""
        centres = np.linspace(1 / self.cutoff, 1 / self.r_min, self.n_basis)
        width = centres[1] - centres[0] if self.n_basis > 1 else 1 / self.r_min - 1 / self.cutoff
        u = (1 / d)[:, None] - centres
        gauss = np.exp(-0.5 * (u / width) ** 2)
        fc = 0.5 * (np.cos(np.pi * d / self.cutoff) + 1)[:, None]
        dfc = (-0.5 * np.pi / self.cutoff * np.sin(np.pi * d / self.cutoff))[:, None]
        return gauss * fc, gauss * (-u / width**2) * (-1 / d**2)[:, None] * fc + gauss * dfc

    def _pair_terms(self, atoms):
        index = {int(z): k for k, z in enumerate(self.species)}
        unknown = set(map(int, atoms.numbers)) - set(index)
        if unknown:
            raise ValueError(f"species {sorted(unknown)} are not in the training frames")
        i, j, D, d = neighbor_list("ijDd", atoms, self.cutoff)
        a, b = np.array([index[int(z)] for z in atoms.numbers])[i], np.array([index[int(z)] for z in atoms.numbers])[j]
        kind_of = {pair: k for k, pair in enumerate(self.pairs)}
        types = np.array([kind_of[min(p, q), max(p, q)] for p, q in zip(a, b)], dtype=int)
        return i, D, d, types

    def features(self, atoms) -> np.ndarray:
        i, D, d, types = self._pair_terms(atoms)
        counts = np.array([np.sum(atoms.numbers == z) for z in self.species], dtype=float)
        values, _ = self._basis(d)
        histogram = np.zeros((len(self.pairs), self.n_basis))
        np.add.at(histogram, types, 0.5 * values)  # every pair is listed from both of its atoms
        return np.concatenate([counts, histogram.ravel()])

    def energies(self, frames) -> np.ndarray:
        return np.array([self.features(atoms) @ self.weights for atoms in frames])

    def forces(self, atoms) -> np.ndarray:
        """F_i = sum over the pairs listed from i of phi'(d) D/d (phi: the pair's energy term)."""
        i, D, d, types = self._pair_terms(atoms)
        _, slopes = self._basis(d)
        pair_weights = self.weights[len(self.species):].reshape(len(self.pairs), self.n_basis)
        dphi = np.sum(slopes * pair_weights[types], axis=1)
        forces = np.zeros((len(atoms), 3))
        np.add.at(forces, i, (dphi / d)[:, None] * D)
        return forces

    def save(self, path: Path) -> Path:
        np.savez(path, species=self.species, cutoff=self.cutoff, r_min=self.r_min, n_basis=self.n_basis, weights=self.weights)
        return path

    @classmethod
    def load(cls, path: Path) -> "RidgeModel":
        with np.load(path) as stored:
            return cls(stored["species"], float(stored["cutoff"]), float(stored["r_min"]), int(stored["n_basis"]), stored["weights"])


class RidgeCalculator(Calculator):
    """The ridge model as an ASE calculator: energy (eV) and forces (eV/Å)."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model: RidgeModel, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy = float(self.model.energies([self.atoms])[0])
        self.results = {"energy": energy, "free_energy": energy, "forces": self.model.forces(self.atoms)}


class RidgeKind(ModelKind):
    name = "ridge"
    display_name = "ridge"
    targets = ("energy",)
    parameters = PARAMETERS
    trial_metrics = ("train_energy_rmse", "val_energy_rmse", "energy_rmse_ratio", "fit_time_s", "eval_time_s")
    pyfunc_code = Path(__file__).with_name("pyfunc.py")
    drives_md = True

    def pyfunc_outputs(self):
        from mlflow.types.schema import Array, ColSpec, Schema

        return Schema([ColSpec("double", "energy"), ColSpec(Array(Array("double")), "forces")])

    def check_combination(self, params: dict, prefix: str) -> None:
        if params["r_min"] >= params["cutoff"]:
            raise ConfigError(f"{prefix}.r_min={params['r_min']!r} is not allowed: smaller than the cutoff ({params['cutoff']})")

    def fit(self, train, params: dict, workdir: Path, context: FitContext, upcoming=()) -> Fitted:
        start = time.perf_counter()
        species = np.array(sorted({int(z) for atoms in train.frames for z in atoms.numbers}))
        model = RidgeModel(species, float(params["cutoff"]), float(params["r_min"]), int(params["n_basis"]), np.zeros(0))
        x = np.array([model.features(atoms) for atoms in train.frames])
        model.weights = np.linalg.solve(x.T @ x + params["alpha"] * np.eye(x.shape[1]), x.T @ train.energies)
        path = model.save(workdir / MODEL_FILE)
        return Fitted([path], params, metrics={"fit_time_s": time.perf_counter() - start},
                      train_predictions=EnergyPredictions(x @ model.weights, train.n_atoms), state=model)

    def evaluate(self, fitted: Fitted, frames) -> EnergyPredictions:
        return EnergyPredictions(fitted.state.energies(frames), np.array([len(a) for a in frames]))

    def reference(self, split, params: dict, context: FitContext) -> EnergyPredictions:
        return EnergyPredictions.of(split)

    def files_in(self, path: Path) -> list[Path]:
        return [path] if path.is_file() else [path / MODEL_FILE]

    def holds(self, path: Path) -> bool:
        return path.name == MODEL_FILE if path.is_file() else (path / MODEL_FILE).is_file()

    def load(self, files: list[Path]) -> RidgeModel:
        return RidgeModel.load(files[0])

    def predict(self, files: list[Path], frames, params: dict, with_std: bool = False) -> EnergyPredictions:
        return EnergyPredictions(self.load(files).energies(frames), np.array([len(a) for a in frames]))

    def calculator(self, files: list[Path]) -> RidgeCalculator:
        return RidgeCalculator(self.load(files))


KIND = RidgeKind()
