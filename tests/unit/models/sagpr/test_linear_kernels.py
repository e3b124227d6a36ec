"""Tests of hpo.models.sagpr.linear_kernels: factorised kernels and folded-weight prediction equal the atom-pair definitions."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from hpo.data import read_tensors as _read_tensors
from hpo.models.sagpr.estimator import SAGPR, component_rmse
from hpo.models.sagpr import lambda_soap as lambda_soap_module
from hpo.models.sagpr.features import FeatureBlock, column_gram, fit_projection, normalise
from hpo.models.sagpr.lambda_soap import lambda_soap
from hpo.models.sagpr.linear_kernels import PrimalWeights, kernel_costs, structure_kernels, structure_sums, symmetric_power

from helpers import SHARED_WATER, require_shared_water

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
        x0 = fit_projection(column_gram(x0), nc, 0).apply(x0)
        x2 = fit_projection(column_gram(x2), nc, 0).apply(x2)
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
        # two routes to the same numbers (products of sums vs a sum of products): a few hundred ulps
        np.testing.assert_allclose(s @ s.T, (x @ x.T) ** k, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("zeta, nc", [(1, None), (2, None), (2, 30), (3, 12)])
def test_factorised_kernels_equal_pair_loop(water, zeta, nc):
    block = features(water, nc)
    left, right = split(block, 5)
    # a budget of about 2 frames' sums: blocks of one structure against one, several rebuilt
    one_frame = sum(x.nbytes for x in structure_sums(block, zeta, 0, 1))
    for (a, b), max_bytes in [((block, None), 2**30), ((left, right), 2**30), ((block, None), 2.5 * one_frame), ((left, right), 5 * one_frame)]:
        k0_pair, k2_pair = structure_kernels(a, b, zeta, method="pairs")
        k0_fact, k2_fact = structure_kernels(a, b, zeta, method="factorised", max_bytes=max_bytes)
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


def bulk_cells(n_frames: int) -> list:
    """96-atom cells: workshop frames repeated 2x2x2, displaced so no two environments coincide."""
    require_shared_water()
    rng = np.random.default_rng(3)
    cells = [atoms.repeat((2, 2, 2)) for atoms in ase.io.read(DATA_DIR / "gap_input_50.xyz", f":{n_frames}")]
    for atoms in cells:
        atoms.positions += 0.05 * rng.normal(size=atoms.positions.shape)
    return cells


def test_auto_route_avoids_atom_pairs_where_they_are_slowest():
    """Large cells, few structures: the pair loop is the slowest route. With the sums of all frames far
    over the kernel budget (the old fixed limit sent such fits to the pair loop) the fit takes the
    blocked factorised route, with the pair loop's kernels; at zeta = 4, where the sums are too wide,
    it sparsifies on env_auto_count environments."""
    cells = bulk_cells(6)
    tensors = np.array(read_tensors(ase.io.read(DATA_DIR / "gap_input_50.xyz", ":6")))
    params = dict(SMALL, n_max=2, l_max=2)
    probe = SAGPR(**params, zeta=2).fit(cells[:1], tensors[:1])
    sums_bytes = sum(x.nbytes for x in structure_sums(probe.basis_, 2))
    budget = 3 * sums_bytes  # three of the six frames' sums: blocks of one frame
    model = SAGPR(**params, zeta=2, kernel_memory_gb=budget / 1e9).fit(cells, tensors)
    assert model.kernel_route_ == "factorised" and model.n_env_ is None
    costs = kernel_costs(model.basis_, None, 2, budget)
    assert costs["factorised_flops"] < costs["pair_flops"] and costs["factorised_bytes"] <= budget < 6 * sums_bytes
    k0, k2 = structure_kernels(model.basis_, None, 2, max_bytes=budget)
    k0_pair, k2_pair = structure_kernels(model.basis_, None, 2, method="pairs")
    assert relative_error(k0, k0_pair) < 1e-10 and relative_error(k2, k2_pair) < 1e-10

    sparse = SAGPR(**params, zeta=4, env_auto_count=50).fit(cells, tensors)
    assert sparse.kernel_route_ == "sparsified" and sparse.n_env_ == 50 and sparse.basis_.n_frames == 50
    assert sparse.route_costs_["sparsified_flops"] < sparse.route_costs_["exact_flops"]
    # the workshop's 12-atom cells stay exact (fewer environments than env_auto_count would be pointless)
    small = SAGPR(**params, zeta=2).fit(ase.io.read(DATA_DIR / "gap_input_50.xyz", ":6"), tensors)
    assert small.n_env_ is None and small.kernel_route_ in ("pairs", "factorised")


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


def test_selected_columns_equal_full_features(water, monkeypatch):
    import ase

    frames = [*water, ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[8, 8, 8], pbc=True)]
    full = lambda_soap(frames, [1, 8], rc=4.0, sigma=0.3, n_max=4, l_max=3)
    rng = np.random.default_rng(0)
    c0 = rng.choice(full.x0.shape[1], 25, replace=False)
    c2 = rng.choice(full.x2.shape[2], 40, replace=False)
    monkeypatch.setattr(lambda_soap_module, "FEATURE_CHUNK_ATOMS", 30)  # several chunks, frames never split
    sel = lambda_soap(frames, [1, 8], 4.0, 0.3, 4, 3, columns=(c0, c2))
    np.testing.assert_array_equal(sel.counts, full.counts)
    assert relative_error(sel.x0, full.x0[:, c0]) < 1e-12
    assert relative_error(sel.x2, full.x2[..., c2]) < 1e-12


def test_features_equal_featomics_equivariant_power_spectrum(water):
    """hpo couples featomic's expansion itself; featomic's own coupling is the reference."""
    from hpo.models.sagpr.lambda_soap import featomic_lambda_soap

    ours = lambda_soap(water[:6], [1, 8], rc=4.0, sigma=0.3, n_max=4, l_max=3)
    reference = featomic_lambda_soap(water[:6], [1, 8], rc=4.0, sigma=0.3, n_max=4, l_max=3)
    np.testing.assert_array_equal(ours.counts, reference.counts)
    assert relative_error(ours.x0, reference.x0) < 1e-12
    assert relative_error(ours.x2, reference.x2) < 1e-12


def test_projection_from_gram_equals_projection_from_svd(water):
    """The A matrix built from X^T X (chunkable) gives the kernels of the SVD route on X itself."""
    raw = lambda_soap(water, [1, 8], rc=4.0, sigma=0.3, n_max=4, l_max=3)
    for x in (raw.x0, raw.x2.reshape(-1, raw.x2.shape[-1])):
        projection = fit_projection(column_gram(x), 20, 0)
        c = x[:, projection.columns]
        u, s, vt = np.linalg.svd(c, full_matrices=False)
        pinv_c_x = vt.T @ ((u.T @ x) / s[:, None])
        eigval, eigvec = np.linalg.eigh(pinv_c_x @ pinv_c_x.T)
        reference = c @ ((eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T)
        ours = projection.apply(x)
        assert relative_error(ours @ ours.T, reference @ reference.T) < 1e-9


# --------------------------------------------------------------------------- #
# environment sparsification and the streamed fit
# --------------------------------------------------------------------------- #
SMALL = dict(n_max=4, l_max=3, nc=None, reg0=1e-4, reg2=1e-4)


@pytest.fixture(scope="module")
def small_split():
    require_shared_water()
    train = ase.io.read(DATA_DIR / "gap_input_50.xyz", ":30")
    validate = ase.io.read(DATA_DIR / "gap_validate.xyz", ":20")
    return (train, read_tensors(train)), (validate, read_tensors(validate))


@pytest.mark.slow
@pytest.mark.parametrize("zeta", [2, 3])
def test_every_environment_as_basis_gives_the_exact_model(small_split, zeta):
    """The projected process on all training environments is the exact GP: same predictions."""
    (train, tensors), (validate, _) = small_split
    exact = SAGPR(**SMALL, zeta=zeta).fit(train, tensors)
    n_atoms = sum(len(a) for a in train)
    sparse = SAGPR(**SMALL, zeta=zeta, n_env=n_atoms).fit(train, tensors)
    assert sparse.basis_.n_frames == n_atoms and len(sparse.w0_) == n_atoms
    assert relative_error(sparse.predict(validate), exact.predict(validate)) < 1e-6
    assert relative_error(sparse.train_predictions_, exact.train_predictions_) < 1e-6


@pytest.mark.slow
def test_fewer_environments_cost_accuracy_gradually(small_split, tmp_path):
    (train, tensors), (validate, truth) = small_split
    errors = {}
    for n_env in (40, 160):
        model = SAGPR(**SMALL, n_env=n_env).fit(train, tensors)
        streamed = model.predict(validate)
        errors[n_env] = component_rmse(truth, streamed)["unique6"]
        # kernels against the basis (cached route) and the folded weights agree
        cached = SAGPR(**SMALL, n_env=n_env, cache_dir=tmp_path).fit(train, tensors)
        assert relative_error(cached.predict(validate), streamed) < 1e-10
        model.save(tmp_path / f"m{n_env}")
        assert relative_error(SAGPR.load(tmp_path / f"m{n_env}").predict(validate), streamed) < 1e-12
    exact = component_rmse(truth, SAGPR(**SMALL).fit(train, tensors).predict(validate))["unique6"]
    assert exact <= errors[160] <= errors[40]
    assert errors[160] < 1.05 * exact


def test_environment_model_needs_regularisation(small_split):
    (train, tensors), _ = small_split
    with pytest.raises(ValueError, match="n_env=10 needs reg0 > 0"):
        SAGPR(**dict(SMALL, reg0=0.0), n_env=10).fit(train, tensors)


def test_streamed_fit_equals_one_pass(small_split, monkeypatch):
    """Two passes over small chunks, raw features recomputed: the same model as holding everything."""
    from hpo.models.sagpr import estimator

    (train, tensors), (validate, _) = small_split
    params = dict(SMALL, nc=30)
    whole = SAGPR(**params).fit(train, tensors)
    monkeypatch.setattr(estimator, "FEATURE_CHUNK_ATOMS", 50)
    monkeypatch.setattr(estimator, "RAW_KEEP_BYTES", 0)
    streamed = SAGPR(**params).fit(train, tensors)
    np.testing.assert_array_equal(streamed.projections_[1].columns, whole.projections_[1].columns)
    assert relative_error(streamed.predict(validate), whole.predict(validate)) < 1e-9


def test_projection_sample_spreads_whole_frames_within_the_bound(small_split):
    from hpo.models.sagpr.estimator import projection_sample

    assert projection_sample([12] * 200, 10000) is None and projection_sample([12] * 200, None) is None
    sample = projection_sample([96] * 800, 10000)
    assert 96 * len(sample) <= 10000 and len(sample) >= 100 and sample[0] == 0 and sample[-1] >= 700
    (train, tensors), (validate, _) = small_split
    # columns chosen on every third frame: a different projection, the same kind of model
    whole = SAGPR(**dict(SMALL, nc=30)).fit(train, tensors)
    sampled = SAGPR(**dict(SMALL, nc=30), projection_atoms=120).fit(train, tensors)
    assert sampled.fit_key_ != whole.fit_key_
    assert not np.array_equal(sampled.projections_[1].matrix, whole.projections_[1].matrix)
    truth = read_tensors(validate)
    errors = [component_rmse(truth, m.predict(validate))["unique6"] for m in (whole, sampled)]
    assert errors[1] < 1.1 * errors[0]
