"""SA-GPR kernels and predictions whose cost is linear in the number of atoms.

For an integer zeta the SA-GPR atom-pair kernels are polynomials of the
features, so they factorise into per-structure sums (the definitions of
:func:`hpo.models.sagpr.features.pair_kernels`, same normalisation):

    K0[i, j]         = <phi_i, phi_j>,          phi_i     = 1/N_i sum_{a in i} p_a^(x zeta)
    K2[i, mu, j, nu] = <psi_i[mu], psi_j[nu]>,  psi_i[mu] = 1/N_i sum_{a in i} P_a[mu] (x) p_a^(x (zeta-1))

since (p_a . p_b)^zeta = <p_a^(x zeta), p_b^(x zeta)> and
(P_a P_b^T)[mu, nu] (p_a . p_b)^(zeta-1) = <P_a[mu] (x) p_a^(x(zeta-1)), P_b[nu] (x) p_b^(x(zeta-1))>.
The tensor powers are stored in their symmetric form: one column per multiset
of feature indices, times sqrt(multinomial coefficient), which keeps every dot
product exact with about 1/k! of the columns (:func:`symmetric_power`).

Two uses:

* :func:`factorised_kernels`: the structure kernels as one BLAS product of
  per-structure sums. Cost (N_atoms) x D to build the sums plus
  n_frames^2 x D for the product, against N_atoms^2 x F for the atom-pair
  loop: it wins for large cells and loses for the 12-atom workshop cells at
  large D (see :func:`kernel_costs`, used by ``structure_kernels(method="auto")``).
* :class:`PrimalWeights`: the fitted weights folded into the feature space,
  m0 = sum_j w0_j phi_j and m2 = sum_{j, nu} w2_{j nu} psi_j[nu], so a
  prediction is a0_i = <phi_i, m0> + mean and a2_i[mu] = <psi_i[mu], m2>: per
  atom work, independent of the training-set size. This is what
  ``SAGPR.predict`` streams long trajectories through.
With ``lambda_soap(..., columns=...)`` computing only the columns a sparsified model keeps,
the folded weights make featurisation, not kernels, the whole cost of predicting a trajectory.

Features of many frames are always reduced in chunks of frames or atoms, so
no (atoms x D) array larger than :data:`CHUNK_BYTES` is ever held.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np

from hpo.models.sagpr.features import FeatureBlock, frame_ranges, pair_kernels

__all__ = [
    "PrimalWeights",
    "factorised_kernels",
    "kernel_costs",
    "kernel_route",
    "route_costs",
    "structure_sums",
    "symmetric_power",
    "symmetric_power_dim",
]

# Bytes a temporary (atoms x D) array may take while building sums or predicting.
CHUNK_BYTES = 2**26
# Bytes the kernel sums held at once may take when the caller gives no budget (a model passes its
# kernel_memory_gb).
KERNEL_BYTES = 2**30
# Bytes the folded weights m0 and m2 may take; above this prediction goes
# through kernels against the training set instead.
PRIMAL_MAX_BYTES = 2**28


# --------------------------------------------------------------------------- #
# symmetric tensor powers
# --------------------------------------------------------------------------- #
def symmetric_power_dim(n_features: int, k: int) -> int:
    """Columns of the symmetric k-th power of an n_features vector: C(n + k - 1, k)."""
    return math.comb(n_features + k - 1, k)


@functools.lru_cache(maxsize=8)
def _symmetric_index(n_features: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Index tuples i_1 <= ... <= i_k (shape (D, k)) and their weights sqrt(k! / prod(mult!))."""
    if k == 2:
        index = np.stack(np.triu_indices(n_features), axis=1).astype(np.int64)
    else:
        index = np.array(list(combinations_with_replacement(range(n_features), k)), dtype=np.int64)
        index = index.reshape(-1, k)
    # k! / prod(mult!): along a sorted tuple, divide by the running length of each run of equal indices
    weight = np.full(len(index), float(math.factorial(k)))
    run = np.ones(len(index))
    for j in range(1, k):
        same = index[:, j] == index[:, j - 1]
        run = np.where(same, run + 1, 1.0)
        weight /= run
    return index, np.sqrt(weight)


def symmetric_power(x: np.ndarray, k: int) -> np.ndarray:
    """Row-wise symmetric tensor power: <S(x), S(y)> = (x . y)^k for rows x, y.

    ``x`` is (n, F); the result is (n, C(F + k - 1, k)); k = 0 gives a column of
    ones and k = 1 returns ``x`` itself.
    """
    n, f = x.shape
    if k == 0:
        return np.ones((n, 1))
    if k == 1:
        return x
    index, weight = _symmetric_index(f, k)
    out = x[:, index[:, 0]] * weight
    for j in range(1, k):
        out *= x[:, index[:, j]]
    return out


# --------------------------------------------------------------------------- #
# per-structure sums and kernels
# --------------------------------------------------------------------------- #
def _atom_batches(block: FeatureBlock, width: int, start: int = 0, stop: int | None = None):
    """Frame ranges [f0, f1) of at most CHUNK_BYTES // (8 width) atoms (at least one frame)."""
    stop = block.n_frames if stop is None else stop
    return frame_ranges(block.counts[:stop], CHUNK_BYTES // (8 * max(width, 1)), start)


def _symmetric_flat(n_features: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the sorted index tuples in a flattened F^k tensor, and their weights."""
    if k == 0:
        return np.zeros(1, dtype=np.int64), np.ones(1)
    index, weight = _symmetric_index(n_features, k)
    flat = np.zeros(len(index), dtype=np.int64)
    for j in range(k):
        flat = flat * n_features + index[:, j]
    return flat, weight


def structure_sums(
    block: FeatureBlock, zeta: int, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """phi (n, D0) and psi (n, 5, F2 * D2') of frames [start, stop) of ``block``.

    Both include the 1/N_i of the kernel definition. Per frame, the full tensors
    sum_a p_a^(x(zeta-1)) (x) p_a and sum_a P_a (x) p_a^(x(zeta-1)) are two matrix
    products (batched over frames of equal size); their symmetric entries are then
    picked once per frame, not per atom. Computed a chunk of frames at a time
    (CHUNK_BYTES), never for all atoms at once.
    """
    stop = block.n_frames if stop is None else stop
    f0, f2 = block.x0.shape[1], block.x2.shape[-1]
    flat0, weight0 = _symmetric_flat(f0, zeta)
    flat2, weight2 = _symmetric_flat(f0, zeta - 1)
    phi = np.empty((stop - start, len(flat0)))
    psi = np.empty((stop - start, 5, f2 * len(flat2)))
    offsets, counts = block.offsets, block.counts
    width = 5 * f2 + f0 ** (zeta - 1)
    for b0, b1 in _atom_batches(block, width, start, stop):
        sizes = counts[b0:b1]
        rows = slice(offsets[b0], offsets[b1 - 1] + sizes[-1])
        p0 = block.x0[rows]
        h = tensor_power(p0, zeta - 1)  # (atoms, F0^(zeta-1))
        p2 = block.x2[rows].reshape(len(p0), 5 * f2)
        if (sizes == sizes[0]).all():  # one batched matmul for all frames
            n = int(sizes[0])
            h3 = h.reshape(b1 - b0, n, -1)
            g0 = h3.transpose(0, 2, 1) @ p0.reshape(b1 - b0, n, f0)
            g2 = p2.reshape(b1 - b0, n, -1).transpose(0, 2, 1) @ h3
        else:
            cuts = np.cumsum(sizes)[:-1]
            g0 = np.stack([a.T @ b for a, b in zip(np.split(h, cuts), np.split(p0, cuts))])
            g2 = np.stack([a.T @ b for a, b in zip(np.split(p2, cuts), np.split(h, cuts))])
        scale = 1.0 / sizes[:, None]
        phi[b0 - start : b1 - start] = g0.reshape(b1 - b0, -1)[:, flat0] * weight0 * scale
        g2 = g2.reshape(b1 - b0, 5, f2, -1)[..., flat2] * weight2
        psi[b0 - start : b1 - start] = g2.reshape(b1 - b0, 5, -1) * scale[:, :, None]
    return phi, psi


def _width(f0: int, f2: int, zeta: int) -> int:
    """Numbers in one frame's sums: phi (D0) and psi (5 F2 D2')."""
    return symmetric_power_dim(f0, zeta) + 5 * f2 * symmetric_power_dim(f0, zeta - 1)


def block_frames(width: int, max_bytes: float) -> int:
    """Frames per block of :func:`factorised_kernels`: two blocks of sums (left and right) take at most
    ``max_bytes``; 0 when not even one frame of each fits."""
    return int(max_bytes // (2 * 8 * width))


def route_costs(
    atoms_l: int, n_l: int, atoms_r: int, n_r: int, f0: int, f2: int, zeta: int, symmetric: bool, max_bytes: float
) -> dict[str, float]:
    """Flop estimates of the pair loop and of the blocked factorised kernels, and the latter's memory.

    pair:       A_l A_r (F0 + 25 F2)                              (halved when symmetric)
    factorised: building the sums, (A_l + A_r)(F0^zeta + 5 F2 F0^(zeta-1)), times the rebuilds the blocks
                need (a block of the left side is built again for every block of the right one; symmetric:
                only for the blocks above it), plus n_l n_r (D0 + 25 F2 D2') to multiply them (halved when
                symmetric); infinite when one frame's sums on each side exceed ``max_bytes``
    bytes:      the sums held at once (two blocks)
    """
    d0, d2 = symmetric_power_dim(f0, zeta), symmetric_power_dim(f0, zeta - 1)
    width = _width(f0, f2, zeta)
    half = 0.5 if symmetric else 1.0
    pair = half * atoms_l * atoms_r * (f0 + 25 * f2)
    per_atom = f0**zeta + 5 * f2 * f0 ** (zeta - 1)
    step = block_frames(width, max_bytes)
    if step == 0:
        return {"pair_flops": pair, "factorised_flops": math.inf, "factorised_bytes": 16.0 * width}
    blocks_r = math.ceil(n_r / step)
    if symmetric:
        build = atoms_l * (blocks_r + 1) / 2
    else:
        build = atoms_r + atoms_l * blocks_r
    product = half * n_l * n_r * (d0 + 25 * f2 * d2)
    held = (min(n_r, step) + (0 if symmetric and n_r <= step else min(n_l, step))) * width
    return {"pair_flops": pair, "factorised_flops": build * per_atom + product, "factorised_bytes": 8.0 * held}


def kernel_costs(left: FeatureBlock, right: FeatureBlock | None, zeta: int, max_bytes: float = KERNEL_BYTES) -> dict[str, float]:
    """:func:`route_costs` of ``structure_kernels(left, right, zeta)``."""
    symmetric = right is None
    right = left if symmetric else right
    f0, f2 = left.x0.shape[1], left.x2.shape[-1]
    return route_costs(len(left.x0), left.n_frames, len(right.x0), right.n_frames, f0, f2, zeta, symmetric, max_bytes)


def kernel_route(left: FeatureBlock, right: FeatureBlock | None, zeta: int, max_bytes: float) -> str:
    """What ``structure_kernels(method="auto")`` runs: "factorised" when its flop estimate is lower, else "pairs"."""
    costs = kernel_costs(left, right, zeta, max_bytes)
    return "factorised" if costs["factorised_flops"] < costs["pair_flops"] else "pairs"


def factorised_kernels(
    left: FeatureBlock, right: FeatureBlock | None, zeta: int, max_bytes: float = KERNEL_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """K0 (n_l, n_r) and K2 (n_l, 5, n_r, 5) as products of per-structure sums.

    Same definition as the atom-pair loop of ``structure_kernels`` (equal to round-off). Blocks of
    structures against blocks of structures, each block's sums sized by :func:`block_frames` so the
    two held at once take at most ``max_bytes``: a training set of any size can take this route, at
    the price of building a block's sums again for every block it meets (counted by
    :func:`route_costs`). For right=None only blocks on and above the diagonal are computed and
    mirrored, so the result is exactly symmetric.
    """
    symmetric = right is None
    other = left if symmetric else right
    f0, f2 = left.x0.shape[1], left.x2.shape[-1]
    step = max(1, block_frames(_width(f0, f2, zeta), max_bytes))
    n_l, n_r = left.n_frames, other.n_frames
    k0 = np.zeros((n_l, n_r))
    k2 = np.zeros((n_l, 5, n_r, 5))
    for r0 in range(0, n_r, step):
        r1 = min(n_r, r0 + step)
        phi_r, psi_r = structure_sums(other, zeta, r0, r1)
        flat_r = psi_r.reshape(5 * (r1 - r0), -1)
        del psi_r
        for l0 in range(0, r0 + 1 if symmetric else n_l, step):
            l1 = min(n_l, l0 + step)
            if symmetric and l0 == r0:
                phi, flat = phi_r, flat_r
            else:
                phi, psi = structure_sums(left, zeta, l0, l1)
                flat = psi.reshape(5 * (l1 - l0), -1)
                del psi
            k0[l0:l1, r0:r1] = phi @ phi_r.T
            k2[l0:l1, :, r0:r1, :] = (flat @ flat_r.T).reshape(l1 - l0, 5, r1 - r0, 5)
            del phi, flat
    if symmetric:
        # the blocks on and above the diagonal, mirrored: exact symmetry whatever BLAS did
        n = n_l
        flat = k2.reshape(5 * n, 5 * n)
        k0 = np.triu(k0) + np.triu(k0, 1).T
        flat = np.triu(flat) + np.triu(flat, 1).T
        k2 = flat.reshape(n, 5, n, 5)
    return k0, k2


# --------------------------------------------------------------------------- #
# prediction in the primal (feature) space
# --------------------------------------------------------------------------- #
def tensor_power(x: np.ndarray, k: int) -> np.ndarray:
    """Row-wise full tensor power x^(x k), flattened: (n, F^k); k = 0 gives ones."""
    out = np.ones((len(x), 1))
    for _ in range(k):
        out = (out[:, :, None] * x[:, None, :]).reshape(len(x), -1)
    return out


def _contract(y: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Contract the last k axes (each of size F) of rows y (n, G F^k) with rows x (n, F): (n, G)."""
    f = x.shape[1]
    for _ in range(k):
        y = np.einsum("agf,af->ag", y.reshape(len(y), -1, f), x)
    return y


@dataclass
class PrimalWeights:
    """Fitted SA-GPR weights folded into feature space.

    With c_b = w_frame(b) / N_frame(b) per training atom b:
    ``m0`` (F0^zeta,) = sum_b c0_b p_b^(x zeta), ``m2`` (F2, F0^(zeta-1)) = sum_b q_b (x) p_b^(x(zeta-1))
    with q_b = sum_nu c2_{b nu} P_b[nu]. Then a0_i = 1/N_i sum_a <p_a^(x zeta), m0> + mean0 and
    a2_i[mu] = 1/N_i sum_a P_a[mu] . (m2 contracted zeta-1 times with p_a): the same numbers as
    K_test @ w (to round-off) at a cost per test atom independent of the training set
    (zeta = 2: p^T M0 p and P (M2 p), two small matrix products).
    """

    zeta: int
    m0: np.ndarray
    m2: np.ndarray
    mean0: float

    @staticmethod
    def nbytes(train: FeatureBlock, zeta: int) -> int:
        f0, f2 = train.x0.shape[1], train.x2.shape[-1]
        return 8 * (f0**zeta + f2 * f0 ** (zeta - 1))

    @classmethod
    def fit(
        cls, train: FeatureBlock, zeta: int, w0: np.ndarray, w2: np.ndarray, mean0: float
    ) -> "PrimalWeights":
        """Fold ``w0`` (n,) and ``w2`` (5 n,) of a model trained on ``train``."""
        f0, f2 = train.x0.shape[1], train.x2.shape[-1]
        m0 = np.zeros((f0 ** (zeta - 1), f0))
        m2 = np.zeros((f2, f0 ** (zeta - 1)))
        w2 = np.asarray(w2).reshape(-1, 5)
        offsets, counts = train.offsets, train.counts
        for f_start, f_stop in _atom_batches(train, max(f0 ** (zeta - 1), f0)):
            rows = slice(offsets[f_start], offsets[f_stop - 1] + counts[f_stop - 1])
            repeat = counts[f_start:f_stop]
            c0 = np.repeat(w0[f_start:f_stop] / repeat, repeat)  # per atom: w0_frame / N_frame
            c2 = np.repeat(w2[f_start:f_stop] / repeat[:, None], repeat, axis=0)  # (atoms, 5)
            p0 = train.x0[rows]
            h = tensor_power(p0, zeta - 1)  # (atoms, F0^(zeta-1))
            m0 += (h * c0[:, None]).T @ p0
            q = np.einsum("amf,am->af", train.x2[rows], c2)  # sum_nu c2_nu P_a[nu]
            m2 += q.T @ h
        return cls(zeta=zeta, m0=m0.ravel(), m2=m2, mean0=float(mean0))

    def predict(self, block: FeatureBlock) -> tuple[np.ndarray, np.ndarray]:
        """a0 (n,) and a2 (n, 5) of the frames of ``block`` (normalised features)."""
        per_atom0 = np.empty(len(block.x0))
        per_atom2 = np.empty((len(block.x0), 5))
        f0 = block.x0.shape[1]
        k = self.zeta - 1
        m0 = self.m0.reshape(-1, f0)  # (F0^(zeta-1), F0)
        m2 = self.m2.reshape(-1, f0) if k else self.m2  # (F2 F0^(zeta-2), F0) or (F2, 1)
        width = max(m0.shape[0], m2.shape[0])
        offsets, counts = block.offsets, block.counts
        for f_start, f_stop in _atom_batches(block, width):
            rows = slice(offsets[f_start], offsets[f_stop - 1] + counts[f_stop - 1])
            p0 = block.x0[rows]
            per_atom0[rows] = _contract(p0 @ m0.T, p0, k)[:, 0]
            y = _contract(p0 @ m2.T, p0, k - 1) if k else np.broadcast_to(m2[:, 0], (len(p0), m2.shape[0]))
            per_atom2[rows] = np.einsum("amf,af->am", block.x2[rows], y)
        a0 = np.add.reduceat(per_atom0, offsets) / counts + self.mean0
        a2 = np.add.reduceat(per_atom2, offsets, axis=0) / counts[:, None]
        return a0, a2


def structure_kernels(
    left: FeatureBlock, right: FeatureBlock | None, zeta: int, method: str = "auto", max_bytes: float = KERNEL_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Structure kernels K0 (n_left, n_right) and K2 (n_left, 5, n_right, 5) between the frames of ``left``
    and ``right`` (None: left vs left), as defined by :func:`hpo.models.sagpr.features.pair_kernels`.

    ``method``: "pairs" (the atom-pair loop, cost ~ atoms^2), "factorised" (:func:`factorised_kernels`:
    per-structure sums in blocks of frames whose sums take at most ``max_bytes``, cost linear in atoms)
    or "auto" (:func:`kernel_route`: the lower flop estimate; the same kernels to round-off).
    """
    if method not in ("auto", "pairs", "factorised"):
        raise ValueError(f"method must be 'auto', 'pairs' or 'factorised', got {method!r}")
    if method == "auto":
        method = kernel_route(left, right, zeta, max_bytes)
    if method == "factorised":
        return factorised_kernels(left, right, zeta, max_bytes)
    return pair_kernels(left, right, zeta)


def choose_route(
    train: FeatureBlock, zeta: int, n_env, env_auto_count: int, max_bytes: float, regularised: bool
) -> tuple[int | None, str, dict[str, float]]:
    """(environments of the fit or None for the exact model, kernel route, the estimates compared).

    ``n_env``: None (exact), an integer (sparsified on that many environments) or "auto": sparsified on
    ``env_auto_count`` environments when the training set has more environments than that, both
    regularisations are positive (the projected process needs them) and its estimate (kernels against
    the environments, among themselves, and the M x M solve) is lower than the exact model's (the
    cheaper kernel route and the dense solve of 5 n_frames L=2 rows); otherwise exact. The route is
    "pairs" or "factorised" (the exact model's kernels by :func:`kernel_route`) or "sparsified".
    """
    exact = kernel_costs(train, None, zeta, max_bytes)
    exact_route = "factorised" if exact["factorised_flops"] < exact["pair_flops"] else "pairs"
    n, atoms = train.n_frames, len(train.x0)
    costs = {"exact_flops": min(exact["pair_flops"], exact["factorised_flops"]) + (5 * n) ** 3 / 3}
    if n_env is None:
        return None, exact_route, costs
    if n_env != "auto":
        return int(n_env), "sparsified", costs
    m = int(env_auto_count)
    if atoms <= m or not regularised:
        return None, exact_route, costs
    f0, f2 = train.x0.shape[1], train.x2.shape[-1]
    nm = route_costs(atoms, n, m, m, f0, f2, zeta, False, max_bytes)
    mm = route_costs(m, m, m, m, f0, f2, zeta, True, max_bytes)
    rows, columns = 5 * n, 5 * m
    # solve_projected_process: Cholesky of K_MM, L^-1 K_MN, and the smaller of the two normal systems
    solve = columns**3 / 3 + rows * columns**2 + min(rows, columns) ** 3 / 3
    costs["sparsified_flops"] = min(nm["pair_flops"], nm["factorised_flops"]) + min(mm["pair_flops"], mm["factorised_flops"]) + solve
    if costs["sparsified_flops"] < costs["exact_flops"]:
        return m, "sparsified", costs
    return None, exact_route, costs
