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
    params = tiny_params(zeta=2, sparse_jitter=1e-10)
    hyper = gs.Hyper(delta=0.5, zeta=2.0, energy_sigma=0.01, force_sigma=0.5, sparse_jitter=1e-10, e0={})
    found = {d: environments(d, train) for d in gap.expected_descriptors(params, train)}
    sparse = gs.SparseSet.of(found, {d: np.arange(len(e.vectors)) for d, e in found.items()})
    factors = gs.build_factors(sparse, train, 2.0, found=found)
    posterior = gs.Posterior.of(factors, train, hyper)
    frame_std, atom_std = posterior.std(test)

    # The dense GP on the frame energies: y = S f + noise, f ~ N(0, K) over every environment.
    k_tt, frame_t, _ = dense_kernel(params, train, train, hyper.delta)
    k_st, frame_s, _ = dense_kernel(params, test, train, hyper.delta)
    k_ss, _, _ = dense_kernel(params, test, test, hyper.delta)
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


def test_gap_std_grows_away_from_the_training_data(water):
    train, test = water
    params = tiny_params(zeta=2, n_sparse=20)
    hyper = gs.Hyper(delta=0.5, zeta=2.0, energy_sigma=0.005, force_sigma=0.5, sparse_jitter=1e-8, e0={})
    found = {d: environments(d, train) for d in gap.expected_descriptors(params, train)}
    from hpo.models.sparse_gp import select_sparse

    sparse = gs.SparseSet.of(found, {d: select_sparse(e.vectors, 20, "fps", 0) for d, e in found.items()})
    factors = gs.build_factors(sparse, train, 2.0, found=found)
    posterior = gs.Posterior.of(factors, train, hyper)
    far = stretched(test[0], 0.8)
    frame_std, atom_std = posterior.std([test[0], far])
    assert frame_std[1] > 2 * frame_std[0]
    # a local energy alone is fixed only up to how the total splits over species (every frame has the same
    # composition): its std stays near the prior's and says little; the frame's total is the signal
    assert all(np.all(a <= hyper.delta * (1 + 1e-9)) for a in atom_std)


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
