"""The predictive variance of a GAP: the sparse GP's posterior, kept beside a model and evaluated in blocks.

Made by ``hpo.models.gap.solver`` (``posterior_of``, ``posterior_of_model``, or ``solve(with_posterior=True)``),
read by ``hpo.models.gap.sparse_gap.SparseGap.read`` from ``gap.xml.posterior.npz``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import ase
import numpy as np
import scipy.linalg

from hpo.cache import Cache
from hpo.models.gap import kernels
from hpo.models.gap.descriptors import environments

PREDICT_ATOMS = 1024  # atoms per block of predictions (here and in solver.predict): bounds the descriptor data held at once


@dataclass(frozen=True)
class Posterior:
    """The sparse GP's posterior covariance, for the predictive variance of any energy the model predicts.

    gap_fit's model is the projected process (deterministic training conditional, Quinonero-Candela &
    Rasmussen 2005): the latent local energy f(q) = k(q, X_M) K_MM^-1 u with u ~ N(0, K_MM) at the sparse
    points, plus the part of the prior the sparse points do not reach. Its posterior variance of any linear
    functional g of f (one atom's local energy, a frame's total energy) with covariance row k_g against the
    sparse points and prior variance k_gg is

        var(g) = k_gg - k_g K_MM^-1 k_g^T + k_g Sigma k_g^T,   Sigma = (K_MM + K_MN Lambda^-1 K_NM)^-1,

    computed from the factors the solve has at hand (``sparse_gp.solve_projected_process(posterior=True)``):
    with R^T R = Sigma^-1 from the QR of [Lambda^-1/2 K_NM; U] (more targets than sparse points) the quadratic
    forms are |L^-1 k_g|^2 (K_MM = L L^T, jitter included) and |R^-T k_g|^2; with fewer targets (energies only)
    Woodbury's identity folds both into |B L^-1 k_g|^2 with an (N x M) B. This is the variance of
    the latent energy, without the noise sigma: it says how far the data constrain the model there, in eV^2.
    With every training environment a sparse point it is the full GP's variance (tests/unit/models/gap/test_posterior.py).
    Sparse points of different descriptors (centre species, settings) are independent GPs, as in gap_fit, each
    with its own delta and zeta; an atom's local energy sums its descriptors' (a short and a long SOAP).
    """

    descriptors: tuple[str, ...]
    points: tuple[np.ndarray, ...]  # (m_o, d) per descriptor
    cutoffs: tuple[np.ndarray, ...]
    columns: tuple[np.ndarray, ...]  # column of each point in L and R
    deltas: tuple[float, ...]  # per descriptor
    zetas: tuple[float, ...]
    k_mm_factor: np.ndarray  # lower L, delta^2 K_MM + jitter = L L^T
    r: np.ndarray | None = None  # upper R, R^T R = Sigma^-1 (QR route)
    b: np.ndarray | None = None  # (N, M), Woodbury route
    std_scale: float = 1.0  # calibration (hpo.calibration, fitted on validation at promotion): multiplies every std

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"deltas": np.array(self.deltas), "zetas": np.array(self.zetas), "k_mm_factor": self.k_mm_factor,
               "descriptors": np.array(self.descriptors), "std_scale": np.array(self.std_scale)}
        out.update({k: v for k, v in (("r", self.r), ("b", self.b)) if v is not None})
        for i, (p, c, k) in enumerate(zip(self.points, self.cutoffs, self.columns)):
            out.update({f"points_{i}": p, f"cutoffs_{i}": c, f"columns_{i}": k})
        return out

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> Posterior:
        n = len(a["descriptors"])
        return cls(tuple(str(d) for d in a["descriptors"]), tuple(a[f"points_{i}"] for i in range(n)), tuple(a[f"cutoffs_{i}"] for i in range(n)),
                   tuple(a[f"columns_{i}"] for i in range(n)), tuple(map(float, a["deltas"])), tuple(map(float, a["zetas"])),
                   a["k_mm_factor"], a.get("r"), a.get("b"),
                   float(a.get("std_scale", 1.0)))

    def save(self, path: Path) -> Path:
        from hpo.safe_files import atomic_write_npz

        atomic_write_npz(Path(path), **self.arrays())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> Posterior:
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays({k: data[k] for k in data.files})

    def variance(self, rows: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """var(g) of functionals with covariance rows ``rows`` (n, M) and prior variances ``prior`` (n,), delta^2 included."""
        if len(rows) == 0:
            return np.zeros(0)
        a = scipy.linalg.solve_triangular(self.k_mm_factor, rows.T, lower=True, check_finite=False)
        if self.r is None:
            c = self.b @ a
            return prior - np.einsum("ij,ij->j", c, c)
        b = scipy.linalg.solve_triangular(self.r, rows.T, trans="T", lower=False, check_finite=False)
        return prior - np.einsum("ij,ij->j", a, a) + np.einsum("ij,ij->j", b, b)

    def std(self, frames: Sequence[ase.Atoms], cache: Cache | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Predictive std (eV) of each frame's total energy, and of each atom's local energy (per frame, (n_atoms,)),
        in blocks of about ``PREDICT_ATOMS`` atoms. An atom of a species without a descriptor gets 0 (its energy is e0)."""
        frame_std, atom_std = [], []
        for start, stop in _blocks([len(a) for a in frames], PREDICT_ATOMS):
            block = list(frames[start:stop])
            f, a = self._block_std(block, cache)
            frame_std.append(f)
            atom_std.extend(a)
        return (np.concatenate(frame_std) if frame_std else np.zeros(0)), atom_std

    def _block_std(self, frames: list[ase.Atoms], cache: Cache | None) -> tuple[np.ndarray, list[np.ndarray]]:
        m = len(self.k_mm_factor)
        frame_rows = np.zeros((len(frames), m))
        frame_prior = np.zeros(len(frames))
        offsets = np.cumsum([0] + [len(a) for a in frames])
        atom_rows = np.zeros((offsets[-1], m))  # an atom's local energy: the sum over the descriptors centred on it
        atom_prior = np.zeros(offsets[-1])
        for descriptor, points, cutoffs, columns, delta, zeta in zip(self.descriptors, self.points, self.cutoffs, self.columns, self.deltas, self.zetas):
            scale = delta**2
            env = environments(descriptor, frames, cache)
            k_env = scale * env.cutoff[:, None] * (env.vectors @ points.T) ** zeta * cutoffs[None, :]
            atoms = offsets[env.frame] + _centre_atoms(descriptor, frames, env.frame)
            atom_rows[np.ix_(atoms, columns)] += k_env
            frame_rows[:, columns] += kernels.sum_rows(env.frame, len(frames), k_env)
            atom_prior[atoms] += scale * env.cutoff**2 * np.einsum("ij,ij->i", env.vectors, env.vectors) ** zeta
            for f in range(len(frames)):
                mine = env.frame == f
                v, c = env.vectors[mine], env.cutoff[mine]
                frame_prior[f] += scale * float(np.sum(np.outer(c, c) * (v @ v.T) ** zeta))
        atom_var = self.variance(atom_rows, atom_prior)
        frame_var = self.variance(frame_rows, frame_prior)
        atom_std = self.std_scale * np.sqrt(np.maximum(atom_var, 0.0))
        return self.std_scale * np.sqrt(np.maximum(frame_var, 0.0)), [atom_std[offsets[i] : offsets[i + 1]] for i in range(len(frames))]


def _centre_atoms(descriptor: str, frames: Sequence[ase.Atoms], env_frame: np.ndarray) -> np.ndarray:
    """Index within its frame of each environment's centre atom: the atoms of the descriptor's Z, in order."""
    found = re.search(r"\bZ=(\d+)", descriptor)
    out = []
    for atoms in frames:
        numbers = atoms.numbers
        out.append(np.flatnonzero(numbers == int(found.group(1))) if found else np.arange(len(atoms)))
    centres = np.concatenate(out) if out else np.zeros(0, dtype=int)
    if len(centres) != len(env_frame):
        raise ValueError(f"{len(env_frame)} environments of {descriptor!r} for {len(centres)} centre atoms")
    return centres.astype(int)


def _blocks(sizes: Sequence[int], atoms_per_block: int) -> list[tuple[int, int]]:
    out, start, count = [], 0, 0
    for i, size in enumerate(sizes):
        count += size
        if count >= atoms_per_block:
            out.append((start, i + 1))
            start, count = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out
