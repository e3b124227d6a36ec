"""Tests of hpo.models.sparse_gp: farthest-point selection (against skmatter), the projected-process solve."""

from __future__ import annotations

import numpy as np

from hpo.models.sparse_gp import select_sparse


def test_fps_matches_skmatter():
    from skmatter.sample_selection import FPS

    x = np.random.default_rng(5).normal(size=(80, 12)) ** 3
    for seed in range(3):
        expected = FPS(n_to_select=20, initialize="random", random_state=seed).fit(x).selected_idx_
        np.testing.assert_array_equal(select_sparse(x, 20, "fps", seed), expected)


def test_projected_process_routes_agree():
    """QR (more targets than sparse points) and the dual route (fewer) solve the same normal equations."""
    from hpo.models.sparse_gp import solve_projected_process

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    k_mm = x @ x.T + 1e-6 * np.eye(40)  # rank-deficient kernel plus jitter, as in a real fit
    for n in (25, 60):  # N < M: dual route; N >= M: QR
        k_nm = rng.normal(size=(n, 6)) @ x.T
        y = rng.normal(size=n)
        sigma = rng.uniform(0.1, 0.5, size=n)
        w = solve_projected_process(k_mm, k_nm, y, sigma)
        lhs = k_nm.T @ (k_nm / sigma[:, None] ** 2) + k_mm
        np.testing.assert_allclose(lhs @ w, k_nm.T @ (y / sigma**2), rtol=1e-6, atol=1e-8 * np.abs(lhs).max())
