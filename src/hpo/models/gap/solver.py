"""A sparse-GP solver in numpy that gives the same GAP as ``gap_fit``, on sparse points hpo chooses,
in memory that does not grow with the number of frames.

Two halves, each checked against gap_fit itself (``tests/unit/models/gap/test_solver.py``):

* **Sparse points chosen by hpo.** ``hpo.models.sparse_gp.select_sparse`` picks environments by
  farthest-point sampling (or CUR, or at random) on quippy's descriptors;
  ``gap_fit.SparsePoints`` hands exactly those to gap_fit (``sparse_method=index_file``: 1-based
  indices into the environments of each per-species descriptor, frame by frame in file order, atom by
  atom). gap_fit sorts the indices; the model lists sparse points in increasing index order.

* **The same fit without gap_fit.** gap_fit's model (gp_predict.F90, gap_fit_module.F90 of GAP,
  verified here by equality): one sparse GP per descriptor (per centre species) with the dot-product
  kernel of ``kernels``; an energy target per frame, E - sum_atoms e0(Z), with noise
  sigma_E = default_sigma[0] * sqrt(n_atoms) (``sigma_per_atom=T``); a target per force component, -F,
  noise default_sigma[1]; alpha from the least-squares problem
  [Lambda^-1/2 K_NM; U] alpha = [Lambda^-1/2 y; 0] with K_MM = U^T U, solved by QR (gap_fit's route).

**Streamed.** The force rows of K_NM (3 per atom) are the bulk of that problem: 100 frames of
192 atoms at 2000 sparse points are 0.9 GB of rows and, before them, 24 GB of descriptor gradients. So
frames are visited one at a time: quippy's descriptors and gradients of one frame become that frame's
kernel rows (``kernels``) and are dropped; the rows [K_F | -F] are folded block by block into the
triangular factor R of a QR (TSQR: QR of R stacked on the next block), and since
|K_F a - y_F| = |R[:M, :M] a - R[:M, M]| + const, R replaces the force rows in the final solve
exactly. Memory is O(M^2 + one block + one frame), not O(frames): ``memory_bytes`` says how much.

**Reused.** ``Factors`` (K_MM, the energy rows and R, all for delta = 1) depend on the descriptor, the
frames, zeta and the ordered sparse set only. Sigmas, delta, jitter and e0 enter at the solve, and the
columns are ordered rank by rank of each species' selection order, so the leading block of R is the
factor of any smaller n_sparse (a QR property): a trial that changes only GP settings costs one
(N_frames + 2M) x M QR, however many force rows the data have. The training force RMSE comes out of R
too (the residual's norm), so no training forces are ever predicted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping, Sequence

import ase
import numpy as np
import scipy.linalg

from hpo.cache import Cache
from hpo.models.gap import gap_fit, kernels
from hpo.models.gap.descriptors import Environments, descriptor_value, environments
from hpo.models.gap.posterior import PREDICT_ATOMS, Posterior
from hpo.models.gap.sparse_gap import SparseGap, SparseGP
from hpo.models.sparse_gp import select_sparse, solve_projected_process

FORCE_PAIR_CHUNK = 20000  # gradient pairs per block of predict_forces
# a process's own arrays and libraries besides the fit (Python, quippy, Optuna, MLflow); with it the estimate
# is 1.41 / 1.58 / 1.90 GB against 1.01 / 1.25 / 1.92 GB measured (bench_gap_scale.py, 50 / 200 / 500 frames)
BASELINE_BYTES = 600e6


# --------------------------------------------------------------------------- settings and columns


@dataclass(frozen=True)
class Hyper:
    """The GP settings of one fit shared by its descriptors, in gap_fit's meaning (delta, zeta and n_sparse are
    each descriptor's own: ``SparseSet`` reads them from the descriptor strings)."""

    energy_sigma: float  # default_sigma[0], per atom (scaled by sqrt(n_atoms))
    force_sigma: float  # default_sigma[1]
    sparse_jitter: float
    e0: Mapping[int, float]  # isolated-atom energy per atomic number

    @classmethod
    def from_params(cls, params: dict, e0: Mapping[str, float]) -> Hyper:
        from ase.data import atomic_numbers

        sigma = params["default_sigma"]
        return cls(
            energy_sigma=float(sigma["energy"]), force_sigma=float(sigma["force"]),
            sparse_jitter=float(params["sparse_jitter"]),
            e0={atomic_numbers[s]: float(v) for s, v in e0.items()},
        )

    def e0_of(self, frames: Sequence[ase.Atoms]) -> np.ndarray:
        return np.array([sum(self.e0.get(int(z), 0.0) for z in atoms.numbers) for atoms in frames])


@dataclass
class SolveTimes:
    kernels_s: float = 0.0
    solve_s: float = 0.0


@dataclass(frozen=True)
class SparseSet:
    """The sparse points of every descriptor, as columns of one K_NM.

    ``orders[o]`` are environment indices of descriptor ``o`` in selection order (FPS/CUR are greedy,
    so the first k are the points of n_sparse = k). Columns go rank by rank (rank 0 of every
    descriptor, then rank 1, ...), so the columns of any n_sparse shared by all descriptors are a prefix.
    Each descriptor's delta, zeta and n_sparse are those of its string (gap_fit's own record of them).
    """

    descriptors: tuple[str, ...]
    orders: tuple[np.ndarray, ...]
    points: tuple[np.ndarray, ...]  # (m_o, d) in selection order
    cutoffs: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, found: Mapping[str, Environments], orders: Mapping[str, np.ndarray]) -> SparseSet:
        descriptors = tuple(found)
        order = tuple(np.asarray(orders[d], dtype=int) for d in descriptors)
        return cls(descriptors, order, tuple(found[d].vectors[o] for d, o in zip(descriptors, order)),
                   tuple(found[d].cutoff[o] for d, o in zip(descriptors, order)))

    @property
    def size(self) -> int:
        return sum(len(o) for o in self.orders)

    @property
    def zetas(self) -> tuple[float, ...]:
        return tuple(float(descriptor_value(d, "zeta")) for d in self.descriptors)

    @property
    def deltas(self) -> tuple[float, ...]:
        return tuple(float(descriptor_value(d, "delta")) for d in self.descriptors)

    @property
    def requested(self) -> tuple[int, ...]:
        """Each descriptor's n_sparse: the points a fit with these descriptor strings uses."""
        return tuple(int(descriptor_value(d, "n_sparse")) for d in self.descriptors)

    def counts(self, n_sparse: int | Sequence[int] | None = None) -> list[int]:
        """Points of each descriptor at ``n_sparse`` (one value for all, or one per descriptor; None: all
        points held), each capped at the points held (gap_fit caps at the number of environments)."""
        if n_sparse is None:
            return [len(o) for o in self.orders]
        wanted = [n_sparse] * len(self.orders) if isinstance(n_sparse, (int, np.integer)) else list(n_sparse)
        return [min(int(n), len(o)) for n, o in zip(wanted, self.orders)]

    def prefix(self, n_sparse: int | Sequence[int] | None = None) -> int:
        return sum(self.counts(n_sparse))

    def columns(self, counts: Sequence[int]) -> np.ndarray:
        """Columns (ascending) of the first ``counts[o]`` points of each descriptor: the column order of the
        sparse set those points make."""
        return np.sort(np.concatenate([p[:c] for p, c in zip(self.positions, counts)]).astype(int))

    def scales(self) -> np.ndarray:
        """delta^2 of each column's descriptor: kernel rows are computed for delta = 1 and scaled at the solve."""
        out = np.zeros(self.size)
        for columns, delta in zip(self.positions, self.deltas):
            out[columns] = delta**2
        return out

    @cached_property  # asked for every frame of a fit: computed once per sparse set
    def positions(self) -> list[np.ndarray]:
        """Column of each descriptor's point, by rank: descriptor o's rank r lands at positions[o][r]."""
        keys = sorted((rank, o) for o, order in enumerate(self.orders) for rank in range(len(order)))
        out = [np.zeros(len(order), dtype=int) for order in self.orders]
        for column, (rank, o) in enumerate(keys):
            out[o][rank] = column
        return out

    def covariance(self) -> np.ndarray:
        """K_MM for delta = 1 in column order: block diagonal over descriptors."""
        k_mm = np.zeros((self.size, self.size))
        for columns, points, cutoffs, zeta in zip(self.positions, self.points, self.cutoffs, self.zetas):
            k_mm[np.ix_(columns, columns)] = kernels.sparse_covariance(points, cutoffs, zeta)
        return k_mm

    def model(self, weights: np.ndarray, hyper: Hyper, species: Sequence[int]) -> SparseGap:
        """The SparseGap of solved ``weights`` (one per column), points in index order as gap_fit lists them."""
        gps = []
        for descriptor, order, points, columns, delta, zeta in zip(self.descriptors, self.orders, self.points, self.positions, self.deltas, self.zetas):
            by_index = np.argsort(order, kind="stable")
            gps.append(SparseGP(descriptor=descriptor, delta=delta, zeta=zeta, alpha=weights[columns][by_index], sparse_points=points[by_index]))
        return SparseGap(e0={z: float(hyper.e0.get(z, 0.0)) for z in sorted(species)}, gps=tuple(gps))

    def indices(self, n_sparse: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
        return {d: order[:count] for d, order, count in zip(self.descriptors, self.orders, self.counts(n_sparse))}


# --------------------------------------------------------------------------- streamed factors


class TriangularFactor:
    """R of a tall matrix given block by block (TSQR: the QR of R stacked on the next rows), in O(n^2 + block).

    Rows are buffered until ``block_rows`` are there, then folded; ``r`` folds what is left and returns the
    (n, n) upper-triangular factor (zero rows where fewer rows than columns were given).
    """

    def __init__(self, n_columns: int, block_rows: int):
        self.n = n_columns
        self.buffer = np.zeros((n_columns + block_rows, n_columns), order="F")  # R on top, new rows below
        self.filled = 0

    def add(self, rows: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            room = len(self.buffer) - self.n - self.filled
            take = rows[start : start + room]
            self.buffer[self.n + self.filled : self.n + self.filled + len(take)] = take
            self.filled += len(take)
            start += len(take)
            if self.filled == len(self.buffer) - self.n:
                self._fold()

    def _fold(self) -> None:
        if self.filled == 0:
            return
        self.buffer[self.n + self.filled :] = 0.0
        (r,) = scipy.linalg.qr(self.buffer, mode="r", overwrite_a=True, check_finite=False)
        self.buffer[: self.n] = np.triu(r[: self.n])
        self.buffer[self.n :] = 0.0
        self.filled = 0

    @property
    def r(self) -> np.ndarray:
        self._fold()
        return np.array(self.buffer[: self.n])


def block_rows(n_columns: int) -> int:
    """Rows per TSQR fold: twice the columns, so re-triangularising R adds a third to the QR's cost."""
    return max(2 * n_columns, 512)


@dataclass
class Factors:
    """A training set's part of a GAP fit for one descriptor set, their zetas and ordered sparse set, delta = 1.

    ``k_mm`` (M, M); ``energy_rows`` (frames, M); ``force_r``: R of the force rows and their targets
    [K_F | -F] ((M + 1) x (M + 1); None without forces), ``force_rows``: how many force components it holds.
    """

    sparse: SparseSet
    k_mm: np.ndarray
    energy_rows: np.ndarray
    force_r: np.ndarray | None
    force_rows: int
    times: dict[str, float] = field(default_factory=dict)
    key: str = ""  # what the cache knows these factors by (rows of other frames against them are keyed by it)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"k_mm": self.k_mm, "energy_rows": self.energy_rows, "force_rows": np.array(self.force_rows)}
        if self.force_r is not None:
            out["force_r"] = self.force_r
        return out

    @classmethod
    def from_arrays(cls, sparse: SparseSet, a: Mapping[str, np.ndarray]) -> Factors:
        return cls(sparse, a["k_mm"], a["energy_rows"], a.get("force_r"), int(a["force_rows"]))

    def restricted(self, n_sparse: int | Sequence[int] | None) -> tuple[Factors, np.ndarray]:
        """The factors of a smaller sparse set, and its columns among these. One n_sparse for all descriptors
        keeps a prefix of the columns, whose factor is R's leading block (a QR property); other counts take
        R's columns of those points and the target, re-triangularised (|R[:, kept] a - R[:, M]| is the same norm)."""
        counts = self.sparse.counts(n_sparse)
        columns = self.sparse.columns(counts)
        if counts == self.sparse.counts():
            return self, columns
        m = len(columns)
        sparse = SparseSet(self.sparse.descriptors, tuple(o[:c] for o, c in zip(self.sparse.orders, counts)),
                           tuple(p[:c] for p, c in zip(self.sparse.points, counts)), tuple(x[:c] for x, c in zip(self.sparse.cutoffs, counts)))
        force_r = None
        if self.force_r is not None and columns[-1] == m - 1:
            # keep the target column and the residual rows: |K a - y|^2 = |R[:m,:m] a - R[:m,M]|^2 + |R[m:,M]|^2
            target = self.force_r[:, -1]
            force_r = np.zeros((m + 1, m + 1))
            force_r[:m, :m] = self.force_r[:m, :m]
            force_r[:m, m] = target[:m]
            force_r[m, m] = np.linalg.norm(target[m:])
        elif self.force_r is not None:
            kept = np.append(columns, self.sparse.size)
            (force_r,) = scipy.linalg.qr(self.force_r[:, kept], mode="r", check_finite=False)
            force_r = np.triu(force_r[: m + 1])
        return Factors(sparse, self.k_mm[np.ix_(columns, columns)], self.energy_rows[:, columns], force_r, self.force_rows, dict(self.times), self.key), columns


def frame_rows(sparse: SparseSet, atoms: ase.Atoms, with_forces: bool, cache: Cache | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One frame's energy row (M,) and force rows (3 n_atoms, M) in column order, delta = 1."""
    energy = np.zeros(sparse.size)
    forces = np.zeros((3 * len(atoms), sparse.size)) if with_forces else None
    for descriptor, points, cutoffs, columns, zeta in zip(sparse.descriptors, sparse.points, sparse.cutoffs, sparse.positions, sparse.zetas):
        env = environments(descriptor, [atoms], cache, gradients=with_forces)
        energy[columns] = kernels.energy_rows(env, points, cutoffs, zeta)[0]
        if with_forces:
            forces[:, columns] = kernels.force_rows(env, points, cutoffs, zeta, len(atoms))
    return energy, forces


def force_selection(frames: Sequence[ase.Atoms], fraction: float, seed: int) -> list[np.ndarray] | None:
    """Per frame, which atoms' forces enter the fit: a seeded ``fraction`` of each frame's atoms (at least
    one); None for all of them. The same selection goes to gap_fit as its force mask."""
    if fraction >= 1:
        return None
    rng = np.random.default_rng(seed)
    kept = []
    for atoms in frames:
        chosen = np.zeros(len(atoms), dtype=bool)
        chosen[rng.choice(len(atoms), max(1, int(round(fraction * len(atoms)))), replace=False)] = True
        kept.append(chosen)
    return kept


def build_factors(
    sparse: SparseSet,
    frames: Sequence[ase.Atoms],
    forces: Sequence[np.ndarray] | None = None,
    cache: Cache | None = None,
    progress: Callable[[int], None] | None = None,
    found: Mapping[str, Environments] | None = None,
    force_atoms: Sequence[np.ndarray] | None = None,
) -> Factors:
    """Visit the frames one by one (descriptors with gradients from quippy, or ``cache``): energy rows kept,
    force rows and -F folded into R (only the atoms of ``force_atoms``, per frame, when given).
    ``progress(i)`` after each frame. Without forces, the environments the sparse points were chosen
    from (``found``, all frames) give the energy rows at once."""
    start = time.perf_counter()
    m = sparse.size
    if forces is None and found is not None:
        energy_rows = np.zeros((len(frames), m))
        for descriptor, points, cutoffs, columns, zeta in zip(sparse.descriptors, sparse.points, sparse.cutoffs, sparse.positions, sparse.zetas):
            energy_rows[:, columns] = kernels.energy_rows(found[descriptor], points, cutoffs, zeta)
        return Factors(sparse, sparse.covariance(), energy_rows, None, 0, {"kernels_s": time.perf_counter() - start})
    energy_rows = np.zeros((len(frames), m))
    factor = TriangularFactor(m + 1, block_rows(m + 1)) if forces is not None else None
    n_force_rows = 0
    for i, atoms in enumerate(frames):
        energy_rows[i], rows = frame_rows(sparse, atoms, forces is not None, cache)
        if factor is not None:
            block = np.hstack([rows, -np.asarray(forces[i], dtype=float).reshape(-1, 1)])
            if force_atoms is not None:
                block = block[np.repeat(force_atoms[i], 3)]
            factor.add(block)
            n_force_rows += len(block)
        if progress is not None:
            progress(i + 1)
    force_r = factor.r if factor is not None else None
    return Factors(sparse, sparse.covariance(), energy_rows, force_r, n_force_rows,
                   {"kernels_s": time.perf_counter() - start})


@dataclass(frozen=True)
class Solution:
    """A solved fit: the model, its weights (one per column of the factors it was solved on that it uses:
    ``columns``, each scaled by ``scales``, its descriptor's delta^2), and its training errors (eV, eV/A)."""

    model: SparseGap
    weights: np.ndarray
    columns: np.ndarray
    scales: np.ndarray
    train_energies: np.ndarray
    train_force_rmse: float | None
    posterior: Posterior | None = None


def solve(factors: Factors, frames: Sequence[ase.Atoms], energies: np.ndarray, hyper: Hyper, n_sparse: int | Sequence[int] | None = None,
          with_posterior: bool = False) -> Solution:
    """gap_fit's least-squares problem on ``factors`` restricted to ``n_sparse`` (None: each descriptor's own), by QR;
    ``with_posterior``: the solution carries its ``Posterior`` (from the same factorisation)."""
    factors, columns = factors.restricted(factors.sparse.requested if n_sparse is None else n_sparse)
    m = factors.sparse.size
    scale = factors.sparse.scales()  # K = delta^2 K(delta=1), per descriptor: columns of K_NM and R, blocks of K_MM
    e0 = hyper.e0_of(frames)
    k_mm, k_nm, sigma = _weighted_problem(factors, frames, hyper)
    y = np.asarray(energies, dtype=float) - e0
    if factors.force_r is not None:
        y = np.concatenate([y, factors.force_r[:m, m]])
    weights, found = solve_projected_process(k_mm, k_nm, y, sigma, posterior=True) if with_posterior else (solve_projected_process(k_mm, k_nm, y, sigma), None)
    force_rmse = None
    if factors.force_r is not None and factors.force_rows:
        residual = scale * factors.force_r[:m, :m] @ weights - factors.force_r[:m, m]
        force_rmse = float(np.sqrt((residual @ residual + factors.force_r[m, m] ** 2) / factors.force_rows))
    species = sorted({int(z) for atoms in frames for z in atoms.numbers})
    model = factors.sparse.model(weights, hyper, species)
    posterior = posterior_from_factors(factors.sparse, found) if with_posterior else None
    return Solution(model, weights, columns, scale, e0 + (scale * factors.energy_rows) @ weights, force_rmse, posterior)


def posterior_of(factors: Factors, frames: Sequence[ase.Atoms], hyper: Hyper, n_sparse: int | Sequence[int] | None = None) -> Posterior:
    """The ``Posterior`` of a fit's factors: its weighted problem solved again, keeping the posterior's factors."""
    factors, _ = factors.restricted(factors.sparse.requested if n_sparse is None else n_sparse)
    k_mm, k_nm, sigma = _weighted_problem(factors, frames, hyper)
    _, found = solve_projected_process(k_mm, k_nm, np.zeros(len(k_nm)), sigma, posterior=True)
    return posterior_from_factors(factors.sparse, found)


def posterior_from_factors(sparse: SparseSet, found: Mapping[str, np.ndarray]) -> Posterior:
    m = sparse.size
    return Posterior(sparse.descriptors, sparse.points, sparse.cutoffs, tuple(sparse.positions), sparse.deltas, sparse.zetas,
                     found["lower"], np.triu(found["r"][:m]) if "r" in found else None, found.get("b"))


def posterior_of_model(model: SparseGap, frames: Sequence[ase.Atoms], hyper: Hyper, forces: Sequence[np.ndarray] | None = None,
                       cache: Cache | None = None, force_atoms: Sequence[np.ndarray] | None = None) -> Posterior:
    """The posterior of a fitted model of any origin (gap_fit's XML or hpo's): its sparse points against the
    training frames' descriptors (and force rows when ``forces``), factorised as ``build_factors`` does."""
    sparse = SparseSet(tuple(model.descriptors), tuple(np.arange(len(gp.alpha)) for gp in model.gps),
                       tuple(gp.sparse_points for gp in model.gps), tuple(np.ones(len(gp.alpha)) for gp in model.gps))
    factors = build_factors(sparse, frames, forces, cache,
                            found=None if forces is not None else {d: environments(d, frames, cache) for d in sparse.descriptors},
                            force_atoms=force_atoms)
    return posterior_of(factors, frames, hyper, n_sparse=[len(gp.alpha) for gp in model.gps])


def _weighted_problem(factors: Factors, frames: Sequence[ase.Atoms], hyper: Hyper) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gap_fit's K_MM (each descriptor's delta^2, jitter added), stacked K_NM (energies, then the force factor's
    rows) and their noise sigma."""
    m = factors.sparse.size
    scale = factors.sparse.scales()
    n_atoms = np.array([len(a) for a in frames])
    k_mm = np.sqrt(scale)[:, None] * factors.k_mm * np.sqrt(scale)[None, :]
    k_mm[np.diag_indices_from(k_mm)] += hyper.sparse_jitter
    k_nm = scale * factors.energy_rows
    sigma = hyper.energy_sigma * np.sqrt(n_atoms)
    if factors.force_r is not None:
        k_nm = np.vstack([k_nm, scale * factors.force_r[:m, :m]])
        sigma = np.concatenate([sigma, np.full(m, hyper.force_sigma)])
    return k_mm, k_nm, sigma


@dataclass(frozen=True)
class EvaluationRows:
    """Kernel rows of frames to predict (delta = 1), against the columns of a ``Factors``: a solved model's
    energies and forces on them are two matrix-vector products, for any deltas and any smaller n_sparse."""

    energy_rows: np.ndarray  # (frames, M)
    force_rows: np.ndarray | None  # (3 atoms, M), atom-major

    @classmethod
    def of(cls, sparse: SparseSet, frames: Sequence[ase.Atoms], with_forces: bool, cache: Cache | None = None) -> EvaluationRows:
        rows = [frame_rows(sparse, atoms, with_forces, cache) for atoms in frames]
        return cls(np.array([e for e, _ in rows]).reshape(len(frames), sparse.size),
                   np.vstack([f for _, f in rows]) if with_forces and rows else None)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"energy_rows": self.energy_rows, **({"force_rows": self.force_rows} if self.force_rows is not None else {})}

    def predict(self, solution: Solution, hyper: Hyper, frames: Sequence[ase.Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Energies (eV) and forces (eV/A, empty without force rows) of ``solution`` on these frames."""
        weights = solution.scales * solution.weights
        energies = hyper.e0_of(frames) + self.energy_rows[:, solution.columns] @ weights
        if self.force_rows is None:
            return energies, []
        forces = -(self.force_rows[:, solution.columns] @ weights)  # F = -dE/dr
        out, offset = [], 0
        for atoms in frames:
            out.append(forces[offset : offset + 3 * len(atoms)].reshape(len(atoms), 3))
            offset += 3 * len(atoms)
        return energies, out


def fit_frames(
    params: dict,
    frames: Sequence[ase.Atoms],
    energies: np.ndarray,
    e0: Mapping[str, float],
    forces: Sequence[np.ndarray] | None = None,
    sparse_method: str = "fps",
    seed: int = 0,
    cache: Cache | None = None,
    times: SolveTimes | None = None,
    threads: int = 1,
    force_atoms: Sequence[np.ndarray] | None = None,
) -> tuple[SparseGap, dict[str, np.ndarray]]:
    """Everything after the data: descriptors (cached), hpo's sparse points, the streamed factors and the
    solve. Returns the model and the sparse indices of each descriptor (0-based, selection order)."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    descriptors = gap_fit.expected_descriptors(params, frames)
    found = {d: environments(d, frames, cache) for d in descriptors}
    orders = {d: select_sparse(found[d].vectors, int(descriptor_value(d, "n_sparse")), sparse_method, seed) for d in descriptors}
    sparse = SparseSet.of(found, orders)
    hyper = Hyper.from_params(params, e0)
    times = times if times is not None else SolveTimes()
    with threadpool_limits(limits=threads):
        factors = build_factors(sparse, frames, forces, cache, found=found, force_atoms=force_atoms)
        times.kernels_s += factors.times["kernels_s"]
        start = time.perf_counter()
        solution = solve(factors, frames, energies, hyper)
        times.solve_s += time.perf_counter() - start
    return solution.model, sparse.indices()


# --------------------------------------------------------------------------- memory, known before


def memory_bytes(n_sparse_total: int, frames: Sequence[ase.Atoms], dimensions: int | Sequence[int],
                 pairs_per_atom: float | Sequence[float], with_forces: bool) -> int:
    """Peak memory of a streamed fit (bytes), from the arrays it holds at once.

    Grows with the training set only through the energy rows (frames x M) and the descriptor vectors of
    the sparse selection (environments x d, every descriptor's); the force part is one frame's descriptor
    gradients of one descriptor at a time (quippy's and hpo's copy), one chunk of kernel gradients, one
    frame's force rows and the TSQR buffer and its QR copy. ``dimensions`` and ``pairs_per_atom`` (gradient
    pairs per centre: neighbours inside the cutoff plus itself) are one value, or one per descriptor setting.
    """
    dimensions = [dimensions] if isinstance(dimensions, (int, np.integer)) else list(dimensions)
    pairs_per_atom = [pairs_per_atom] * len(dimensions) if isinstance(pairs_per_atom, (int, float)) else list(pairs_per_atom)
    m = int(n_sparse_total)
    n_frames = len(frames)
    environments_total = sum(len(a) for a in frames)
    largest = max(len(a) for a in frames)
    total = BASELINE_BYTES
    total += 8 * environments_total * sum(dimensions) * 2  # vectors for the sparse selection, and their per-frame parts while joined
    total += 8 * n_frames * m * 3  # energy rows, and the solve's stacked copies
    total += 8 * m * m * 4  # K_MM, its Cholesky factor, the solve's R rows and QR copies
    if with_forces:
        pairs = largest * max(pairs_per_atom)
        total += 8 * largest * max(p * d for p, d in zip(pairs_per_atom, dimensions)) * 3 * 2  # one frame's gradients, quippy's array and hpo's
        total += 8 * min(pairs, kernels.PAIR_CHUNK) * 3 * m * 2  # kernel gradients of one chunk, and their sum
        total += 8 * 3 * largest * (m + 1) * 3  # one frame's force rows, their scatter and the stacked copy
        total += 8 * (m + 1 + block_rows(m + 1)) * (m + 1) * 2  # TSQR buffer and the R that LAPACK returns
        total += 8 * (m + 1) ** 2 * 2  # R kept, and its copy in the final stack
    return int(total)


# --------------------------------------------------------------------------- forces of a SparseGap




def predict(model: SparseGap, frames: Sequence[ase.Atoms], cache: Cache | None = None, with_forces: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV) and, ``with_forces``, forces (eV/A) of ``frames``, in blocks of about ``PREDICT_ATOMS`` atoms."""
    energies, forces, block, atoms_in_block = [], [], [], 0

    def flush() -> None:
        found = {d: environments(d, block, cache, gradients=with_forces) for d in model.descriptors}
        energies.append(model.energies(block, found))
        if with_forces:
            forces.extend(predict_forces(model, found, block))
        block.clear()

    for atoms in frames:
        block.append(atoms)
        atoms_in_block += len(atoms)
        if atoms_in_block >= PREDICT_ATOMS:
            flush()
            atoms_in_block = 0
    if block:
        flush()
    return (np.concatenate(energies) if energies else np.zeros(0)), forces



def predict_forces(model: SparseGap, found: Mapping[str, Environments], frames: Sequence[ase.Atoms]) -> list[np.ndarray]:
    """Forces (eV/A) per frame from environments with gradients (``environments(..., gradients=True)``).

    The energy's derivative with respect to each environment's descriptor comes first (one d-vector per
    environment: g_i = zeta sum_s alpha_s (q_i.x_s)^(zeta-1) x_s), then its product with the descriptor
    gradients: cost ~ pairs x 3 x d, not pairs x 3 x d x M as with the kernel gradients the fit needs.
    """
    total_atoms = sum(len(a) for a in frames)
    forces = np.zeros((total_atoms, 3))
    for gp in model.gps:
        env = found[gp.descriptor]
        dots = env.vectors @ gp.sparse_points.T  # (n_env, M)
        g = (gp.zeta * dots ** (gp.zeta - 1) * gp.alpha) @ gp.sparse_points  # (n_env, d)
        u = dots**gp.zeta @ gp.alpha  # (n_env,)
        per_pair = np.empty((len(env.grad_env), 3))
        for start in range(0, len(env.grad_env), FORCE_PAIR_CHUNK):  # bounds the (pairs, d) temporary
            rows = slice(start, start + FORCE_PAIR_CHUNK)
            owner = env.grad_env[rows]
            per_pair[rows] = np.einsum("pkd,pd->pk", env.grad[rows], g[owner]) * env.cutoff[owner][:, None]
            per_pair[rows] += env.grad_cutoff[rows] * u[owner][:, None]
        forces -= gp.delta**2 * kernels.sum_rows(env.grad_atom, total_atoms, per_pair)  # F = -dE/dr_atom
    out, offset = [], 0
    for atoms in frames:
        out.append(forces[offset : offset + len(atoms)])
        offset += len(atoms)
    return out


# --------------------------------------------------------------------------- a model quippy can load

N_ELEMENTS = 118  # gap_fit writes an e0 for every element
SLICE = 50  # values per <sparseX_slice>, as gap_fit writes long sparse points
SLICE_FIELD = 26  # characters per value in a slice (repr of a double takes at most 24)
# gap_version of the quippy-ase 0.10.3 gap_fit; quippy reads older models differently (its compatibility switches).
GAP_VERSION = 1769700636


def write_xml(model: SparseGap, path: Path, label: str = "GAP_hpo") -> Path:
    """Write ``model`` in gap_fit's XML layout (``sparse_separate_file=F``), loadable by quippy's ``Potential``.

    For what needs quippy itself (MD, ``gap.load``) on a model hpo solved;
    ``SparseGap.read`` reads it back. ``label`` must be a valid XML name.
    """
    from xml.sax.saxutils import escape

    def number(value: float) -> str:
        return repr(float(value))

    lines = [f"<{label}>", f'<Potential label="{label}" init_args="IP GAP label={label}"/>']
    lines.append(f'<GAP_params label="{label}" gap_version="{GAP_VERSION}">')
    lines.append('  <GAP_data do_core="F">')
    lines += [f'    <e0 Z="{z}" value="{number(model.e0.get(z, 0.0))}"/>' for z in range(1, N_ELEMENTS + 1)]
    lines.append("  </GAP_data>")
    lines.append(f'  <gpSparse label="{label}" n_coordinate="{len(model.gps)}" fitted="T">')
    for i, gp in enumerate(model.gps, start=1):
        n, d = gp.sparse_points.shape
        lines.append(
            f'    <gpCoordinates label="{label}{i}" dimensions="{d}" signal_variance="{number(gp.delta)}" '
            f'signal_mean="0.0" sparsified="T" n_permutations="1" covariance_type="2" zeta="{number(gp.zeta)}" '
            f'n_sparseX="{n}">'
        )
        lines.append(f"      <descriptor>{escape(gp.descriptor)}</descriptor>")
        lines.append('      <permutation i="1">1</permutation>')
        for j, (alpha, point) in enumerate(zip(gp.alpha, gp.sparse_points), start=1):
            if len(point) <= SLICE:
                values = " ".join(map(repr, point.tolist()))
                lines.append(f'      <sparseX i="{j}" alpha="{number(alpha)}" sparseCutoff="1.0">{values}</sparseX>')
                continue
            # quippy cannot read a long vector from one line: gap_fit writes slices of 50 values, and quippy
            # reads a slice by fixed-width fields of 26 characters (measured: single-spaced values fail)
            lines.append(f'      <sparseX i="{j}" alpha="{number(alpha)}" sparseCutoff="1.0" sliced="T">')
            for start in range(0, len(point), SLICE):
                chunk = point[start : start + SLICE]
                values = "".join(map(f"{{:>{SLICE_FIELD}}}".format, map(repr, chunk.tolist())))
                lines.append(f'        <sparseX_slice start="{start + 1}" end="{start + len(chunk)}">{values}</sparseX_slice>')
            lines.append("      </sparseX>")
        lines.append("    </gpCoordinates>")
    lines += ["  </gpSparse>", "</GAP_params>", f"</{label}>"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
