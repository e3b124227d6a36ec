"""Predictive variance of both kinds against the closed form of a dense GP, and where it grows."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from helpers import require_shared_water
from hpo.models.gap import gap_fit as gap
from hpo.models.gap import solver as gs
from hpo.models.gap.descriptors import environments

from test_gap_solver import tiny_params

DELTA = tiny_params()["delta"]  # each descriptor's delta: its string carries it (0.5)


@pytest.fixture(scope="module")
def water():
    source = require_shared_water()
    return ase.io.read(source / "gap_input_50.xyz", ":8"), ase.io.read(source / "gap_validate.xyz", ":4")


def stretched(atoms: ase.Atoms, by_A: float) -> ase.Atoms:
    """One O-H bond of ``atoms`` pulled ``by_A`` further apart along itself: a geometry no training frame has."""
    out = atoms.copy()
    h = int(np.flatnonzero(out.numbers == 1)[0])
    o = int(np.flatnonzero(out.numbers == 8)[np.argmin(out.get_distances(h, np.flatnonzero(out.numbers == 8), mic=True))])
    bond = out.get_distance(o, h, mic=True, vector=True)
    out.positions[h] += by_A * bond / np.linalg.norm(bond)
    return out


def dense_kernel(params, a_frames, b_frames, delta):
    """Local-energy covariances delta^2 c_i c_j (q_i.q_j)^zeta between the environments of two frame lists
    (block diagonal over centre species), and each environment's frame."""
    blocks, frames_a, frames_b = [], [], []
    for d in gap.expected_descriptors(params, a_frames):
        ea, eb = environments(d, a_frames), environments(d, b_frames)
        blocks.append(delta**2 * np.outer(ea.cutoff, eb.cutoff) * (ea.vectors @ eb.vectors.T) ** params["zeta"])
        frames_a.append(ea.frame)
        frames_b.append(eb.frame)
    k = np.zeros((sum(len(b) for b in blocks), sum(b.shape[1] for b in blocks)))
    r = c = 0
    for b in blocks:
        k[r : r + b.shape[0], c : c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return k, np.concatenate(frames_a), np.concatenate(frames_b)


def test_gap_variance_is_the_dense_gp_variance_with_every_environment_sparse(water):
    train, test = water
    test = [*test, stretched(test[0], 0.5)]
    params = tiny_params(zeta=2, sparse_jitter=1e-10, n_sparse=10**6)  # every environment: n_sparse past their number
    hyper = gs.Hyper(energy_sigma=0.01, force_sigma=0.5, sparse_jitter=1e-10, e0={})
    found = {d: environments(d, train) for d in gap.expected_descriptors(params, train)}
    sparse = gs.SparseSet.of(found, {d: np.arange(len(e.vectors)) for d, e in found.items()})
    factors = gs.build_factors(sparse, train, found=found)
    posterior = gs.posterior_of(factors, train, hyper)
    frame_std, atom_std = posterior.std(test)

    # The dense GP on the frame energies: y = S f + noise, f ~ N(0, K) over every environment.
    k_tt, frame_t, _ = dense_kernel(params, train, train, DELTA)
    k_st, frame_s, _ = dense_kernel(params, test, train, DELTA)
    k_ss, _, _ = dense_kernel(params, test, test, DELTA)
    s_t = np.zeros((len(train), len(frame_t)))
    s_t[frame_t, np.arange(len(frame_t))] = 1.0
    s_s = np.zeros((len(test), len(frame_s)))
    s_s[frame_s, np.arange(len(frame_s))] = 1.0
    noise = (hyper.energy_sigma * np.sqrt([len(a) for a in train])) ** 2
    gram = s_t @ k_tt @ s_t.T + np.diag(noise)
    rows = k_st @ s_t.T  # local energies of the test environments against the training frames
    local_var = np.diag(k_ss) - np.einsum("ij,ji->i", rows, np.linalg.solve(gram, rows.T))
    frame_rows = s_s @ rows
    frame_var = np.diag(s_s @ k_ss @ s_s.T) - np.einsum("ij,ji->i", frame_rows, np.linalg.solve(gram, frame_rows.T))

    np.testing.assert_allclose(frame_std, np.sqrt(frame_var), rtol=1e-4, atol=1e-7)
    # per-atom std in the order of the atoms: environments of O, then of H, mapped back to their atoms
    dense_atoms = [np.zeros(len(atoms)) for atoms in test]
    cursor = 0
    for d in gap.expected_descriptors(params, train):
        z = int(d.split(" Z=")[1].split()[0])
        for i, atoms in enumerate(test):
            idx = np.flatnonzero(atoms.numbers == z)
            dense_atoms[i][idx] = np.sqrt(local_var[cursor : cursor + len(idx)])
            cursor += len(idx)
    np.testing.assert_allclose(np.concatenate(atom_std), np.concatenate(dense_atoms), rtol=1e-4, atol=1e-7)


def test_gap_variance_by_qr_is_the_projected_process_formula(water):
    """More targets than sparse points: the QR route's factors give k** - k K_MM^-1 k + k Sigma k (explicit inverses here)."""
    train, test = water
    params = tiny_params(zeta=2)
    hyper = gs.Hyper(energy_sigma=0.01, force_sigma=0.5, sparse_jitter=1e-6, e0={})
    found = {d: environments(d, train) for d in gap.expected_descriptors(params, train)}
    sparse = gs.SparseSet.of(found, {d: np.arange(3) for d in found})  # M = 6 < 8 frames
    factors = gs.build_factors(sparse, train, found=found)
    solution = gs.solve(factors, train, np.zeros(len(train)), hyper, with_posterior=True)
    assert solution.posterior.r is not None
    frame_std, _ = solution.posterior.std(test)
    k_mm = 0.25 * factors.k_mm + 1e-6 * np.eye(6)
    k_nm = 0.25 * factors.energy_rows
    noise = (0.01 * np.sqrt([len(a) for a in train])) ** 2
    sigma = np.linalg.inv(k_mm + k_nm.T @ (k_nm / noise[:, None]))
    rows = 0.25 * gs.EvaluationRows.of(sparse, test, False).energy_rows
    k_ss, frame_s, _ = dense_kernel(params, test, test, 0.5)
    s_s = np.zeros((len(test), len(frame_s)))
    s_s[frame_s, np.arange(len(frame_s))] = 1.0
    prior = np.diag(s_s @ k_ss @ s_s.T)
    var = prior - np.einsum("ij,ji->i", rows, np.linalg.solve(k_mm, rows.T)) + np.einsum("ij,jk,ik->i", rows, sigma, rows)
    np.testing.assert_allclose(frame_std, np.sqrt(var), rtol=1e-5)


def test_gap_std_grows_away_from_the_training_data(water):
    train, test = water
    params = tiny_params(zeta=2, n_sparse=20)
    hyper = gs.Hyper(energy_sigma=0.005, force_sigma=0.5, sparse_jitter=1e-8, e0={})
    found = {d: environments(d, train) for d in gap.expected_descriptors(params, train)}
    from hpo.models.sparse_gp import select_sparse

    sparse = gs.SparseSet.of(found, {d: select_sparse(e.vectors, 20, "fps", 0) for d, e in found.items()})
    factors = gs.build_factors(sparse, train, found=found)
    posterior = gs.posterior_of(factors, train, hyper)
    far = stretched(test[0], 0.8)
    frame_std, atom_std = posterior.std([test[0], far])
    assert frame_std[1] > 2 * frame_std[0]
    # a local energy alone is fixed only up to how the total splits over species (every frame has the same
    # composition): its std stays near the prior's and says little; the frame's total is the signal
    assert all(np.all(a <= DELTA * (1 + 1e-9)) for a in atom_std)


# --------------------------------------------------------------------------- SA-GPR

SAGPR_SMALL = dict(rc=3.0, sigma=0.3, n_max=4, l_max=2, nc=None, reg0=1e-3, reg2=1e-3)


@pytest.fixture(scope="module")
def polarizable():
    from hpo.data import read_tensors

    source = require_shared_water()
    train = ase.io.read(source / "gap_input_50.xyz", ":16")
    validate = ase.io.read(source / "gap_validate.xyz", ":4")
    return train, read_tensors(train, "Polarizability", "train", symmetry_tol=0.1), validate


def test_sagpr_std_is_the_dense_gp_std_and_the_projected_process_on_every_environment_agrees(polarizable, tmp_path):
    from hpo.models.sagpr.estimator import SAGPR
    from hpo.models.sagpr.scale import structure_kernels

    train, tensors, validate = polarizable
    validate = [*validate, stretched(validate[0], 0.6)]
    exact = SAGPR(**SAGPR_SMALL).fit(train, tensors)
    mean, std = exact.predict(validate, return_std=True)
    np.testing.assert_allclose(mean, exact.predict(validate), rtol=1e-8, atol=1e-10)

    # closed form of the L=2 regression, densely: xy = a2[0] / sqrt(2), so var(xy) = var(a2[0]) / 2
    from hpo.cache import Cache

    features = exact._transform(validate, Cache(None))
    _, k2_train = structure_kernels(exact.basis_, None, exact.zeta)
    _, k2_test = structure_kernels(features, exact.basis_, exact.zeta)
    _, k2_self = structure_kernels(features, None, exact.zeta)
    n, m = len(validate), len(train)
    gram = k2_train.reshape(5 * m, 5 * m) + exact.reg2 * np.eye(5 * m)
    rows = k2_test[:, 0].reshape(n, 5 * m)
    var_a2_0 = np.array([k2_self[i, 0, i, 0] for i in range(n)]) - np.einsum("ij,ji->i", rows, np.linalg.solve(gram, rows.T))
    np.testing.assert_allclose(std[:, 0, 1], np.sqrt(var_a2_0 / 2), rtol=1e-5)
    assert std[-1, 0, 1] > 1.5 * std[0, 0, 1]  # the stretched molecule (1 of 12 atoms: the frame average dilutes it)

    sparse = SAGPR(**SAGPR_SMALL, n_env=sum(len(a) for a in train)).fit(train, tensors)
    _, sparse_std = sparse.predict(validate, return_std=True)
    np.testing.assert_allclose(sparse_std, std, rtol=2e-3, atol=1e-6 * std.max())
    sparse.save(tmp_path / "model")
    _, loaded_std = SAGPR.load(tmp_path / "model").predict(validate, return_std=True)
    np.testing.assert_allclose(loaded_std, sparse_std, rtol=1e-10)


# --------------------------------------------------------------------------- the stability gate


def test_stability_gate_flags_a_run_whose_frames_extrapolate(water):
    from hpo import stability
    from hpo.models.sparse_gp import select_sparse

    train, validate = water
    params = tiny_params(zeta=2, n_sparse=20)
    hyper = gs.Hyper(energy_sigma=0.005, force_sigma=0.5, sparse_jitter=1e-8, e0={})
    found = {d: environments(d, train) for d in gap.expected_descriptors(params, train)}
    sparse = gs.SparseSet.of(found, {d: select_sparse(e.vectors, 20, "fps", 0) for d, e in found.items()})
    posterior = gs.posterior_of(gs.build_factors(sparse, train, found=found), train, hyper)
    threshold = float(posterior.std(validate)[0].max())
    criteria = stability.StabilityCriteria(max_departure_A=0.5, max_h_distance_A=2.5, min_temperature_K=0.0,
                                           max_temperature_K=2000.0, max_extrapolating_fraction=0.25)
    ranges = stability.training_ranges(train)
    # a run that drifts away: validation frames with one O-H bond pulled further out, 0.1 A more each time
    # (within the distance bands: only the model's own uncertainty sees it)
    run = [*validate, *(stretched(validate[i], 0.3 + 0.1 * k) for k, i in enumerate((0, 1, 3, 0)))]
    steps = list(range(len(run)))
    std = posterior.std(run)[0]
    verdict = stability.judge(run, [300.0] * len(run), steps, ranges, criteria, uncertainty=std,
                              uncertainty_threshold=threshold, uncertainty_source="largest on validation")
    assert not verdict.stable and "extrapolating" in verdict.reason
    assert verdict.extrapolating[len(validate):].all() and not verdict.extrapolating[: len(validate)].any()
    assert verdict.metrics["extrapolating_fraction"] == pytest.approx(4 / len(run))
    # the frames alone (no uncertainty) pass every geometric rule
    assert stability.judge(run, [300.0] * len(run), steps, ranges, criteria).stable
    # the validation frames themselves are not extrapolating
    assert stability.judge(validate, [300.0] * len(validate), list(range(len(validate))), ranges, criteria,
                           uncertainty=posterior.std(validate)[0], uncertainty_threshold=threshold).stable


def test_bounds_widen_to_the_training_data_and_name_their_source(water):
    from hpo import stability

    train, validate = water
    criteria = stability.StabilityCriteria(max_departure_A=0.5, max_h_distance_A=2.5, min_temperature_K=0.0, max_temperature_K=2000.0)
    same, sources = stability.bounds_from_training(criteria, train, "train.xyz")
    assert same.max_h_distance_A == 2.5 and "literature default" in sources["max_h_distance_A"]
    from ase.build import molecule

    far = molecule("H2O")  # a hydrogen 3 A from the oxygen, as in reactive data
    far.positions[1] = far.positions[0] + 3.0 * (far.positions[1] - far.positions[0]) / np.linalg.norm(far.positions[1] - far.positions[0])
    h_far = stability._hydrogen_to_heavy(stability._FrameGeometry(far))[0]
    assert h_far == pytest.approx(3.0)
    widened, sources = stability.bounds_from_training(criteria, [*train, far], "reactive.xyz")
    assert widened.max_h_distance_A == pytest.approx(h_far + 0.5)
    assert "training data (reactive.xyz" in sources["max_h_distance_A"] and "training frames carry no momenta" in sources["max_temperature_K"]


def test_rdf_criterion_flags_a_compressed_cell(water):
    from hpo import stability

    train, validate = water
    criteria = stability.StabilityCriteria(max_departure_A=5.0, max_h_distance_A=2.5, min_temperature_K=0.0, max_temperature_K=2000.0,
                                           rdf_max_mae=1.0, rdf_window_frames=2, rdf_bin_A=0.1)
    r_max = stability.usable_range([*train, *validate])
    reference = stability.rdf(train, r_max, criteria.rdf_bin_A)
    # g(r) of the training frames integrates to the neighbour count: 2 H within 1.2 A of each O
    h_o = reference.pairs["H-O"]
    shells = 4 / 3 * np.pi * ((reference.r + 0.05) ** 3 - (reference.r - 0.05) ** 3)
    density_h = 8 / train[0].get_volume()
    assert np.sum((h_o * shells * density_h)[reference.r < 1.2]) == pytest.approx(2.0, abs=0.05)
    compressed = [a.copy() for a in validate]
    for atoms in compressed[2:]:
        atoms.set_cell(atoms.cell * 0.9, scale_atoms=True)
    steps = list(range(len(compressed)))
    verdict = stability.judge(compressed, [300.0] * len(steps), steps, stability.training_ranges(train), criteria, reference_rdf=reference)
    assert not verdict.stable and "RDF departs from the training RDF" in verdict.reason and verdict.first_unstable_step >= 2
    assert stability.judge(validate, [300.0] * len(steps), steps, stability.training_ranges(train), criteria, reference_rdf=reference).stable


# --------------------------------------------------------------------------- calibration


def test_calibration_scale_recovers_a_known_factor():
    from hpo import calibration

    rng = np.random.default_rng(0)
    std = rng.uniform(0.01, 0.1, 4000)  # heteroscedastic: a GP's std varies frame to frame
    errors = 2.5 * std * rng.standard_normal(4000)  # the model's std is 2.5 x too small
    test_std = rng.uniform(0.01, 0.1, 4000)
    test_errors = 2.5 * test_std * rng.standard_normal(4000)
    scale, found = calibration.calibrate("energy", {"val": (errors, std), "test": (test_errors, test_std)})
    assert scale == pytest.approx(2.5, rel=0.03)
    assert found["test_energy_raw_coverage_1std"] < 0.4  # before: far below nominal
    assert found["test_energy_coverage_1std"] == pytest.approx(calibration.NOMINAL[1], abs=0.03)
    assert found["test_energy_coverage_2std"] == pytest.approx(calibration.NOMINAL[2], abs=0.02)
    assert found["test_energy_z_rms"] == pytest.approx(1.0, abs=0.05)
