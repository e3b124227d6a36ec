"""A fitted GAP read from its XML file, predicting energies with numpy on quippy's descriptors.

Why not quippy's calculator: it evaluates one frame at a time, always with
descriptor gradients, and first parses the XML in Fortran (seconds). A trial
needs energies of a fixed set of frames, and the descriptors of those frames do
not depend on the fit at all, only on the descriptor hyperparameters. So hpo
computes them with quippy's own ``Descriptor`` (the same code gap_fit used, so the
numbers are the same) while gap_fit runs, caches them by content, and after the
fit applies the sparse GP with one matrix product per species:

    E = sum_atoms e0(Z) + sum_i delta^2 * c_i * sum_s alpha_s (q_i . x_s)^zeta

(dot-product covariance; q_i the descriptor of environment i, c_i its
covariance cutoff, x_s the sparse points, alpha_s their weights).
``tests/unit/models/gap/test_sparse_gap.py`` checks it against quippy's calculator to 1e-6 eV.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ase
import numpy as np

from hpo.cache import Cache
from hpo.models.gap.descriptors import Environments, environments

# gap_fit's integer code of covariance_type=dot_product in the XML.
DOT_PRODUCT = 2
# The sparse GP's posterior (``posterior.Posterior``) beside a model's XML, as ``gap.xml.posterior.npz``:
# gap_fit's XML carries the weights, not the covariance a predictive variance needs; named after the XML
# so it travels with it as its companions do (promotion copies ``gap.xml*``).
POSTERIOR_SUFFIX = ".posterior.npz"


def posterior_file(model_file: Path) -> Path:
    return Path(str(model_file) + POSTERIOR_SUFFIX)
class UnsupportedModel(ValueError):
    """A GAP this module cannot evaluate (e.g. not a dot-product kernel): use quippy's calculator."""


@dataclass(frozen=True)
class SparseGP:
    """One ``gpCoordinates`` block of a GAP: the sparse GP of one descriptor (one centre species)."""

    descriptor: str
    delta: float
    zeta: float
    alpha: np.ndarray  # (n_sparse,)
    sparse_points: np.ndarray  # (n_sparse, dimensions)

    def local_energies(self, found: Environments) -> np.ndarray:
        return self.delta**2 * found.cutoff * ((found.vectors @ self.sparse_points.T) ** self.zeta @ self.alpha)


def _vector(point: ET.Element) -> np.ndarray:
    """One sparse point: inline text, or split into ``sparseX_slice`` children for long vectors."""
    slices = point.findall("sparseX_slice")
    text = " ".join(s.text for s in slices) if slices else point.text
    return np.array(text.split(), dtype=float)


@dataclass(frozen=True)
class SparseGap:
    """A fitted GAP: isolated-atom energies and one sparse GP per descriptor."""

    e0: dict[int, float]
    gps: tuple[SparseGP, ...]
    posterior: object = None  # posterior.Posterior, read from posterior_file(xml) when there is one

    @classmethod
    def read(cls, model_file: Path) -> SparseGap:
        """Parse gap_fit's XML (written with ``sparse_separate_file=F``); raises UnsupportedModel for other kernels."""
        root = ET.parse(model_file).getroot()
        e0 = {int(e.get("Z")): float(e.get("value")) for e in root.iter("e0")}
        gps = []
        for coordinates in root.iter("gpCoordinates"):
            if int(coordinates.get("covariance_type")) != DOT_PRODUCT or int(coordinates.get("n_permutations", 1)) != 1:
                raise UnsupportedModel(f"{model_file}: only single-permutation dot_product kernels are evaluated with numpy")
            if float(coordinates.get("signal_mean", 0.0)) != 0.0:
                raise UnsupportedModel(f"{model_file}: a non-zero signal_mean is not supported")
            points = coordinates.findall("sparseX")
            if any(float(p.get("sparseCutoff", 1.0)) != 1.0 for p in points):
                raise UnsupportedModel(f"{model_file}: sparse points with a covariance cutoff are not supported")
            if not points or not (points[0].text or "").strip() and points[0].find("sparseX_slice") is None:
                raise UnsupportedModel(f"{model_file}: sparse points are not inside the XML (sparse_separate_file=T?)")
            gps.append(
                SparseGP(
                    descriptor=coordinates.find("descriptor").text.strip(),
                    delta=float(coordinates.get("signal_variance")),
                    zeta=float(coordinates.get("zeta")),
                    alpha=np.array([float(p.get("alpha")) for p in points]),
                    sparse_points=np.array([_vector(p) for p in points]),
                )
            )
        posterior = None
        if posterior_file(model_file).is_file():
            from hpo.models.gap.posterior import Posterior

            posterior = Posterior.load(posterior_file(model_file))
        return cls(e0=e0, gps=tuple(gps), posterior=posterior)

    @property
    def descriptors(self) -> list[str]:
        return [gp.descriptor for gp in self.gps]

    def energies(self, frames: Sequence[ase.Atoms], found: dict[str, Environments]) -> np.ndarray:
        """Energy (eV) of every frame; ``found`` maps each descriptor string to the frames' environments."""
        totals = np.array([sum(self.e0.get(int(z), 0.0) for z in atoms.numbers) for atoms in frames])
        for gp in self.gps:
            env = found[gp.descriptor]
            totals += np.bincount(env.frame, weights=gp.local_energies(env), minlength=len(frames))
        return totals

    def predict(self, frames: Sequence[ase.Atoms], cache: Cache | None = None, return_std: bool = False):
        """Energies (eV) of ``frames``, computing (or loading) their descriptors; ``return_std`` (scikit-learn's
        convention): also each frame's predictive std (eV) of its total energy (``posterior.Posterior``)."""
        energies = self.energies(frames, {d: environments(d, frames, cache) for d in self.descriptors})
        if not return_std:
            return energies
        if self.posterior is None:
            raise UnsupportedModel("no gap.xml.posterior.npz beside the model: it keeps no posterior, so no std")
        return energies, self.posterior.std(frames, cache)[0]
