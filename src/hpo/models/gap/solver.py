"""A sparse-GP solver in numpy that gives the same GAP as ``gap_fit``, on sparse points hpo chooses.

Two halves, each checked against gap_fit itself (``tests/test_gap_solver.py``):

* **Sparse points chosen by hpo.** ``hpo.models.sparse_gp.select_sparse`` picks environments by
  farthest-point sampling (or CUR, or at random) on quippy's descriptors;
  ``write_sparse_index_file`` and ``gap_fit_sparse_args`` hand exactly those to
  gap_fit (``sparse_method=index_file sparse_file=<file>``: 1-based indices, one
  per line, into the list of environments of that descriptor, frame by frame
  in file order, atom by atom). gap_fit copies one ``sparse_file`` to every
  species it splits a multi-species descriptor into, so hpo writes the
  per-species descriptors itself (``add_species=F``, joined by ``:``), each with
  its own index file. gap_fit sorts the indices; the model lists sparse points
  in increasing index order.

* **The same fit without gap_fit.** ``fit`` builds gap_fit's linear system from
  the same descriptors and solves it. gap_fit's model (gp_predict.F90,
  gap_fit_module.F90 of GAP, verified here by equality):

    - one sparse GP per descriptor (per centre species), dot-product kernel
      k(q, x) = delta^2 * c_q * c_x * (q . x)^zeta (c: covariance cutoff,
      1 for SOAP centres); K_MM is block diagonal over descriptors, plus
      ``sparse_jitter`` on its diagonal;
    - an energy target per frame: E - sum_atoms e0(Z), covariance with sparse
      point s the sum over the frame's environments of k(q_i, x_s); its noise
      sigma_E = default_sigma[0] * sqrt(n_atoms) (``sigma_per_atom=T``, the default);
    - a target per force component: -F (the energy gradient), covariance the
      gradient of the energy row w.r.t. that atom's position (descriptor
      gradients, plus the covariance cutoff's gradient); noise default_sigma[1],
      unscaled;
    - alpha from the least-squares problem [Lambda^-1/2 K_NM; U] alpha = [Lambda^-1/2 y; 0]
      with K_MM = U^T U, solved by QR (gap_fit's own route).

  The result is a ``sparse_gap.SparseGap``: it predicts like a model read from
  gap_fit's XML (energies; ``predict_forces`` for forces), and ``write_xml``
  writes it in gap_fit's layout for quippy's ``Potential`` (MD).

Descriptors and their gradients are computed once per (descriptor, frames) and
cached by content (``environments``, kind ``gap_solver_descriptors``);
a refit that changes only delta, zeta, sigmas, jitter, e0 or the sparse points
reuses them. Gradients are large (n_pairs x 3 x d doubles: about 3.5 MB per
12-atom water frame at n_max=4, l_max=6, cutoff 5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import ase
import numpy as np
import scipy.linalg

from hpo.cache import Cache
from hpo.models.gap import gap_fit
from hpo.models.gap.descriptors import Environments, environments
from hpo.models.sparse_gp import select_sparse, solve_projected_process
from hpo.models.gap.sparse_gap import SparseGap, SparseGP

FORCE_PAIR_CHUNK = 20000  # gradient pairs per block of predict_forces


# --------------------------------------------------------------------------- the solver


@dataclass(frozen=True)
class Hyper:
    """The GP settings of one fit, in gap_fit's meaning."""

    delta: float
    zeta: float
    energy_sigma: float  # default_sigma[0], per atom (scaled by sqrt(n_atoms))
    force_sigma: float  # default_sigma[1]
    sparse_jitter: float
    e0: Mapping[int, float]  # isolated-atom energy per atomic number

    @classmethod
    def from_params(cls, params: dict, e0: Mapping[str, float]) -> Hyper:
        from ase.data import atomic_numbers

        sigma = params["default_sigma"]
        return cls(
            delta=float(params["delta"]), zeta=float(params["zeta"]),
            energy_sigma=float(sigma["energy"]), force_sigma=float(sigma["force"]),
            sparse_jitter=float(params["sparse_jitter"]),
            e0={atomic_numbers[s]: float(v) for s, v in e0.items()},
        )


@dataclass
class SolveTimes:
    kernels_s: float = 0.0
    solve_s: float = 0.0


def _sum_rows(groups: np.ndarray, n_groups: int, values: np.ndarray) -> np.ndarray:
    """Rows of ``values`` summed by group (a sparse 0/1 matrix product: much faster than np.add.at)."""
    import scipy.sparse

    ones = np.ones(len(groups))
    matrix = scipy.sparse.csr_matrix((ones, (groups, np.arange(len(groups)))), shape=(n_groups, len(groups)))
    return np.asarray(matrix @ values.reshape(len(groups), -1)).reshape((n_groups,) + values.shape[1:])


def _energy_gradient_kernels(env: Environments, x: np.ndarray, c_sparse: np.ndarray, delta: float, zeta: float) -> np.ndarray:
    """d k(q_env, x_s) / d r_atom per gradient pair: (n_pairs, 3, M); zero cutoff gradients (SOAP) cost nothing."""
    pair_dots = (env.vectors @ x.T)[env.grad_env]  # (n_pairs, M)
    n_pairs, d = len(env.grad_env), x.shape[1]
    grad_dots = (env.grad.reshape(n_pairs * 3, d) @ x.T).reshape(n_pairs, 3, -1)
    scale = zeta * pair_dots ** (zeta - 1) * env.cutoff[env.grad_env][:, None]
    d_k = grad_dots * scale[:, None, :]
    if np.any(env.grad_cutoff):
        d_k += env.grad_cutoff[:, :, None] * (pair_dots**zeta)[:, None, :]
    d_k *= delta**2 * c_sparse[None, None, :]
    return d_k


def _kernel_blocks(env: Environments, sparse: np.ndarray, hyper: Hyper, n_atoms: int | None):
    """Energy rows (n_frames, M) and, if ``n_atoms``, force rows (3 * n_atoms, M, atom-major) of one descriptor."""
    x = env.vectors[sparse]
    c_sparse = env.cutoff[sparse]
    k_env = hyper.delta**2 * env.cutoff[:, None] * (env.vectors @ x.T) ** hyper.zeta * c_sparse[None, :]
    energy_rows = _sum_rows(env.frame, env.n_frames, k_env)
    if n_atoms is None:
        return energy_rows, None
    if not env.has_gradients:
        raise ValueError("force targets need descriptor gradients: environments(..., gradients=True)")
    d_k = _energy_gradient_kernels(env, x, c_sparse, hyper.delta, hyper.zeta)
    return energy_rows, _sum_rows(env.grad_atom, n_atoms, d_k).reshape(3 * n_atoms, len(sparse))


def fit(
    found: Mapping[str, Environments],
    sparse: Mapping[str, np.ndarray],
    frames: Sequence[ase.Atoms],
    energies: np.ndarray,
    hyper: Hyper,
    forces: Sequence[np.ndarray] | None = None,
    times: SolveTimes | None = None,
    threads: int = 1,
) -> SparseGap:
    """The GAP gap_fit would fit on ``frames`` with these sparse points: a ``SparseGap`` (alphas solved in numpy).

    ``found`` maps each descriptor string (one per centre species, as in
    ``gap_fit.expected_descriptors``) to the frames' environments; ``sparse`` maps it
    to 0-based environment indices (any order: used sorted, like gap_fit).
    ``forces`` (per frame, (n_atoms, 3), eV/A) adds force targets, which need
    environments with gradients. ``threads``: BLAS threads of the solve (on a
    loaded machine, many threads make a small QR a hundred times slower).
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=threads):
        return _fit(found, sparse, frames, energies, hyper, forces, times if times is not None else SolveTimes())


def _fit(found, sparse, frames, energies, hyper: Hyper, forces, times: SolveTimes) -> SparseGap:
    start = time.perf_counter()
    descriptors = list(found)
    n_atoms = np.array([len(a) for a in frames])
    total_atoms = int(n_atoms.sum())
    use_forces = forces is not None
    columns, k_mm_blocks, energy_cols, force_cols = [], [], [], []
    for descriptor in descriptors:
        env = found[descriptor]
        index = np.sort(np.asarray(sparse[descriptor], dtype=int))
        columns.append(index)
        x = env.vectors[index]
        c = env.cutoff[index]
        k_mm_blocks.append(hyper.delta**2 * np.outer(c, c) * (x @ x.T) ** hyper.zeta)
        energy_rows, force_rows = _kernel_blocks(env, index, hyper, total_atoms if use_forces else None)
        energy_cols.append(energy_rows)
        if use_forces:
            force_cols.append(force_rows)
    k_mm = scipy.linalg.block_diag(*k_mm_blocks)
    k_mm[np.diag_indices_from(k_mm)] += hyper.sparse_jitter
    k_nm = np.hstack(energy_cols)
    e0 = np.array([sum(hyper.e0.get(int(z), 0.0) for z in atoms.numbers) for atoms in frames])
    y = np.asarray(energies, dtype=float) - e0
    sigma = hyper.energy_sigma * np.sqrt(n_atoms)
    if use_forces:
        k_nm = np.vstack([k_nm, np.hstack(force_cols)])
        y = np.concatenate([y, -np.concatenate([np.asarray(f, float).reshape(-1) for f in forces])])
        sigma = np.concatenate([sigma, np.full(3 * total_atoms, hyper.force_sigma)])
    times.kernels_s += time.perf_counter() - start
    start = time.perf_counter()
    alpha = solve_projected_process(k_mm, k_nm, y, sigma)
    times.solve_s += time.perf_counter() - start
    gps, offset = [], 0
    for descriptor, index in zip(descriptors, columns):
        env = found[descriptor]
        gps.append(
            SparseGP(
                descriptor=descriptor, delta=hyper.delta, zeta=hyper.zeta,
                alpha=alpha[offset : offset + len(index)], sparse_points=env.vectors[index],
            )
        )
        offset += len(index)
    species = sorted({int(z) for atoms in frames for z in atoms.numbers})
    return SparseGap(e0={z: float(hyper.e0.get(z, 0.0)) for z in species}, gps=tuple(gps))


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
) -> tuple[SparseGap, dict[str, np.ndarray]]:
    """Everything after the data: descriptors (cached), hpo's sparse points, the solve. Returns the model and the sparse indices."""
    descriptors = gap_fit.expected_descriptors(params, frames)
    found = {d: environments(d, frames, gradients=forces is not None, cache=cache) for d in descriptors}
    sparse = {d: select_sparse(found[d].vectors, params["n_sparse"], sparse_method, seed) for d in descriptors}
    model = fit(found, sparse, frames, energies, Hyper.from_params(params, e0), forces=forces, times=times, threads=threads)
    return model, sparse


# --------------------------------------------------------------------------- forces of a SparseGap


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
        forces -= gp.delta**2 * _sum_rows(env.grad_atom, total_atoms, per_pair)  # F = -dE/dr_atom
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
