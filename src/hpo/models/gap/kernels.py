"""Covariance rows of a GAP: one frame's environments against the sparse points, for energies and forces.

gap_fit's dot-product kernel between an environment q (covariance cutoff c_q) and a sparse point x (c_x) is
k(q, x) = delta^2 c_q c_x (q . x)^zeta. A frame's energy row is the sum of k over its environments; the
force rows are that sum's gradient with respect to each atom's position (descriptor gradients, plus the
covariance cutoff's gradient). Rows here are for delta = 1: delta^2 scales them all, so rows computed once
serve every delta.

The gradient rows cost n_pairs x 3 x d x M multiply-adds (one product of each descriptor gradient with every
sparse point), the bulk of a fit with forces; pairs are taken ``PAIR_CHUNK`` at a time so the
(pairs, 3, M) temporary stays a few hundred MB whatever the cell size.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from hpo.models.gap.descriptors import Environments

PAIR_CHUNK = 2048  # gradient pairs per product: 2048 x 3 x 4000 sparse points x 8 bytes = 197 MB


def sum_rows(groups: np.ndarray, n_groups: int, values: np.ndarray) -> np.ndarray:
    """Rows of ``values`` summed by group (a sparse 0/1 matrix product: much faster than np.add.at)."""
    if len(groups) == 0:  # e.g. a frame without atoms of this descriptor's centre species
        return np.zeros((n_groups,) + values.shape[1:])
    ones = np.ones(len(groups))
    matrix = scipy.sparse.csr_matrix((ones, (groups, np.arange(len(groups)))), shape=(n_groups, len(groups)))
    return np.asarray(matrix @ values.reshape(len(groups), -1)).reshape((n_groups,) + values.shape[1:])


def sparse_covariance(points: np.ndarray, cutoffs: np.ndarray, zeta: float) -> np.ndarray:
    """K_MM of one descriptor's sparse points (delta = 1)."""
    return np.outer(cutoffs, cutoffs) * (points @ points.T) ** zeta


def energy_rows(env: Environments, points: np.ndarray, cutoffs: np.ndarray, zeta: float) -> np.ndarray:
    """(n_frames, M): per frame, the sum over its environments of k(q_i, x_s) (delta = 1)."""
    k_env = env.cutoff[:, None] * (env.vectors @ points.T) ** zeta * cutoffs[None, :]
    return sum_rows(env.frame, env.n_frames, k_env)


def force_rows(env: Environments, points: np.ndarray, cutoffs: np.ndarray, zeta: float, n_atoms: int) -> np.ndarray:
    """(3 * n_atoms, M), atom-major: d/dr_atom of the energy rows (delta = 1); needs environments with gradients."""
    if not env.has_gradients:
        raise ValueError("force rows need descriptor gradients: environments(..., gradients=True)")
    dots = env.vectors @ points.T  # (n_env, M)
    # d k(q_i, x)/d q_i = zeta (q_i . x)^(zeta - 1) c_i c_x x: the per-environment factor of each gradient product
    scale = zeta * dots ** (zeta - 1) * env.cutoff[:, None] * cutoffs[None, :]
    with_cutoff_gradient = bool(np.any(env.grad_cutoff))  # zero for SOAP centres: costs nothing then
    value = dots**zeta * cutoffs[None, :] if with_cutoff_gradient else None
    rows = np.zeros((n_atoms, 3, len(points)))
    d = points.shape[1]
    for start in range(0, len(env.grad_env), PAIR_CHUNK):
        chunk = slice(start, start + PAIR_CHUNK)
        owner = env.grad_env[chunk]
        d_k = (env.grad[chunk].reshape(-1, d) @ points.T).reshape(-1, 3, len(points))
        d_k *= scale[owner][:, None, :]
        if with_cutoff_gradient:
            d_k += env.grad_cutoff[chunk][:, :, None] * value[owner][:, None, :]
        rows += sum_rows(env.grad_atom[chunk], n_atoms, d_k)
    return rows.reshape(3 * n_atoms, len(points))
