"""Tests of hpo.models.gap.solver: hpo's sparse points and numpy solve against the real gap_fit (same sparse
points, same model), the model it writes, its memory and time estimates."""

from __future__ import annotations

from types import SimpleNamespace

import ase.io
import numpy as np
import pytest

from hpo.models.gap import gap_fit as gap, solver as gs
from hpo.models.gap.descriptors import descriptor_key, environments
from hpo.cache import Cache
from hpo.models.gap.sparse_gap import SparseGap
from hpo.models.sparse_gp import select_sparse

from helpers import require_shared_water, tiny_params

WATER_E0 = {"H": -12.13639159, "O": -2026.441234142}
ENERGY_TOL = 1e-6  # eV
FORCE_TOL = 1e-5  # eV/A


# EMT Cu/Al cells (emt fixture) with forces: the settings of every fit-equality test on them
EMT_SOAP = dict(atom_sigma=0.5, cutoff=3.5, cutoff_transition_width=1.0, n_sparse=10, zeta=2,
                default_sigma=dict(energy=0.002, force=0.05, virial=0.0, hessian=0.0))


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    source = require_shared_water()
    root = tmp_path_factory.mktemp("gap_solver_water")
    ase.io.write(root / "train.xyz", ase.io.read(source / "gap_input_50.xyz", ":8"), format="extxyz")
    train = ase.io.read(root / "train.xyz", ":")  # what gap_fit reads, to the last digit
    val = ase.io.read(source / "gap_validate.xyz", ":6")
    return root, train, val


def energies(frames) -> np.ndarray:
    return np.array([a.get_potential_energy() for a in frames])


@pytest.mark.parametrize("method", ["fps", "cur"])
def test_a_smaller_selection_is_a_prefix(water, method):
    _, train, _ = water
    found = environments(gap.expected_descriptors(tiny_params(), train)[1], train)
    big = select_sparse(found.vectors, 20, method, seed=3)
    assert len(set(big.tolist())) == 20
    np.testing.assert_array_equal(select_sparse(found.vectors, 7, method, seed=3), big[:7])


@pytest.mark.slow
@pytest.mark.parametrize("zeta", [1, 4])
def test_energy_only_fit_equals_gap_fit(water, tmp_path, zeta):
    root, train, val = water
    params = tiny_params(zeta=zeta)
    descriptors = gap.expected_descriptors(params, train)
    cache = Cache(tmp_path / "cache")
    model, sparse = gs.fit_frames(params, train, energies(train), WATER_E0, sparse_method="fps", seed=zeta, cache=cache)
    keys = SimpleNamespace(energy="energy", force="force")
    result = gap.GAP(params, WATER_E0, keys, sparse=gap.SparsePoints(train, tuple([sparse[d] for d in descriptors])), energy_only=True).fit(root / "train.xyz", tmp_path / "fit")
    out = (tmp_path / "fit" / "gap_fit.out").read_text()
    assert "Number of target forces (property name: hpo_no_force_targets) found: 0" in out
    reference = SparseGap.read(result.model_file_)

    # gap_fit used exactly hpo's sparse points (it lists them sorted by index), one GP per species in the same order.
    assert len(reference.gps) == len(model.gps) == 2
    for ref_gp, gp, descriptor in zip(reference.gps, model.gps, descriptors):
        found = environments(descriptor, train, cache=cache)
        # (to the last bits: gap_fit writes what its own descriptor call gave, hpo asks quippy again)
        np.testing.assert_allclose(ref_gp.sparse_points, found.vectors[np.sort(sparse[descriptor])], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(gp.sparse_points, found.vectors[np.sort(sparse[descriptor])])
    assert cache.stats["gap_descriptors_hit"] == 2 * len(train)  # one entry per frame and species

    for frames in (train, val):
        assert np.abs(model.predict(frames) - reference.predict(frames)).max() < ENERGY_TOL


@pytest.fixture(scope="module")
def emt(tmp_path_factory):
    """Cu/Al frames of a short EMT MD: forces that are the energy's gradient."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.verlet import VelocityVerlet

    root = tmp_path_factory.mktemp("gap_solver_emt")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 6]] = 13
    atoms.rattle(0.1, seed=0)
    atoms.calc = EMT()
    dyn = VelocityVerlet(atoms, 2 * units.fs)
    frames = []
    for _ in range(9):
        dyn.run(4)
        frame = atoms.copy()
        frame.info["energy"] = atoms.get_potential_energy()
        frame.arrays["forces"] = atoms.get_forces()
        frames.append(frame)
    ase.io.write(root / "train.xyz", frames[:6], format="extxyz")
    ase.io.write(root / "val.xyz", frames[6:], format="extxyz")
    return root, ase.io.read(root / "train.xyz", ":"), ase.io.read(root / "val.xyz", ":")


@pytest.mark.slow
@pytest.mark.parametrize("zeta", [2, 4])
def test_energy_and_force_fit_equals_gap_fit_on_emt(emt, tmp_path, zeta):
    root, train, val = emt
    params = tiny_params(
        atom_sigma=0.5, cutoff=3.5, cutoff_transition_width=1.0, n_sparse=10, zeta=zeta,
        default_sigma=dict(energy=0.002, force=0.05, virial=0.0, hessian=0.0),
    )
    e0 = {"Cu": -0.1, "Al": -0.2}
    train_forces = [a.get_forces() for a in train]
    model, sparse = gs.fit_frames(params, train, energies(train), e0, forces=train_forces, seed=1)
    keys = SimpleNamespace(energy="energy", force="forces")
    descriptors = gap.expected_descriptors(params, train)
    result = gap.GAP(params, e0, keys, sparse=gap.SparsePoints(train, tuple([sparse[d] for d in descriptors]))).fit(root / "train.xyz", tmp_path / "fit")
    assert "Number of target forces (property name: forces) found: 144" in (tmp_path / "fit" / "gap_fit.out").read_text()

    quippy_energies, quippy_forces = gap.predict(gap.load(result.model_file_), val)
    assert np.abs(model.predict(val) - quippy_energies).max() < ENERGY_TOL
    found = {d: environments(d, val, gradients=True) for d in descriptors}
    forces = gs.predict_forces(model, found, val)
    assert max(np.abs(f - q).max() for f, q in zip(forces, quippy_forces)) < FORCE_TOL
    # The fit learned something: forces closer to EMT's than zero is.
    reference = np.concatenate([a.get_forces() for a in val])
    assert np.sqrt(np.mean((np.concatenate(forces) - reference) ** 2)) < 0.5 * np.sqrt(np.mean(reference**2))


@pytest.mark.slow
def test_water_fit_with_its_force_column_equals_gap_fit(water, tmp_path):
    """The fit hpo runs today (force_parameter_name=force, default_sigma force 0.5): same model in numpy."""
    root, train, val = water
    params = tiny_params(n_sparse=10, zeta=2)
    descriptors = gap.expected_descriptors(params, train)
    train_forces = [a.arrays["force"] for a in train]
    model, sparse = gs.fit_frames(params, train, energies(train), WATER_E0, forces=train_forces, seed=0)
    keys = SimpleNamespace(energy="energy", force="force")
    result = gap.GAP(params, WATER_E0, keys, sparse=gap.SparsePoints(train, tuple([sparse[d] for d in descriptors]))).fit(root / "train.xyz", tmp_path / "fit")
    assert "Number of target forces (property name: force) found: 288" in (tmp_path / "fit" / "gap_fit.out").read_text()
    reference = SparseGap.read(result.model_file_)
    assert np.abs(model.predict(val) - reference.predict(val)).max() < ENERGY_TOL
    found = {d: environments(d, val, gradients=True) for d in descriptors}
    ref_found = {gp.descriptor: environments(gp.descriptor, val, gradients=True) for gp in reference.gps}
    for mine, theirs in zip(gs.predict_forces(model, found, val), gs.predict_forces(reference, ref_found, val)):
        assert np.abs(mine - theirs).max() < FORCE_TOL


def test_written_model_is_loaded_by_quippy(emt, tmp_path):
    _, train, val = emt
    params = tiny_params(atom_sigma=0.5, cutoff=3.5, cutoff_transition_width=1.0, n_sparse=8, zeta=2)
    model, _ = gs.fit_frames(params, train, energies(train), {"Cu": -0.1, "Al": -0.2}, forces=[a.get_forces() for a in train])
    path = gs.write_xml(model, tmp_path / "hpo_gap.xml")
    back = SparseGap.read(path)
    for gp, read in zip(model.gps, back.gps):
        np.testing.assert_array_equal(read.alpha, gp.alpha)
        np.testing.assert_array_equal(read.sparse_points, gp.sparse_points)
    quippy_energies, quippy_forces = gap.predict(gap.load(path), val)
    assert np.abs(model.predict(val) - quippy_energies).max() < ENERGY_TOL
    found = {d: environments(d, val, gradients=True) for d in model.descriptors}
    for mine, theirs in zip(gs.predict_forces(model, found, val), quippy_forces):
        assert np.abs(mine - theirs).max() < FORCE_TOL


def test_written_model_with_long_sparse_points_is_loaded_by_quippy(water, tmp_path):
    """Descriptors longer than 50 values are written in gap_fit's slices (quippy reads them by fixed width)."""
    _, train, val = water
    params = tiny_params(n_max=8, l_max=8, cutoff=4.0, n_sparse=6)
    model, _ = gs.fit_frames(params, train[:4], energies(train[:4]), WATER_E0)
    assert model.gps[0].sparse_points.shape[1] > 50
    path = gs.write_xml(model, tmp_path / "long.xml")
    assert "sparseX_slice" in path.read_text()
    quippy_energies, _ = gap.predict(gap.load(path), val[:2])
    assert np.abs(model.predict(val[:2]) - quippy_energies).max() < ENERGY_TOL


# --------------------------------------------------------------------------- streamed factors


def test_triangular_factor_of_blocks_is_the_factor_of_the_whole():
    """TSQR: folding rows block by block gives R with R^T R = A^T A (the same least-squares problem)."""
    a = np.random.default_rng(0).normal(size=(1000, 40))
    factor = gs.TriangularFactor(40, block_rows=64)
    for start in range(0, len(a), 37):  # blocks that do not line up with the fold size
        factor.add(a[start : start + 37])
    r = factor.r
    assert np.allclose(np.tril(r, -1), 0.0)
    np.testing.assert_allclose(r.T @ r, a.T @ a, rtol=1e-10, atol=1e-9)
    few = gs.TriangularFactor(40, block_rows=64)
    few.add(a[:5])  # fewer rows than columns: zero rows below
    np.testing.assert_allclose(few.r.T @ few.r, a[:5].T @ a[:5], atol=1e-10)


@pytest.mark.slow
def test_smaller_sparse_set_from_the_factors_of_a_larger_one(emt, tmp_path):
    """Factors built for 10 sparse points per species solve the fit of 6 exactly as factors built for 6,
    and the training force RMSE read off R equals the one of predicted training forces."""
    _, train, _ = emt
    params = tiny_params(**EMT_SOAP)
    e0 = {"Cu": -0.1, "Al": -0.2}
    forces = [a.get_forces() for a in train]
    descriptors = gap.expected_descriptors(params, train)
    found = {d: environments(d, train) for d in descriptors}
    orders = {d: select_sparse(found[d].vectors, 10, "fps", 1) for d in descriptors}
    hyper = gs.Hyper.from_params(params, e0)
    large = gs.build_factors(gs.SparseSet.of(found, orders), train, forces)
    small_orders = {d: o[:6] for d, o in orders.items()}
    small = gs.build_factors(gs.SparseSet.of(found, small_orders), train, forces)
    from_large = gs.solve(large, train, energies(train), hyper, n_sparse=6)
    direct = gs.solve(small, train, energies(train), hyper)
    for a, b in zip(from_large.model.gps, direct.model.gps):
        np.testing.assert_allclose(a.sparse_points, b.sparse_points)
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-7, atol=1e-9 * np.abs(b.alpha).max())
    assert from_large.train_force_rmse == pytest.approx(direct.train_force_rmse, rel=1e-9)
    found_grad = {d: environments(d, train, gradients=True) for d in descriptors}
    predicted = gs.predict_forces(direct.model, found_grad, train)
    rmse = np.sqrt(np.mean((np.concatenate(predicted) - np.concatenate(forces)) ** 2))
    assert direct.train_force_rmse == pytest.approx(rmse, rel=1e-6)
    np.testing.assert_allclose(direct.train_energies, direct.model.predict(train), atol=1e-8)


def test_memory_estimate_is_flat_in_frames_and_grows_with_sparse_points():
    """The streamed fit's estimate grows with the frames only through the energy rows and the vectors."""
    from ase.build import bulk

    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))  # 256 atoms
    d = gap.soap_dimensions(8, 6, 1)
    pairs = gap.neighbours_per_atom(5.0, [cell]) + 1
    at = {n: gs.memory_bytes(2000, [cell] * n, d, pairs, True) for n in (50, 500)}
    assert at[500] - at[50] < 0.6e9  # 450 more frames: descriptor vectors and energy rows only
    assert at[500] < 4e9
    assert gs.memory_bytes(4000, [cell] * 50, d, pairs, True) > at[50] + 0.2e9


def test_own_data_defaults_come_from_the_data(emt):
    """n_sparse=auto: a tenth of the most frequent species' environments (at least 100, at most all of them),
    cut to half the memory budget; default_sigma.force=auto: 3% of the training forces' spread."""
    from hpo.models.gap.kind import KIND, numpy_memory_bytes

    _, train, _ = emt
    frames = train * 40  # 1920 environments: 1440 Cu, 480 Al
    forces = [a.get_forces() for a in frames]
    data = SimpleNamespace(train=SimpleNamespace(frames=frames, forces=forces))
    params = dict(tiny_params(n_sparse="auto", default_sigma=dict(energy=0.01, force="auto", virial=0.0, hessian=0.0)),
                  solver="numpy", fit_forces=True, memory_budget_gb=16)
    found = KIND.data_defaults(params, data)
    assert found["n_sparse"][0] == 144 and "1440 Cu environments" in found["n_sparse"][1]
    spread = np.std(np.concatenate(forces))
    assert found["default_sigma.force"][0] == pytest.approx(0.03 * spread, rel=0.01)
    resolved = KIND.resolve_auto(params, data)
    assert resolved["n_sparse"] == 144 and resolved["default_sigma"]["force"] == found["default_sigma.force"][0]
    small = dict(params, memory_budget_gb=2 * numpy_memory_bytes(dict(params, n_sparse=50), frames) / 1e9)
    cut, why = KIND.data_defaults(small, data)["n_sparse"]
    assert cut < 144 and "memory_budget_gb" in why
    assert numpy_memory_bytes(dict(params, n_sparse=cut), frames) <= small["memory_budget_gb"] * 1e9 / 2


SHORT_SOAP = dict(cutoff=2.5, atom_sigma=0.4, n_max=3, l_max=2, n_sparse=6, delta=0.2, zeta=3)


@pytest.mark.slow
def test_two_descriptors_fit_equals_gap_fit_on_emt(emt, tmp_path):
    """A long and a short SOAP (model.descriptors), each with its own n_sparse, delta and zeta: hpo's solver
    and gap_fit (gap={soap ... : soap ...} on the same sparse points) fit the same energies and forces."""
    root, train, val = emt
    params = tiny_params(**EMT_SOAP, descriptors=[SHORT_SOAP])
    e0 = {"Cu": -0.1, "Al": -0.2}
    descriptors = gap.expected_descriptors(params, train)
    assert len(descriptors) == 4 and "cutoff=2.5" in descriptors[2] and "zeta=3" in descriptors[3]  # 2 settings x 2 species
    model, sparse = gs.fit_frames(params, train, energies(train), e0, forces=[a.get_forces() for a in train], seed=1)
    assert [len(gp.alpha) for gp in model.gps] == [10, 10, 6, 6]
    keys = SimpleNamespace(energy="energy", force="forces")
    result = gap.GAP(params, e0, keys, sparse=gap.SparsePoints(train, tuple(sparse[d] for d in descriptors))).fit(root / "train.xyz", tmp_path / "fit")
    written = SparseGap.read(result.model_file_)
    # gap_fit lists the settings species by species in this order (GP keys aside: its copy names the index files)
    assert [descriptor_key(gp.descriptor) for gp in written.gps] == [descriptor_key(d) for d in descriptors]
    assert [gp.delta for gp in written.gps] == [0.5, 0.5, 0.2, 0.2]
    quippy_energies, quippy_forces = gap.predict(gap.load(result.model_file_), val)
    assert np.abs(model.predict(val) - quippy_energies).max() < ENERGY_TOL
    found = {d: environments(d, val, gradients=True) for d in descriptors}
    assert max(np.abs(f - q).max() for f, q in zip(gs.predict_forces(model, found, val), quippy_forces)) < FORCE_TOL
    # the short SOAP contributes: without it the model is another one
    alone, _ = gs.fit_frames({**params, "descriptors": []}, train, energies(train), e0, forces=[a.get_forces() for a in train], seed=1)
    assert np.abs(model.predict(val) - alone.predict(val)).max() > 100 * ENERGY_TOL


@pytest.mark.slow
def test_other_counts_per_descriptor_from_the_factors_of_a_larger_set(emt):
    """Factors built for 10 points of every descriptor solve a fit of 10 long-SOAP and 4 short-SOAP points (columns
    that are not a prefix: R re-triangularised) as factors built for exactly those points do."""
    _, train, _ = emt
    params = tiny_params(**EMT_SOAP, descriptors=[{**SHORT_SOAP, "n_sparse": 10}])
    e0 = {"Cu": -0.1, "Al": -0.2}
    forces = [a.get_forces() for a in train]
    descriptors = gap.expected_descriptors(params, train)
    found = {d: environments(d, train) for d in descriptors}
    orders = {d: select_sparse(found[d].vectors, 10, "fps", 1) for d in descriptors}
    hyper = gs.Hyper.from_params(params, e0)
    large = gs.build_factors(gs.SparseSet.of(found, orders), train, forces)
    counts = [10, 10, 4, 4]
    small = gs.build_factors(gs.SparseSet.of(found, {d: o[:c] for (d, o), c in zip(orders.items(), counts)}), train, forces)
    from_large = gs.solve(large, train, energies(train), hyper, n_sparse=counts)
    assert from_large.columns[-1] > len(from_large.columns) - 1  # not a prefix
    direct = gs.solve(small, train, energies(train), hyper, n_sparse=counts)
    for a, b in zip(from_large.model.gps, direct.model.gps):
        np.testing.assert_allclose(a.sparse_points, b.sparse_points)
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-7, atol=1e-9 * np.abs(b.alpha).max())
    assert from_large.train_force_rmse == pytest.approx(direct.train_force_rmse, rel=1e-9)


@pytest.mark.slow
def test_force_subsample_reaches_gap_fit_as_its_force_mask(emt, tmp_path):
    """Half of each frame's atoms with forces in the fit: hpo's solver and gap_fit (told by its force mask)
    fit the same model, and it differs from the fit with every force."""
    root, train, val = emt
    params = tiny_params(**EMT_SOAP)
    e0 = {"Cu": -0.1, "Al": -0.2}
    forces = [a.get_forces() for a in train]
    kept = gs.force_selection(train, 0.5, seed=3)
    assert [int(k.sum()) for k in kept] == [4] * len(train)
    model, sparse = gs.fit_frames(params, train, energies(train), e0, forces=forces, seed=1, force_atoms=kept)
    everything, _ = gs.fit_frames(params, train, energies(train), e0, forces=forces, seed=1)
    descriptors = gap.expected_descriptors(params, train)
    keys = SimpleNamespace(energy="energy", force="forces")
    result = gap.GAP(params, e0, keys, sparse=gap.SparsePoints(train, tuple(sparse[d] for d in descriptors)), force_atoms=kept).fit(
        root / "train.xyz", tmp_path / "fit")
    assert "force_mask_parameter_name=hpo_force_mask" in (tmp_path / "fit" / "gap_fit.cmd").read_text()
    quippy_energies, quippy_forces = gap.predict(gap.load(result.model_file_), val)
    assert np.abs(model.predict(val) - quippy_energies).max() < ENERGY_TOL
    found = {d: environments(d, val, gradients=True) for d in descriptors}
    assert max(np.abs(f - q).max() for f, q in zip(gs.predict_forces(model, found, val), quippy_forces)) < FORCE_TOL
    assert np.abs(model.predict(val) - everything.predict(val)).max() > 100 * ENERGY_TOL


@pytest.mark.slow
def test_memory_estimate_holds_the_measured_peak_of_a_fit_with_forces(tmp_path):
    """``hpo fit`` with forces on 108-atom EMT Cu cells (n_max 8, l_max 6, 500 sparse points) in its own
    process: the estimate the budget is held to is within a factor of 2 of the process's measured peak."""
    import subprocess
    import sys

    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.calc = EMT()
    dynamics = Langevin(atoms, 2 * units.fs, temperature_K=900, friction=0.02, rng=np.random.default_rng(0))
    frames = []
    for _ in range(7):
        dynamics.run(5)
        frame = atoms.copy()
        frame.info["REF_energy"] = atoms.get_potential_energy()
        frame.arrays["REF_forces"] = atoms.get_forces()
        frames.append(frame)
    isolated = ase.Atoms("Cu", cell=[20, 20, 20], pbc=False)
    isolated.calc = EMT()
    isolated.info["REF_energy"] = isolated.get_potential_energy()
    isolated.calc = None
    ase.io.write(tmp_path / "train.xyz", [isolated, *frames[:5]], format="extxyz")
    ase.io.write(tmp_path / "val.xyz", frames[5:], format="extxyz")
    command = [sys.executable, "-m", "hpo", "fit", "dataset=files", "dataset.train=train.xyz", "dataset.val=val.xyz", "dataset.name=cu108",
               "dataset.keys.energy=REF_energy", "dataset.keys.forces=REF_forces", f"root={tmp_path}", "model.n_max=8", "model.l_max=6",
               "model.cutoff=5.0", "model.atom_sigma=0.5", "model.n_sparse=500", "model.memory_budget_gb=4"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split() for line in done.stdout.splitlines() if line.startswith("  ") and len(line.split()) == 2)
    peak, estimate = float(printed["peak_rss_gb"]), float(printed["memory_estimate_gb"])
    print(f"108-atom Cu, 5 frames with forces, 500 sparse points: estimate {estimate:.2f} GB, measured peak {peak:.2f} GB")
    assert 0.5 <= peak / estimate <= 2.0
