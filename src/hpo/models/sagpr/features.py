"""Per-atom feature blocks, their sparsification and normalisation, and the atom-pair SA-GPR kernels.

This is the numerical half of :mod:`hpo.models.sagpr.estimator` (the estimator lives there;
featurisation in :mod:`hpo.models.sagpr.lambda_soap`). The algorithm is written out in
``docs/sagpr-reference.md`` of the shared workspace; the short version:

* raw features: the equivariant power spectrum of a Gaussian density
  (lambda = 0 invariants, lambda = 2 covariants with 5 components each), one row
  per atom, frames concatenated in order;
* optional sparsification: farthest-point sampling of ``nc`` columns, then the
  "A-matrix" that makes the kept columns reproduce the full Gram matrix;
* per-atom normalisation; then structure kernels K0 (N, N) and K2 (N, 5, N, 5)
  that average atom-pair kernels over the atoms of each frame.

Everything that is cached on disk is addressed by :func:`hpo.cache.digest`, so the same
inputs always map to the same file, whichever process wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.utils import check_random_state

__all__ = [
    "FeatureBlock",
    "Projection",
    "column_gram",
    "farthest_point_columns",
    "fit_projection",
    "normalise",
    "pair_kernels",
]

# Bytes one temporary atom-pair array may take while building kernels. Bounds
# peak memory independently of the number of frames; 128 MB blocks are large
# enough that BLAS, not Python, dominates.
KERNEL_BLOCK_BYTES = 2**27


def frame_ranges(counts, max_atoms: int, start: int = 0):
    """Ranges [f0, f1) of consecutive frames (from ``start``) holding at most ``max_atoms`` atoms in all,
    at least one frame each; ``counts`` are the frames' atom counts. Every chunked loop over frames uses
    these, so per-frame sums never straddle two chunks."""
    f0, held = start, 0
    for f1 in range(start, len(counts)):
        if f1 > f0 and held + counts[f1] > max_atoms:
            yield f0, f1
            f0, held = f1, 0
        held += counts[f1]
    if f0 < len(counts):
        yield f0, len(counts)


@dataclass
class FeatureBlock:
    """Per-atom features of a list of frames, rows ordered frame by frame.

    ``x0`` has shape (n_atoms, F0), ``x2`` (n_atoms, 5, F2); ``counts[i]`` is
    the number of atoms of frame i, so the rows of frame i are
    ``offsets[i]:offsets[i] + counts[i]``.
    """

    x0: np.ndarray
    x2: np.ndarray
    counts: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def n_frames(self) -> int:
        return len(self.counts)

    @classmethod
    def concatenate(cls, blocks: Sequence["FeatureBlock"]) -> "FeatureBlock":
        return cls(
            x0=np.concatenate([b.x0 for b in blocks]),
            x2=np.concatenate([b.x2 for b in blocks]),
            counts=np.concatenate([b.counts for b in blocks]),
        )

    def split(self) -> list["FeatureBlock"]:
        """One block per frame (views, no copy)."""
        cuts = np.cumsum(self.counts)[:-1]
        return [
            FeatureBlock(x0, x2, self.counts[i : i + 1])
            for i, (x0, x2) in enumerate(zip(np.split(self.x0, cuts), np.split(self.x2, cuts)))
        ]


# --------------------------------------------------------------------------- #
# sparsification and normalisation
# --------------------------------------------------------------------------- #
@dataclass
class Projection:
    """Kept columns and the A matrix of one lambda: sparse = X[:, columns] @ A."""

    columns: np.ndarray
    matrix: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x[..., self.columns] @ self.matrix


def fit_projection(gram: np.ndarray, n_columns: int, seed: int) -> Projection:
    """Farthest-point-sample ``n_columns`` columns of X and build A, from X's column Gram matrix.

    ``gram`` = X^T X, X with rows = (atom[, mu]) and columns = features: summed over chunks of
    frames (:func:`column_gram`), so X itself is never held. With C = X[:, fps],
    U = pinv(C) X and A = (U U^T)^(1/2), (C A)(C A)^T is the projection of X X^T onto the span of
    C: the kept columns reproduce the full kernel as well as k columns can. In Gram terms
    U = G_cc^+ G_c: with G_cc = V W V^T, so U U^T = B (Y Y^T) B^T with Y = W^-1/2 V^T G_c: and
    B = V W^-1/2: forming Y first keeps round-off at cond(C) (measured on the 200 workshop frames,
    nc=200: the kernels of an SVD of C to 1.5e-11 for lambda=0 and 5e-13 for lambda=2; a test checks
    1e-9), where G_cc^+ (G_c: G_:c) G_cc^+ loses cond(C)^2 (2 % kernel error for lambda=0 there).
    Directions with W below n_columns eps W_max are dropped, as pinv would.
    """
    columns = farthest_point_columns(gram, n_columns, seed)
    eigval, eigvec = np.linalg.eigh(gram[np.ix_(columns, columns)])
    kept = eigval > eigval[-1] * n_columns * np.finfo(float).eps
    scale = 1.0 / np.sqrt(eigval[kept])
    y = (eigvec[:, kept].T @ gram[columns]) * scale[:, None]
    b = eigvec[:, kept] * scale
    eigval, eigvec = np.linalg.eigh(b @ (y @ y.T) @ b.T)
    # U U^T is PSD; tiny negative eigenvalues are round-off
    matrix = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T
    return Projection(columns=columns, matrix=matrix)


def column_gram(x: np.ndarray) -> np.ndarray:
    """X^T X of rows = (atom[, mu]): lambda = 2 features (atoms, 5, F) count every mu as a row."""
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x


def farthest_point_columns(gram: np.ndarray, n_columns: int, seed: int) -> np.ndarray:
    """Greedy farthest-point sampling of the columns of X (squared Euclidean), from ``gram`` = X^T X.

    Picks the same columns as ``skmatter.feature_selection.FPS(n_to_select=n_columns,
    initialize="random", random_state=seed)`` on X (a test checks this) but works on the column
    Gram matrix: skmatter re-reads all of X at every step, which for the 12000 x 2096 lambda = 2
    matrix of 200 water frames takes over 10 s instead of about 1 s.
    """
    n = gram.shape[1]
    first = check_random_state(seed).randint(n)  # skmatter's draw for the first column
    norms = np.diag(gram).copy()
    distance = np.full(n, np.inf)
    selected = np.empty(n_columns, dtype=np.int64)
    selected[0] = first
    for i in range(1, n_columns):
        last = selected[i - 1]
        np.minimum(distance, norms + norms[last] - 2.0 * gram[last], out=distance)
        distance[last] = -np.inf  # never pick a column twice, even if round-off says d > 0
        selected[i] = np.argmax(distance)
    return selected


def normalise(x0: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom normalisation: p / |p| and P / ||P P^T||_F^(1/2).

    The lambda = 2 norm is rotation invariant (P P^T transforms as D M D^T), so
    normalising keeps the features covariant. An atom with no neighbour
    inside the cutoff has P = 0 (a lone density is isotropic); it stays zero
    and adds nothing to the kernels instead of turning them into NaN.
    """
    p0 = _safe_divide(x0, np.linalg.norm(x0, axis=1)[:, None])
    gram = np.einsum("amf,anf->amn", x2, x2)
    p2 = _safe_divide(x2, np.sqrt(np.linalg.norm(gram, axis=(1, 2)))[:, None, None])
    return p0, p2


def _safe_divide(x: np.ndarray, norm: np.ndarray) -> np.ndarray:
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #
def pair_kernels(left: FeatureBlock, right: FeatureBlock | None, zeta: int) -> tuple[np.ndarray, np.ndarray]:
    """Structure kernels between the frames of ``left`` and ``right`` (None: left vs left).

    K0[i, j]         = 1/(N_i N_j) sum_{a in i, b in j} (p_a . p_b)^zeta
    K2[i, mu, j, nu] = 1/(N_i N_j) sum_{a in i, b in j} (P_a P_b^T)[mu, nu] (p_a . p_b)^(zeta-1)

    Both blocks must hold normalised features. The atom-pair kernels are
    built for a block of ``left``'s frames at a time against all of ``right``
    and summed per frame with reduceat, so memory stays within
    KERNEL_BLOCK_BYTES however many frames there are. For right=None only the
    upper triangle of frame blocks is computed and mirrored, which also makes
    K exactly symmetric.

    Cost grows with the square of the atoms: ``hpo.models.sagpr.linear_kernels.structure_kernels`` chooses
    between this and the factorised kernels (linear in atoms).
    """
    symmetric = right is None
    a, b = left, (left if symmetric else right)
    n_a, n_b = a.n_frames, b.n_frames
    k0 = np.empty((n_a, n_b))
    k2 = np.empty((n_a, 5, n_b, 5))
    a_off, b_off = a.offsets, b.offsets
    a_p2 = a.x2.reshape(-1, a.x2.shape[-1])  # rows (atom, mu)
    b_p2 = b.x2.reshape(-1, b.x2.shape[-1])
    n_b_atoms = len(b.x0)

    # atoms of `a` per block: the (atoms, 5, b_atoms, 5) pair array fits the budget
    atoms_per_block = KERNEL_BLOCK_BYTES // (25 * 8 * n_b_atoms)
    for start, stop in frame_ranges(a.counts, atoms_per_block):
        rows = slice(a_off[start], a_off[stop - 1] + a.counts[stop - 1])
        first_col = start if symmetric else 0
        cols = slice(b_off[first_col], n_b_atoms)
        col_offsets = b_off[first_col:] - b_off[first_col]
        row_offsets = a_off[start:stop] - a_off[start]

        dot0 = a.x0[rows] @ b.x0[cols].T  # (atoms_a, atoms_b)
        n_rows, n_cols = dot0.shape
        pair2 = (a_p2[rows.start * 5 : rows.stop * 5] @ b_p2[cols.start * 5 : cols.stop * 5].T)
        pair2 = pair2.reshape(n_rows, 5, n_cols, 5)
        if zeta > 1:
            pair2 *= (dot0 ** (zeta - 1))[:, None, :, None]
        pair0 = dot0**zeta

        norm = np.outer(a.counts[start:stop], b.counts[first_col:])
        block0 = np.add.reduceat(np.add.reduceat(pair0, row_offsets, 0), col_offsets, 1) / norm
        block2 = np.add.reduceat(np.add.reduceat(pair2, col_offsets, 2), row_offsets, 0)
        block2 /= norm[:, None, :, None]

        k0[start:stop, first_col:] = block0
        k2[start:stop, :, first_col:, :] = block2
        if symmetric:
            k0[first_col:, start:stop] = block0.T
            k2[first_col:, :, start:stop, :] = block2.transpose(2, 3, 0, 1)
    return k0, k2
