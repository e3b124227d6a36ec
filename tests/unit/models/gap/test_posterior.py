"""Tests of hpo.models.gap.posterior: GAP's predictive variance against the closed form of a dense GP, where it
grows, and the stability gate it feeds."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from hpo.models.gap import gap_fit as gap, solver as gs
from hpo.models.gap.descriptors import environments

from helpers import require_shared_water, stretched, tiny_params

DELTA = tiny_params()["delta"]  # each descriptor's delta: its string carries it (0.5)


@pytest.fixture(scope="module")
def water():
    source = require_shared_water()
    return ase.io.read(source / "gap_input_50.xyz", ":8"), ase.io.read(source / "gap_validate.xyz", ":4")



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
