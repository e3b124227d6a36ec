"""Tests of hpo.stability: MD stability as an observable, on the real water snapshots (and one real EMT MD of
copper); bounds widened by the training data; the RDF rule.

Damaged trajectories are made by moving one hydrogen of real frames; the
expected verdicts follow from the geometry, not from the implementation."""

from __future__ import annotations

import re

import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from hpo.stability import (
    StabilityCriteria,
    Verdict,
    distance_bands_plot,
    energy_drift,
    judge,
    nearest_neighbour_extremes,
    training_ranges,
)

from helpers import require_shared_water

# The suggested config values (see the hpo.stability docstring for their sources).
CRITERIA = StabilityCriteria(max_departure_A=0.5, max_h_distance_A=2.5, min_temperature_K=0.0, max_temperature_K=2000.0)
MLFLOW_METRIC_NAME = re.compile(r"^[\w\-./ ]+$")
FIRST_BAD = 7  # frame index from which a trajectory is damaged


@pytest.fixture(scope="module")
def water():
    source = require_shared_water()
    return {
        "train": ase.io.read(source / "gap_input_50.xyz", ":50"),
        "validate": ase.io.read(source / "gap_validate.xyz", ":20"),
    }


@pytest.fixture(scope="module")
def ranges(water):
    return training_ranges(water["train"])


def steps_of(frames) -> list[int]:
    return [10 * i for i in range(len(frames))]  # a log interval of 10 MD steps


def bond_vector(atoms: Atoms, hydrogen: int) -> np.ndarray:
    """Minimum-image vector from hydrogen ``hydrogen`` to its nearest oxygen."""
    oxygens = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s == "O"]
    vectors = atoms.get_distances(hydrogen, oxygens, mic=True, vector=True)
    return vectors[np.argmin(np.linalg.norm(vectors, axis=1))]


def move_along_bond(frames, hydrogen: int, shift_A: float, first: int):
    """Copies of ``frames``; from ``first`` on, ``hydrogen`` moved by ``shift_A`` along its O-H bond (+ = away from O)."""
    out = []
    for i, atoms in enumerate(frames):
        atoms = atoms.copy()
        if i >= first:
            towards_o = bond_vector(atoms, hydrogen)
            atoms.positions[hydrogen] -= shift_A * towards_o / np.linalg.norm(towards_o)
        out.append(atoms)
    return out


def isolated_molecule(atoms: Atoms) -> Atoms:
    """The first water molecule of a periodic frame, made whole and non-periodic."""
    oxygen = 0
    hydrogens = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s == "H"]
    to_h = atoms.get_distances(oxygen, hydrogens, mic=True, vector=True)
    nearest = np.argsort(np.linalg.norm(to_h, axis=1))[:2]
    origin = atoms.positions[oxygen]
    return Atoms("OH2", positions=[origin, origin + to_h[nearest[0]], origin + to_h[nearest[1]]], pbc=False)


def brute_force_extremes(atoms: Atoms) -> dict[str, tuple[float, float]]:
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    symbols = np.array(atoms.get_chemical_symbols())
    out = {}
    for a in sorted(set(symbols)):
        for b in sorted(set(symbols)):
            rows, cols = np.flatnonzero(symbols == a), np.flatnonzero(symbols == b)
            if b < a or (a == b and len(rows) < 2):
                continue
            block = distances[np.ix_(rows, cols)].copy()
            if a == b:
                np.fill_diagonal(block, np.inf)
            nearest = block.min(axis=1)
            out[f"{a}-{b}"] = (nearest.min(), nearest.max())
    return out


def test_training_ranges_of_water_hold_the_covalent_bond(ranges):
    assert set(ranges) == {"H-H", "H-O", "O-O"}
    low, high = ranges["H-O"]
    assert 0.9 < low < 1.0 and 1.05 < high < 1.2, ranges["H-O"]
    # intramolecular H-H about 1.5 Å; O-O the hydrogen-bond distance, about 2.5-2.8 Å
    assert 1.3 < ranges["H-H"][0] < ranges["H-H"][1] < 2.0
    assert 2.3 < ranges["O-O"][0] < ranges["O-O"][1] < 3.0


def test_nearest_neighbour_extremes_equal_brute_force_minimum_image(water):
    frame = water["validate"][0]
    sheared = frame.copy()
    cell = sheared.cell.array.copy()
    cell[2] += 10 * cell[0] + 7 * cell[1]  # same lattice, skewed cell (heights 0.7 and 1.0 Å): more image shells
    sheared.set_cell(cell, scale_atoms=False)
    slab = frame.copy()
    slab.pbc = [True, True, False]
    cases = [*water["validate"][:5], sheared, slab, isolated_molecule(frame)]
    for atoms in cases:
        got = nearest_neighbour_extremes([atoms])
        expected = brute_force_extremes(atoms)
        assert set(got) == set(expected)
        for name, extremes in expected.items():
            assert got[name].shape == (1, 2)
            np.testing.assert_allclose(got[name][0], extremes, atol=1e-9, err_msg=name)
    assert "O-O" not in nearest_neighbour_extremes([isolated_molecule(frame)])  # a lone O has no O neighbour


def test_intact_md_snapshots_are_stable(water, ranges):
    frames = water["validate"]
    steps = steps_of(frames)
    verdict = judge(frames, [300.0] * len(frames), steps, ranges, CRITERIA)
    assert isinstance(verdict, Verdict)
    assert verdict.stable and verdict.first_unstable_step is None and verdict.reason == ""
    assert verdict.distances["H-O"].shape == (len(frames), 2)
    metrics = verdict.metrics
    assert metrics["md_stable"] == 1.0 and metrics["stable_until_step"] == steps[-1]
    assert "first_unstable_step" not in metrics
    assert ranges["H-O"][0] - 0.1 < metrics["nn_min_H-O"] < metrics["nn_max_H-O"] < ranges["H-O"][1] + 0.1
    assert metrics["h_heavy_max"] < 1.3  # every H sits on an oxygen
    assert all(MLFLOW_METRIC_NAME.match(name) for name in metrics), metrics


def test_hydrogen_pushed_onto_its_oxygen_is_unstable_from_that_frame(water, ranges):
    frames = move_along_bond(water["validate"], hydrogen=1, shift_A=-1.0, first=FIRST_BAD)
    steps = steps_of(frames)
    verdict = judge(frames, [300.0] * len(frames), steps, ranges, CRITERIA)
    assert not verdict.stable
    assert verdict.first_unstable_step == steps[FIRST_BAD]
    assert "H-O" in verdict.reason and f"step {steps[FIRST_BAD]}" in verdict.reason
    assert verdict.distances["H-O"][FIRST_BAD, 0] < ranges["H-O"][0] - CRITERIA.max_departure_A
    metrics = verdict.metrics
    assert metrics["md_stable"] == 0.0
    assert metrics["first_unstable_step"] == metrics["stable_until_step"] == steps[FIRST_BAD]


def test_hydrogen_pulled_off_its_oxygen_is_unstable_from_that_frame(water, ranges):
    molecules = [isolated_molecule(atoms) for atoms in water["validate"]]
    assert judge(molecules, [300.0] * len(molecules), steps_of(molecules), ranges, CRITERIA).stable
    frames = move_along_bond(molecules, hydrogen=1, shift_A=1.0, first=FIRST_BAD)
    steps = steps_of(frames)
    verdict = judge(frames, [300.0] * len(frames), steps, ranges, CRITERIA)
    assert verdict.first_unstable_step == steps[FIRST_BAD]
    assert "H-O nearest-neighbour distance 1.9" in verdict.reason or "H-O nearest-neighbour distance 2.0" in verdict.reason, verdict.reason
    assert "hydrogen atom" not in verdict.reason  # 2 Å from O is within the 2.5 Å hydrogen rule


def test_hydrogen_far_from_everything_breaks_the_hydrogen_rule(water, ranges):
    molecules = [isolated_molecule(atoms) for atoms in water["validate"]]
    frames = move_along_bond(molecules, hydrogen=2, shift_A=3.0, first=FIRST_BAD)
    lost = frames[FIRST_BAD]
    assert np.delete(lost.get_distances(2, [0, 1, 2]), 2).min() > 3.0  # 3 Å and more from every other atom
    steps = steps_of(frames)
    verdict = judge(frames, [300.0] * len(frames), steps, ranges, CRITERIA)
    assert verdict.first_unstable_step == steps[FIRST_BAD]
    assert "hydrogen atom 2 is" in verdict.reason and "from the nearest heavy atom" in verdict.reason
    assert verdict.h_heavy_A[FIRST_BAD] > 3.9 and verdict.metrics["h_heavy_max"] > 3.9


def test_temperature_outside_bounds_is_unstable_and_first_bad_frame_decides(water, ranges):
    frames = water["validate"]
    steps = steps_of(frames)
    temperatures = [300.0] * len(frames)
    temperatures[FIRST_BAD] = 2500.0
    verdict = judge(frames, temperatures, steps, ranges, CRITERIA)
    assert verdict.first_unstable_step == steps[FIRST_BAD]
    assert verdict.reason.startswith("temperature 2500 K") and "0-2000 K" in verdict.reason
    cold = StabilityCriteria(max_departure_A=0.5, max_h_distance_A=2.5, min_temperature_K=250.0, max_temperature_K=2000.0)
    temperatures[3] = 100.0  # an earlier violation of another bound wins
    assert judge(frames, temperatures, steps, ranges, cold).first_unstable_step == steps[3]


def test_non_finite_positions_are_unstable(water, ranges):
    frames = [atoms.copy() for atoms in water["validate"]]
    frames[FIRST_BAD].positions[3] = np.nan  # what a blown-up integrator leaves behind
    steps = steps_of(frames)
    verdict = judge(frames, [300.0] * len(frames), steps, ranges, CRITERIA)
    assert verdict.first_unstable_step == steps[FIRST_BAD]
    assert verdict.reason == f"non-finite atomic positions at step {steps[FIRST_BAD]}"
    assert np.isnan(verdict.distances["O-O"][FIRST_BAD]).all() and np.isfinite(verdict.metrics["nn_min_O-O"])


def test_bad_arguments_are_refused(water, ranges):
    frames = water["validate"][:3]
    with pytest.raises(ValueError, match="same length"):
        judge(frames, [300.0] * 2, [0, 1, 2], ranges, CRITERIA)
    with pytest.raises(ValueError, match="min_temperature_K"):
        StabilityCriteria(max_departure_A=0.5, max_h_distance_A=2.5, min_temperature_K=500.0, max_temperature_K=400.0)
    with pytest.raises(ValueError, match="max_departure_A must be >= 0"):
        StabilityCriteria(max_departure_A=-0.1, max_h_distance_A=2.5, min_temperature_K=0.0, max_temperature_K=400.0)


def test_energy_drift_recovers_a_known_slope():
    # pure arithmetic: 2e-5 eV/fs over 12 atoms, with a step-to-step oscillation the fit must see through
    time_fs = np.arange(0.0, 1000.0, 0.5)
    kinetic = 0.5 + 0.05 * np.sin(time_fs / 7.0)
    total = -100.0 + 2.0e-5 * time_fs + 0.002 * np.cos(time_fs / 3.0)
    drift = energy_drift(time_fs, total, kinetic, n_atoms=12)
    assert drift["drift_meV_per_atom_per_ps"] == pytest.approx(2.0e-5 * 1.0e6 / 12, rel=0.02)
    expected_ratio = 2.0e-5 * (time_fs[-1] - time_fs[0]) / np.std(kinetic)
    assert drift["drift_over_kinetic_std"] == pytest.approx(expected_ratio, rel=0.02)
    flat = energy_drift(time_fs, np.full_like(time_fs, -100.0), kinetic, n_atoms=12)
    assert abs(flat["drift_meV_per_atom_per_ps"]) < 1e-9


def test_distance_bands_plot_is_written(water, ranges, tmp_path):
    frames = move_along_bond(water["validate"], hydrogen=1, shift_A=-1.0, first=FIRST_BAD)
    steps = steps_of(frames)
    verdict = judge(frames, [300.0] * len(frames), steps, ranges, CRITERIA)
    time_fs = 0.5 * np.asarray(steps, dtype=float)
    path = distance_bands_plot(
        tmp_path / "plots" / "stability.png",
        time_fs,
        verdict.distances,
        ranges,
        CRITERIA,
        "water, H 1 pushed 1.0 Å onto its O",
        first_unstable_time_fs=0.5 * verdict.first_unstable_step,
    )
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_emt_md_of_copper_is_stable_and_conserves_energy():
    reference = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    training = []
    for seed in range(5):
        frame = reference.copy()
        frame.rattle(0.1, seed=seed)
        training.append(frame)
    ranges = training_ranges(training)
    atoms = reference.copy()
    atoms.calc = EMT()
    thermalize_momenta(atoms, 300.0, exact_temperature=True, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    frames, temperatures, steps, time_fs, total, kinetic = [], [], [], [], [], []

    def observe() -> None:
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
        temperatures.append(atoms.get_temperature())
        steps.append(dynamics.nsteps)
        time_fs.append(dynamics.get_time() / units.fs)
        kinetic.append(atoms.get_kinetic_energy())
        total.append(atoms.get_potential_energy() + kinetic[-1])

    dynamics.attach(observe, interval=5)
    dynamics.run(200)
    verdict = judge(frames, temperatures, steps, ranges, CRITERIA)
    assert verdict.stable, verdict.reason
    assert set(verdict.distances) == {"Cu-Cu"} and "h_heavy_max" not in verdict.metrics
    assert verdict.metrics["stable_until_step"] == 200
    drift = energy_drift(time_fs, total, kinetic, len(atoms))
    assert drift["drift_over_kinetic_std"] < 1.0, drift  # velocity Verlet with EMT conserves energy


def test_bounds_widen_to_the_training_data_and_name_their_source(water):
    from hpo import stability

    train, validate = water["train"][:8], water["validate"][:4]  # the frames these tests were written on
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

    train, validate = water["train"][:8], water["validate"][:4]  # the frames these tests were written on
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
