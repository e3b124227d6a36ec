"""Sparse Gaussian-process pieces shared by the kernel model kinds (GAP, SA-GPR).

Both kinds approximate a GP on many atomic environments by one on M representative ones
(the projected process / subset of regressors, Quinonero-Candela & Rasmussen 2005):

* :func:`select_sparse` chooses the M environments (farthest-point sampling, CUR or random);
* :func:`solve_projected_process` solves for their weights by QR, the route gap_fit takes.

With M equal to every environment the projected process gives the full GP's mean exactly, so
the sparsification is an approximation of the model, not a different model.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["SPARSE_METHODS", "select_sparse", "solve_projected_process"]

SPARSE_METHODS = ("fps", "cur", "random")


def select_sparse(x: np.ndarray, n_sparse: int, method: str = "fps", seed: int = 0) -> np.ndarray:
    """0-based indices of ``n_sparse`` rows of ``x``, in selection order (a smaller n_sparse gives a prefix for fps/cur).

    fps: farthest-point sampling (Euclidean); the same points as
    ``skmatter.sample_selection.FPS(initialize="random", random_state=seed)`` (a test checks this)
    without re-reading the matrix at every step; a chosen point is never chosen again, even when all
    the remaining ones coincide with it. cur: skmatter's CUR (deterministic). random: a seeded draw.
    """
    x = np.asarray(x, dtype=float)
    n = len(x)
    n_sparse = int(min(n_sparse, n))
    if n_sparse <= 0:
        return np.zeros(0, dtype=int)
    if method == "random":
        return np.random.default_rng(seed).choice(n, n_sparse, replace=False)
    if method == "cur":
        import warnings

        from skmatter.sample_selection import CUR

        with warnings.catch_warnings():  # SOAP has all-zero columns (absent species pairs): harmless here
            warnings.filterwarnings("ignore", message="Column vector contains only zeros")
            return np.asarray(CUR(n_to_select=n_sparse).fit(x).selected_idx_, dtype=int)
    if method != "fps":
        raise ValueError(f"unknown sparse method {method!r}; expected one of {SPARSE_METHODS}")
    from sklearn.utils import check_random_state

    chosen = np.empty(n_sparse, dtype=int)
    chosen[0] = check_random_state(seed).randint(n)  # skmatter's draw of the first point
    squared_norms = np.einsum("ij,ij->i", x, x)
    distance = np.full(n, np.inf)
    for k in range(1, n_sparse):
        last = chosen[k - 1]
        d2 = squared_norms + squared_norms[last] - 2.0 * (x @ x[last])
        distance = np.minimum(distance, np.maximum(d2, 0.0))
        distance[chosen[:k]] = -1.0
        chosen[k] = int(np.argmax(distance))
    return chosen


def solve_projected_process(k_mm: np.ndarray, k_nm: np.ndarray, y: np.ndarray, sigma: np.ndarray | float, posterior: bool = False):
    """Weights w minimising |Lambda^-1/2 (y - K_NM w)|^2 + w^T K_MM w (Lambda = diag(sigma^2)).

    Two routes to the same w, whichever is cheaper:

    * N >= M targets (GAP: energies and forces of many frames, a few thousand sparse points): the
      least-squares problem [Lambda^-1/2 K_NM; U] w = [Lambda^-1/2 y; 0] with K_MM = U^T U, by QR,
      gap_fit's own route; better conditioned than the normal equations, which square K_NM's
      condition number.
    * N < M (SA-GPR: one target per frame, more environments than frames): w = K_MM^-1 K_MN a with
      (K_NM K_MM^-1 K_MN + Lambda) a = y, which satisfies the same normal equations; an M x M
      Cholesky factor and an N x N solve, conditioned like the exact model's (K + Lambda), instead
      of the QR of an (N + M) x M matrix (SA-GPR with 2400 environments, M = 12000 L=2 columns: a 20-s
      fit where the QR had not finished after 5 minutes).

    ``k_mm`` must be positive definite (add a jitter to its diagonal first); scipy raises
    LinAlgError otherwise.

    ``posterior``: also the factors of the posterior covariance the solve has at hand, for the predictive
    variance k_gg - k_g K_MM^-1 k_g^T + k_g Sigma k_g^T (Sigma = (K_MM + K_MN Lambda^-1 K_NM)^-1) of a
    functional with covariance row k_g: ``{"lower": L}`` (K_MM = L L^T) and either ``"r"`` (QR route:
    R^T R = Sigma^-1, the variance is k_gg - |L^-1 k_g|^2 + |R^-T k_g|^2) or ``"b"`` (Cholesky route:
    B = chol(K_NM K_MM^-1 K_MN + Lambda)^-1 (L^-1 K_MN)^T, the variance is k_gg - |B L^-1 k_g|^2, Woodbury's
    identity). Returns (w, factors) then.
    """
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (len(k_nm),))
    if len(k_nm) < len(k_mm):
        lower = scipy.linalg.cholesky(k_mm, lower=True)  # K_MM = L L^T
        v = scipy.linalg.solve_triangular(lower, k_nm.T, lower=True)  # L^-1 K_MN
        q = v.T @ v
        q[np.diag_indices_from(q)] += sigma**2
        try:
            a = scipy.linalg.cho_solve(scipy.linalg.cho_factor(q, lower=True), y)
        except np.linalg.LinAlgError:  # tiny noise on a near-singular kernel: LU, as the exact model does
            a = scipy.linalg.solve(q, y, assume_a="sym")
        w = scipy.linalg.solve_triangular(lower, v @ a, lower=True, trans="T")
        if not posterior:
            return w
        w_q, v_q = np.linalg.eigh(q)  # q may be near-singular where the Cholesky failed: its eigenpairs
        keep = w_q > w_q.max() * len(q) * np.finfo(float).eps
        return w, {"lower": lower, "b": (v_q[:, keep] / np.sqrt(w_q[keep])).T @ v.T}
    u = scipy.linalg.cholesky(k_mm, lower=False)  # K_MM = U^T U
    a = np.vstack([k_nm / sigma[:, None], u])
    b = np.concatenate([y / sigma, np.zeros(len(u))])
    q, r = np.linalg.qr(a)
    w = scipy.linalg.solve_triangular(r, q.T @ b)
    return (w, {"lower": u.T, "r": r}) if posterior else w
