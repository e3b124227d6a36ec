"""Tests of hpo.models.sagpr.scale: factorised kernels and folded-weight prediction equal the atom-pair definitions."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from helpers import SHARED_WATER, require_shared_water
from hpo.data import read_tensors as _read_tensors
from hpo.models.sagpr.estimator import SAGPR
from hpo.models.sagpr.features import (
    FeatureBlock,
    fit_projection,
    lambda_soap,
    normalise,
)
from hpo.models.sagpr.scale import PrimalWeights, kernel_costs, lambda_soap_columns, structure_kernels, symmetric_power

DATA_DIR = SHARED_WATER


def read_tensors(frames):
    return _read_tensors(frames, "Polarizability", "frames", symmetry_tol=0.1)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def water():
    require_shared_water()
    frames = ase.io.read(DATA_DIR / "gap_input_50.xyz", ":12")
    # frames of different sizes: per-frame sums must not straddle frames
    frames[3] = frames[3][:9]
    frames[7] = frames[7][[0, 4, 5, 8, 10]]
    return frames


def features(frames, nc: int | None) -> FeatureBlock:
    raw = lambda_soap(frames, [1, 8], rc=4.0, sigma=0.3, n_max=4, l_max=3)
    x0, x2 = raw.x0, raw.x2
    if nc is not None:
        x0 = fit_projection(x0, nc, 0).apply(x0)
        x2 = fit_projection(x2.reshape(-1, x2.shape[-1]), nc, 0).apply(x2)
    p0, p2 = normalise(x0, x2)
    return FeatureBlock(p0, p2, raw.counts)


def split(block: FeatureBlock, n_frames: int) -> tuple[FeatureBlock, FeatureBlock]:
    cut = int(block.counts[:n_frames].sum())
    return (
        FeatureBlock(block.x0[:cut], block.x2[:cut], block.counts[:n_frames]),
        FeatureBlock(block.x0[cut:], block.x2[cut:], block.counts[n_frames:]),
    )


def test_symmetric_power_reproduces_powers_of_dot_products():
    x = np.random.default_rng(0).normal(size=(6, 7))
    for k in range(5):
        s = symmetric_power(x, k)
        np.testing.assert_allclose(s @ s.T, (x @ x.T) ** k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zeta, nc", [(1, None), (2, None), (2, 30), (3, 12)])
def test_factorised_kernels_equal_pair_loop(water, zeta, nc):
    block = features(water, nc)
    left, right = split(block, 5)
    for a, b in [(block, None), (left, right)]:
        k0_pair, k2_pair = structure_kernels(a, b, zeta, method="pairs")
        k0_fact, k2_fact = structure_kernels(a, b, zeta, method="factorised")
        print(f"zeta={zeta} nc={nc} sym={b is None}: K0 rel {relative_error(k0_fact, k0_pair):.1e}, "
              f"K2 rel {relative_error(k2_fact, k2_pair):.1e}")
        assert relative_error(k0_fact, k0_pair) < 1e-10
        assert relative_error(k2_fact, k2_pair) < 1e-10
        if b is None:
            np.testing.assert_array_equal(k0_fact, k0_fact.T)
            n = len(k0_fact)
            flat = k2_fact.reshape(5 * n, 5 * n)
            np.testing.assert_array_equal(flat, flat.T)


def test_auto_method_picks_factorised_for_large_cells():
    rng = np.random.default_rng(0)

    def block(n_frames, atoms):
        return FeatureBlock(
            rng.normal(size=(n_frames * atoms, 20)),
            rng.normal(size=(n_frames * atoms, 5, 20)),
            np.full(n_frames, atoms),
        )

    small, large = kernel_costs(block(10, 3), None, 2), kernel_costs(block(10, 100), None, 2)
    assert small["factorised_flops"] > small["pair_flops"]
    assert large["factorised_flops"] < large["pair_flops"]
    big = block(4, 100)
    k_auto = structure_kernels(big, None, 2)
    k_pair = structure_kernels(big, None, 2, method="pairs")
    assert relative_error(k_auto[1], k_pair[1]) < 1e-10
    with pytest.raises(ValueError, match="method"):
        structure_kernels(big, None, 2, method="fast")


@pytest.mark.parametrize("zeta, nc", [(1, 30), (2, None), (3, 12)])
def test_primal_weights_equal_kernel_prediction(water, zeta, nc):
    block = features(water, nc)
    train, test = split(block, 5)
    rng = np.random.default_rng(1)
    w0, w2 = rng.normal(size=5), rng.normal(size=25)
    k0, k2 = structure_kernels(test, train, zeta, method="pairs")
    expected0 = k0 @ w0 + 3.0
    expected2 = (k2.reshape(5 * test.n_frames, -1) @ w2).reshape(-1, 5)
    a0, a2 = PrimalWeights.fit(train, zeta, w0, w2, 3.0).predict(test)
    assert relative_error(a0, expected0) < 1e-10
    assert relative_error(a2, expected2) < 1e-10


def test_streamed_predict_equals_kernel_route_and_reports_progress(water, tmp_path):
    frames = ase.io.read(DATA_DIR / "gap_input_50.xyz", ":")
    tensors = read_tensors(frames)
    params = dict(n_max=4, l_max=3, nc=40, reg0=1e-6, reg2=1e-4)
    cached = SAGPR(**params, cache_dir=tmp_path).fit(frames[:30], tensors[:30])
    streamed = SAGPR(**params).fit(frames[:30], tensors[:30])
    calls = []
    test_frames = frames[30:] * 6  # 120 frames: two streaming chunks
    pred = streamed.predict(test_frames, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(100, 120), (120, 120)]
    reference = cached.predict(test_frames)  # kernels against the training set
    assert cached.cache_stats_["test_kernels_miss"] == 1
    assert relative_error(pred, reference) < 1e-10


def test_selected_columns_equal_full_features(water):
    import ase

    frames = [*water, ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[8, 8, 8], pbc=True)]
    full = lambda_soap(frames, [1, 8], rc=4.0, sigma=0.3, n_max=4, l_max=3)
    rng = np.random.default_rng(0)
    c0 = rng.choice(full.x0.shape[1], 25, replace=False)
    c2 = rng.choice(full.x2.shape[2], 40, replace=False)
    sel = lambda_soap_columns(frames, [1, 8], 4.0, 0.3, 4, 3, c0, c2, chunk_frames=5)
    np.testing.assert_array_equal(sel.counts, full.counts)
    assert relative_error(sel.x0, full.x0[:, c0]) < 1e-12
    assert relative_error(sel.x2, full.x2[..., c2]) < 1e-12
