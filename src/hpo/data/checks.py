"""Checks of atomistic data before any fit: keys, sanity, isolated atoms, duplicates, outliers, physics.

Everything here is a pure function of lists of ``ase.Atoms`` (plus labels naming where the frames came
from); reading files is ``hpo.data.read``, the command and ``optimize``'s pre-fit checks are
``hpo.data.check_command``, the table and plot ``hpo.data.report``. A data set is passed as ``splits``: a
dict from a label (a split name or a file name, used verbatim in messages) to its frames, in file order.
Units throughout: eV, Angstrom.

Each check returns a :class:`Check` with verdict ``pass``, ``warn`` or ``fail``;
:func:`exit_code` turns a list of them into a process exit code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import ase
import numpy as np
from ase.data import atomic_numbers, chemical_symbols, covalent_radii
from ase.neighborlist import neighbor_list

from hpo.data.read import Keys, bulk, energy_of, forces_of, is_isolated_atom, isolated_atom_e0, lookup, stored_in, tensor_of
from hpo.errors import DataCheckError

Verdict = Literal["pass", "warn", "fail"]
# In order of severity: the worst verdict of a list is the one with the highest index.
VERDICTS: tuple[Verdict, ...] = ("pass", "warn", "fail")

# Geometries equal after rounding positions and cell to this many decimals (Angstrom) are duplicates.
DUPLICATE_DECIMALS = 5
# At most this many offending entries are listed in a message (all of them go to details).
MESSAGE_ITEMS = 5


@dataclass(frozen=True)
class Check:
    """One check's outcome. ``details`` is JSON-friendly (for MLflow), ``message`` is for people."""

    name: str
    verdict: Verdict
    message: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ForceConsistency:
    """Thresholds of :func:`forces_consistent`, measured on the test data (see tests/unit/test_datacheck.py).

    Bond test (per split): correlation of bond stretch with the relative force
    along the bond. EMT splits (seeds 0-4) give -0.77 to -0.86; the same forces
    moved to frames of another run -0.16 to +0.05; the workshop water ``force``
    column -0.007 (gap_input_50.xyz) and +0.029 (gap_validate.xyz). -0.4 sits
    in the gap with margin on both sides. Energy-work test: relative rms
    difference between the energy change of consecutive MD frames and minus the
    work of the forces; EMT frames 3 fs apart give 0.0005 to 0.0015, moved
    forces 0.75 to 1.11.
    """

    # A pair is a bond when closer than bond_factor x the sum of covalent radii: the first
    # neighbour shell of metals and covalent bonds, not hydrogen bonds or second neighbours.
    bond_factor: float = 1.2
    # Fewer bonds than this: the correlation is too noisy to judge.
    min_bonds: int = 30
    # Correlation at or below this passes; above it the forces do not pull bonds back: warn.
    bond_correlation_max: float = -0.4
    # Consecutive frames: same atoms and cell, no atom moved more than max_step (Angstrom).
    # Trapezoid error grows as step^2 relative; 0.15 Angstrom keeps it at a few percent.
    max_step: float = 0.15
    # Fewer consecutive pairs than this: no energy-work verdict.
    min_pairs: int = 5
    # Relative rms difference of energy change and work: above warn -> warn, above fail -> fail.
    work_warn: float = 0.2
    work_fail: float = 0.5


# --------------------------------------------------------------------------- checks


def _worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, key=VERDICTS.index, default="pass")


def _listing(items: Sequence, limit: int = MESSAGE_ITEMS) -> str:
    shown = "; ".join(str(item) for item in items[:limit])
    return shown + (f"; ... {len(items) - limit} more" if len(items) > limit else "")


def keys_present(splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys) -> Check:
    """Every frame has every key of ``keys`` in the right shape -> pass, else fail naming file, frame and key.

    Isolated atoms only need the energy (they give e0; their forces and tensors
    are not fitted). No energy key at all also fails: nothing could be fitted.
    """
    problems = []
    if keys.energy is None:
        problems.append({"split": None, "frame": None, "key": "energy", "problem": "no energy key found"})
    for label, frames in splits.items():
        for index, atoms in enumerate(frames):
            wanted = {"energy": keys.energy}
            if not is_isolated_atom(atoms):
                wanted |= {"forces": keys.forces, "polarizability": keys.polarizability}
            for quantity, key in wanted.items():
                if key is None:
                    continue
                where = stored_in(atoms, key)
                if where is None:
                    problem = "missing"
                elif quantity == "energy" and np.asarray(lookup(atoms, key)).size != 1:
                    problem = f"not one number (shape {np.shape(lookup(atoms, key))})"
                elif quantity == "forces" and forces_of(atoms, key) is None:
                    problem = f"shape {np.shape(lookup(atoms, key))}, expected ({len(atoms)}, 3)"
                elif quantity == "polarizability" and tensor_of(atoms, key) is None:
                    problem = f"shape {np.shape(lookup(atoms, key))}, expected 9 numbers or 3x3"
                else:
                    continue
                problems.append({"split": label, "frame": index, "key": key, "problem": problem})
    if not problems:
        return Check("keys_present", "pass", f"every frame has {keys}", {"keys": asdict(keys)})
    text = [
        f"{p['split']} frame {p['frame']}: {p['key']} {p['problem']}" if p["split"] else p["problem"] for p in problems
    ]
    return Check(
        "keys_present",
        "fail",
        f"{len(problems)} missing or malformed: {_listing(text)}",
        {"keys": asdict(keys), "problems": problems},
    )


def finite(splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys) -> Check:
    """NaN or inf in positions, cell, energy, forces or polarizability -> fail naming file, frame, key and value.

    Missing or malformed values are left to :func:`keys_present`.
    """
    problems = []
    for label, frames in splits.items():
        for index, atoms in enumerate(frames):
            values = {"positions": atoms.positions, "cell": atoms.cell.array}
            if keys.energy is not None and stored_in(atoms, keys.energy) is not None:
                values[keys.energy] = energy_of(atoms, keys.energy)
            for key, reader in ((keys.forces, forces_of), (keys.polarizability, tensor_of)):
                value = reader(atoms, key)
                if value is not None:
                    values[key] = value
            for key, value in values.items():
                bad = ~np.isfinite(np.asarray(value, dtype=float))
                if bad.any():
                    first = np.asarray(value, dtype=float)[bad].flat[0]
                    problems.append(
                        {"split": label, "frame": index, "key": key, "value": repr(float(first)), "count": int(bad.sum())}
                    )
    if not problems:
        return Check("finite", "pass", "no NaN or inf")
    text = [f"{p['split']} frame {p['frame']}: {p['key']}={p['value']} ({p['count']} values)" for p in problems]
    return Check("finite", "fail", f"{len(problems)} non-finite: {_listing(text)}", {"problems": problems})


def _fingerprint(atoms: ase.Atoms) -> bytes:
    """Species, cell and positions wrapped into the cell, rounded: equal for the same geometry written twice."""
    cell = atoms.cell.array
    positions = atoms.positions
    if atoms.pbc.any() and abs(np.linalg.det(cell)) > 1e-9:
        scaled = np.linalg.solve(cell.T, positions.T).T
        # Round before wrapping: otherwise an atom at 1e-9 and its copy at -1e-9 land 0 and a cell length apart.
        scaled = np.where(atoms.pbc, np.round(scaled, DUPLICATE_DECIMALS + 2) % 1.0, scaled)
        positions = scaled @ cell
    # + 0.0 turns -0.0 into 0.0, which have different bytes.
    rounded = np.round(positions, DUPLICATE_DECIMALS) + 0.0
    return atoms.numbers.tobytes() + (np.round(cell, DUPLICATE_DECIMALS) + 0.0).tobytes() + rounded.tobytes()


def duplicates(splits: Mapping[str, Sequence[ase.Atoms]]) -> Check:
    """Identical geometries (same species, cell and positions to 1e-5 Angstrom, atoms in the same order).

    Within one split -> warn (double weight in the fit); across splits -> fail
    (validation would score training frames). Isolated atoms are left out: the
    same e0 frame in several files is customary.
    """
    seen: dict[bytes, list[tuple[str, int]]] = {}
    for label, index, atoms in bulk(splits):
        seen.setdefault(_fingerprint(atoms), []).append((label, index))
    within, across = [], []
    for places in seen.values():
        if len(places) < 2:
            continue
        by_split: dict[str, list[int]] = {}
        for label, index in places:
            by_split.setdefault(label, []).append(index)
        (across if len(by_split) > 1 else within).append(by_split)
    details = {"within": within, "across": across}
    if across:
        text = [", ".join(f"{label} frames {idx}" for label, idx in group.items()) for group in across]
        return Check("duplicates", "fail", f"{len(across)} geometries in more than one split: {_listing(text)}", details)
    if within:
        text = [", ".join(f"{label} frames {idx}" for label, idx in group.items()) for group in within]
        return Check("duplicates", "warn", f"{len(within)} geometries repeated within a split: {_listing(text)}", details)
    return Check("duplicates", "pass", "no repeated geometry", details)


def _composition_residuals(frames: Sequence[ase.Atoms], energies: np.ndarray) -> np.ndarray:
    """Energy per atom minus a least-squares energy per species: mixtures of several compositions
    otherwise flag their extreme compositions as outliers."""
    species = sorted({z for atoms in frames for z in atoms.numbers})
    counts = np.array([[np.count_nonzero(atoms.numbers == z) for z in species] for atoms in frames], dtype=float)
    per_species, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return (energies - counts @ per_species) / counts.sum(axis=1)


def _robust_scores(values: np.ndarray) -> np.ndarray:
    """(value - median) / (1.4826 MAD): a far outlier does not inflate its own yardstick as with the std."""
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    if spread == 0:
        spread = np.std(values)
    return (values - median) / spread if spread > 0 else np.zeros_like(values)


def energy_outliers(splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys, k: float = 6.0) -> Check:
    """Frames whose energy per atom (after a per-species reference) lies beyond k robust std -> warn.

    Isolated atoms and frames without a finite energy are left out.
    """
    rows = [(label, index, atoms, energy_of(atoms, keys.energy)) for label, index, atoms in bulk(splits)]
    rows = [row for row in rows if math.isfinite(row[3])]
    if len(rows) < 3:
        return Check("energy_outliers", "pass", f"{len(rows)} frames with energies: too few to judge")
    scores = _robust_scores(_composition_residuals([r[2] for r in rows], np.array([r[3] for r in rows])))
    flagged = [
        {"split": label, "frame": index, "energy": energy, "score": round(float(score), 2)}
        for (label, index, _, energy), score in zip(rows, scores)
        if abs(score) > k
    ]
    if not flagged:
        return Check("energy_outliers", "pass", f"all {len(rows)} energies per atom within {k} std", {"k": k})
    text = [f"{f['split']} frame {f['frame']} ({f['score']:+} std)" for f in flagged]
    return Check(
        "energy_outliers",
        "warn",
        f"{len(flagged)} energy(ies) per atom beyond {k} std: {_listing(text)}",
        {"k": k, "frames": flagged},
    )


def force_outliers(splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys, k: float = 6.0) -> Check:
    """Frames whose largest |F| exceeds mean + k std of all atoms' |F| -> warn (a broken SCF, a clash)."""
    rows = [(label, index, forces_of(atoms, keys.forces)) for label, index, atoms in bulk(splits)]
    rows = [
        (label, index, np.linalg.norm(f, axis=1)) for label, index, f in rows if f is not None and np.isfinite(f).all()
    ]
    if not rows:
        return Check("force_outliers", "pass", "no forces to judge")
    norms = np.concatenate([r[2] for r in rows])
    limit = float(norms.mean() + k * norms.std())
    flagged = [
        {"split": label, "frame": index, "max_force": round(float(n.max()), 4)}
        for label, index, n in rows
        if n.max() > limit
    ]
    details = {"k": k, "limit_eV_per_A": limit}
    if not flagged:
        return Check("force_outliers", "pass", f"all |F| below {limit:.3g} eV/A (mean + {k} std)", details)
    text = [f"{f['split']} frame {f['frame']} (max |F| {f['max_force']} eV/A)" for f in flagged]
    return Check(
        "force_outliers",
        "warn",
        f"{len(flagged)} frame(s) with |F| above {limit:.3g} eV/A (mean + {k} std): {_listing(text)}",
        details | {"frames": flagged},
    )


def bond_force_correlation(
    frames: Sequence[ase.Atoms], forces_key: str, bond_factor: float = 1.2
) -> tuple[float, int, dict[str, dict]]:
    """Correlation of bond stretch with the relative force along the bond, over all bonds of all frames.

    A bond is a pair closer than bond_factor x the sum of covalent radii. Stretch
    is the distance minus the mean of that pair type in that frame (so a
    compressed cell does not look stretched: pressure does not show in forces).
    The force is (F_j - F_i).u_ij with u_ij the unit vector from i to j: forces
    that are minus the gradient of an energy pull a stretched bond together,
    so the correlation is strongly negative. Returns (correlation, number of
    bonds, per pair type {"n", "correlation"}); NaN with fewer than 3 bonds.
    """
    stretches, projections = [], []
    per_type: dict[str, tuple[list, list]] = {}
    for atoms in frames:
        forces = forces_of(atoms, forces_key)
        if len(atoms) < 2 or forces is None or not np.isfinite(forces).all():
            continue
        radii = covalent_radii[atoms.numbers]
        i, j, d, vector = neighbor_list("ijdD", atoms, float(2 * radii.max() * bond_factor))
        keep = (i < j) & (d < bond_factor * (radii[i] + radii[j]))
        i, j, d, vector = i[keep], j[keep], d[keep], vector[keep]
        projection = np.einsum("ij,ij->i", forces[j] - forces[i], vector / d[:, None])
        pair = np.sort(np.stack([atoms.numbers[i], atoms.numbers[j]]), axis=0)
        for a, b in {tuple(p) for p in pair.T}:
            mask = (pair[0] == a) & (pair[1] == b)
            stretch = d[mask] - d[mask].mean()
            stretches.append(stretch)
            projections.append(projection[mask])
            name = f"{chemical_symbols[a]}-{chemical_symbols[b]}"
            per_type.setdefault(name, ([], []))
            per_type[name][0].append(stretch)
            per_type[name][1].append(projection[mask])

    def corr(x: list, y: list) -> tuple[float, int]:
        x, y = np.concatenate(x) if x else np.array([]), np.concatenate(y) if y else np.array([])
        if len(x) < 3 or x.std() == 0 or y.std() == 0:
            return math.nan, len(x)
        return float(np.corrcoef(x, y)[0, 1]), len(x)

    total, n = corr(stretches, projections)
    types = {name: dict(zip(("correlation", "n"), corr(*values))) for name, values in sorted(per_type.items())}
    return total, n, types


def _minimum_image_step(a: ase.Atoms, b: ase.Atoms) -> np.ndarray:
    step = b.positions - a.positions
    if a.pbc.any() and abs(np.linalg.det(a.cell.array)) > 1e-9:
        scaled = np.linalg.solve(a.cell.array.T, step.T).T
        scaled -= np.where(a.pbc, np.round(scaled), 0.0)
        step = scaled @ a.cell.array
    return step


def energy_work_pairs(
    frames: Sequence[ase.Atoms], keys: Keys, max_step: float = 0.15
) -> list[tuple[int, float, float]]:
    """(index of the first frame, E_b - E_a, -0.5 (F_a + F_b).(r_b - r_a)) for consecutive-looking frame pairs.

    Consecutive-looking: same species in the same order, same cell, finite
    energies and forces, and a minimum-image step of every atom below max_step
    Angstrom but not all zero (a repeated frame is a duplicate, not a step).
    For MD frames with forces that are minus the energy gradient the two numbers
    agree up to the trapezoid error.
    """
    pairs = []
    for index, (a, b) in enumerate(zip(frames, frames[1:])):
        if len(a) != len(b) or not np.array_equal(a.numbers, b.numbers) or is_isolated_atom(a):
            continue
        if not np.allclose(a.cell.array, b.cell.array, atol=1e-6) or not np.array_equal(a.pbc, b.pbc):
            continue
        energies = energy_of(a, keys.energy), energy_of(b, keys.energy)
        forces = forces_of(a, keys.forces), forces_of(b, keys.forces)
        if not all(map(math.isfinite, energies)) or any(f is None or not np.isfinite(f).all() for f in forces):
            continue
        step = _minimum_image_step(a, b)
        largest = np.linalg.norm(step, axis=1).max()
        if largest == 0 or largest > max_step:
            continue
        work = -0.5 * float(np.sum((forces[0] + forces[1]) * step))
        pairs.append((index, energies[1] - energies[0], work))
    return pairs


def forces_consistent(
    splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys, thresholds: ForceConsistency = ForceConsistency()
) -> Check:
    """Do the forces belong to the geometry and the energy? Two tests, the worse verdict wins.

    1. Bonds (each split): correlation of bond stretch and relative
       force along the bond (:func:`bond_force_correlation`) above
       ``bond_correlation_max`` -> warn: the forces do not pull bonds back, e.g.
       a force column from other frames or in another atom order.
    2. Energy work (each split in file order): for consecutive MD frames
       (:func:`energy_work_pairs`) the relative rms difference between energy
       change and minus the work of the forces above ``work_warn`` -> warn,
       above ``work_fail`` -> fail: energies and forces of the same frames
       contradict each other, direct evidence rather than a statistic.
    Either test without enough data gives no verdict (said in the message).
    """
    if keys.forces is None:
        return Check("forces_consistent", "pass", "no forces: nothing to check")
    verdicts: list[Verdict] = []
    parts = []
    # Per split: a force column broken in one file must not hide behind the good ones.
    bonds: dict[str, dict] = {}
    for label, frames in splits.items():
        bulk_frames = [atoms for atoms in frames if not is_isolated_atom(atoms)]
        correlation, n_bonds, per_type = bond_force_correlation(bulk_frames, keys.forces, thresholds.bond_factor)
        bonds[label] = {"correlation": correlation, "bonds": n_bonds, "per_pair_type": per_type}
    details: dict = {"bond_test": bonds}
    judged = {
        label: b for label, b in bonds.items() if b["bonds"] >= thresholds.min_bonds and math.isfinite(b["correlation"])
    }
    unjudged = sorted(set(bonds) - set(judged))
    if unjudged:
        parts.append(f"too few bonds in {', '.join(unjudged)} for the bond test")
    summary = ", ".join(f"{label} {b['correlation']:+.3f} ({b['bonds']} bonds)" for label, b in judged.items())
    broken = [label for label, b in judged.items() if b["correlation"] > thresholds.bond_correlation_max]
    if broken:
        verdicts.append("warn")
        parts.append(
            f"forces do not pull stretched bonds back in {', '.join(broken)}: correlation of bond stretch and "
            f"force along the bond {summary} (forces that are minus the energy gradient give "
            f"{thresholds.bond_correlation_max} or lower); "
            + (
                "a positive correlation means gradients stored as forces (wrong sign)"
                if any(bonds[label]["correlation"] > -thresholds.bond_correlation_max for label in broken)
                else f"check that {keys.forces!r} holds these frames' forces in their atom order"
            )
        )
    elif judged:
        verdicts.append("pass")
        parts.append(f"bond stretch vs force along the bond correlation {summary}")

    energy_change, work, where = [], [], []
    for label, frames in splits.items():
        for index, de, w in energy_work_pairs(frames, keys, thresholds.max_step):
            energy_change.append(de)
            work.append(w)
            where.append((label, index))
    details["md_pairs"] = len(work)
    if len(work) < thresholds.min_pairs:
        parts.append(f"{len(work)} consecutive MD frame pairs: no energy-work test")
    else:
        energy_change, work = np.array(energy_change), np.array(work)
        scale = float(np.sqrt(np.mean(energy_change**2)))
        error = float(np.sqrt(np.mean((energy_change - work) ** 2)) / scale) if scale > 0 else math.inf
        worst = int(np.argmax(np.abs(energy_change - work)))
        details |= {
            "work_relative_error": error,
            "work_correlation": float(np.corrcoef(energy_change, work)[0, 1]) if len(work) > 1 else math.nan,
            "worst_pair": {
                "split": where[worst][0],
                "frame": where[worst][1],
                "energy_change": float(energy_change[worst]),
                "minus_work": float(work[worst]),
            },
        }
        text = (
            f"energy change vs minus work of the forces over {len(work)} consecutive frame pairs: "
            f"relative rms difference {error:.3f}"
        )
        if error > thresholds.work_fail:
            verdicts.append("fail")
            parts.append(
                f"{text} (above {thresholds.work_fail}): energies and forces contradict each other "
                f"(forces of other frames, of another sign or in other units than the energy), "
                f"worst {where[worst][0]} frames {where[worst][1]}-{where[worst][1] + 1}"
            )
        elif error > thresholds.work_warn:
            verdicts.append("warn")
            parts.append(f"{text} (above {thresholds.work_warn})")
        else:
            verdicts.append("pass")
            parts.append(text)
    return Check("forces_consistent", _worst(verdicts), "; ".join(parts), details)


def isolated_atoms(splits: Mapping[str, Sequence[ase.Atoms]], keys: Keys) -> Check:
    """e0 per species from isolated-atom frames (all splits): conflicting ones fail, none is a note."""
    try:
        e0, conflict = isolated_atom_e0(splits, keys)
    except DataCheckError as error:
        return Check("isolated_atoms", "fail", str(error))
    if conflict is not None:
        return Check(
            "isolated_atoms",
            "fail",
            f"isolated {conflict.symbol} atoms disagree between splits: {conflict.first!r}, then {conflict.second!r} in {conflict.label}",
        )
    species = sorted({s for _, _, atoms in bulk(splits) for s in atoms.get_chemical_symbols()}, key=atomic_numbers.get)
    missing = [s for s in species if s not in e0]
    message = ", ".join(f"{s} {e:.6g} eV" for s, e in e0.items()) or "none"
    if missing:
        message = f"e0 from isolated atoms: {message}; none for {', '.join(missing)} (e0 must come from the config)"
    else:
        message = f"e0 from isolated atoms: {message}"
    return Check("isolated_atoms", "pass", message, {"e0": e0, "missing": missing})


# The checks that judge the force column alone: they cannot spoil a fit that does not use forces.
FORCE_CHECKS = ("force_outliers", "forces_consistent")


def run_checks(
    splits: Mapping[str, Sequence[ase.Atoms]],
    keys: Keys,
    energy_k: float = 6.0,
    force_k: float = 6.0,
    thresholds: ForceConsistency = ForceConsistency(),
) -> list[Check]:
    """All checks in order: keys_present, finite, isolated_atoms, duplicates, energy_outliers,
    force_outliers, forces_consistent. Frames with missing or non-finite values are
    skipped by the numeric checks (the first two report them), so every check runs."""
    return [
        keys_present(splits, keys),
        finite(splits, keys),
        isolated_atoms(splits, keys),
        duplicates(splits),
        energy_outliers(splits, keys, energy_k),
        force_outliers(splits, keys, force_k),
        forces_consistent(splits, keys, thresholds),
    ]


def exit_code(checks: Iterable[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not stop a run)."""
    return int(any(check.verdict == "fail" for check in checks))
