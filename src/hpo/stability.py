"""MD stability as an observable: did the trajectory stay where the training data was?

A force field can have a low validation error and still fall apart in MD
(Fu et al. 2023, "Forces are not enough: benchmark and critical evaluation for
machine learning force fields with molecular simulations", TMLR,
arXiv:2210.07237). This module turns a trajectory into a verdict and metrics:

- nearest-neighbour distances per species pair, per frame (smallest and
  largest over the atoms), compared with the range seen in the training data;
- a hydrogen rule: a hydrogen far from every heavy atom has dissociated;
- temperature bounds;
- the energy drift of an NVE run, per atom per ps and relative to the kinetic
  energy fluctuations.

Every threshold is passed in by the caller (from the YAML config). Suggested
values, with their sources::

    max_departure_A: 0.5     # Fu et al. 2023: a simulation is unstable once a bond
                             # length deviates from its reference by more than 0.5 Å
    max_h_distance_A: 2.5    # MLIPAudit stability benchmark (InstaDeep, 2025): an H
                             # farther than 2.5 Å from its bonded atom has detached;
                             # covalent X-H < 1.2 Å, hydrogen bond H...O 1.6-2.2 Å
    min_temperature_K: 0.0   # a run is judged on physics, not on thermostat quality
    max_temperature_K: 2000.0  # same bound as md.max_temperature_K (blow-up guard)

Units: Å, fs, eV, K, as in ASE.

Limit of the nearest-neighbour rule in dense phases: a hydrogen pulled 1 Å
outward along its O-H bond in the 12-atom water cells lands 0.55-0.8 Å from
the neighbouring oxygen it was hydrogen-bonded to, so its nearest O is that one
and the H-O minimum stays within 0.5 Å of the training range. The rule sees
atoms pushed together or pulled away from everything, not a proton hopping
to a neighbour; a hydrogen count per oxygen would.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import ase
import numpy as np
from ase.geometry import complete_cell, wrap_positions
from scipy.spatial import cKDTree

HYDROGEN = "H"


@lru_cache(maxsize=None)
def _shift_grid(shells: tuple[int, int, int]) -> np.ndarray:
    """Integer cell shifts (-k..k along each axis), shape (n_shifts, 3)."""
    return np.array(list(itertools.product(*(range(-k, k + 1) for k in shells))), dtype=float)


def pair_name(a: str, b: str) -> str:
    """Canonical name of a species pair: the two symbols sorted, e.g. ``pair_name("O", "H") == "H-O"``."""
    first, second = sorted((a, b))
    return f"{first}-{second}"


class _FrameGeometry:
    """Nearest-neighbour queries in one frame, periodic or not, with exact minimum image.

    Periodic images come from a k-d tree over the wrapped positions of the
    target atoms plus their images in the neighbouring cells. Images in the 26
    neighbouring cells reach every point within the smallest cell height of an
    atom in the home cell, so a nearest distance found below that height is
    exact; a larger one (a skewed cell or an isolated atom) is re-queried with
    as many image shells as that distance needs.
    """

    def __init__(self, atoms: ase.Atoms) -> None:
        # a blown-up integrator leaves NaN/inf positions: no distance is defined then
        self.finite = bool(np.isfinite(atoms.positions).all())
        self.pbc = np.asarray(atoms.pbc, dtype=bool)
        self.symbols = np.asarray(atoms.get_chemical_symbols())
        if self.finite and self.pbc.any():
            cell = complete_cell(atoms.cell.array)
            self.cell = cell
            self.positions = wrap_positions(atoms.positions, cell, pbc=self.pbc)
            # height of the cell along axis i = 1 / |reciprocal vector i|
            self.heights = 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)
        else:
            self.cell = np.zeros((3, 3))
            self.positions = np.asarray(atoms.positions, dtype=float)
            self.heights = np.full(3, np.inf)
        self._members = {name: np.flatnonzero(self.symbols == name) for name in np.unique(self.symbols).tolist()}
        self._trees: dict[tuple[tuple[str, ...], tuple[int, int, int]], cKDTree] = {}

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(members) for name, members in self._members.items()}

    def indices(self, species: Sequence[str]) -> np.ndarray:
        return np.sort(np.concatenate([self._members.get(name, np.empty(0, dtype=int)) for name in species]))

    def _tree(self, species: tuple[str, ...], shells: tuple[int, int, int]) -> cKDTree:
        key = (species, shells)
        if key not in self._trees:
            points = self.positions[self.indices(species)]
            shifts = _shift_grid(shells) @ self.cell
            images = (points[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
            self._trees[key] = cKDTree(images)
        return self._trees[key]

    def nearest(self, source: Sequence[str], target: Sequence[str]) -> np.ndarray:
        """For each atom of the ``source`` species, the distance to the nearest other atom of ``target`` species."""
        target_key = tuple(sorted(target))
        queries = self.positions[self.indices(source)]
        # the same atom sits at distance 0 in its own tree: ask for one more neighbour and drop it
        overlap = bool(set(source) & set(target))
        k = 2 if overlap else 1
        shells = tuple(1 if p else 0 for p in self.pbc)
        while True:
            found, _ = self._tree(target_key, shells).query(queries, k=k)
            nearest = found[:, -1] if overlap else found
            farthest = float(nearest.max())
            needed = tuple(int(math.ceil(farthest / h)) if p else 0 for h, p in zip(self.heights, self.pbc))
            if all(n <= s for n, s in zip(needed, shells)):
                return nearest
            shells = tuple(max(n, s) for n, s in zip(needed, shells))


def _pairs(count: Mapping[str, int]) -> list[tuple[str, str]]:
    """Species pairs (A, B) with A <= B by name that have a defined nearest neighbour."""
    species = sorted(count)
    pairs = []
    for i, a in enumerate(species):
        for b in species[i:]:
            if a == b and count[a] < 2:
                continue  # a lone atom's only "neighbour" would be its own periodic image
            pairs.append((a, b))
    return pairs


def _frame_extremes(geometry: _FrameGeometry) -> dict[str, tuple[float, float]]:
    if not geometry.finite:
        return {name: (math.nan, math.nan) for name in (pair_name(a, b) for a, b in _pairs(geometry.counts))}
    out = {}
    for a, b in _pairs(geometry.counts):
        nearest = geometry.nearest([a], [b])
        out[pair_name(a, b)] = (float(nearest.min()), float(nearest.max()))
    return out


def _hydrogen_to_heavy(geometry: _FrameGeometry) -> tuple[float, int]:
    """Largest distance of a hydrogen to its nearest heavy atom, and that hydrogen's index; (nan, -1) if undefined."""
    hydrogens = geometry.indices([HYDROGEN])
    heavy = sorted(set(geometry.counts) - {HYDROGEN})
    if len(hydrogens) == 0 or not heavy or not geometry.finite:
        return math.nan, -1
    nearest = geometry.nearest([HYDROGEN], heavy)
    worst = int(np.argmax(nearest))
    return float(nearest[worst]), int(hydrogens[worst])


def _collect(per_frame: list[dict[str, tuple[float, float]]]) -> dict[str, np.ndarray]:
    names = sorted({name for extremes in per_frame for name in extremes})
    return {
        name: np.array([extremes.get(name, (math.nan, math.nan)) for extremes in per_frame], dtype=float).reshape(-1, 2)
        for name in names
    }


def nearest_neighbour_extremes(frames: Sequence[ase.Atoms]) -> dict[str, np.ndarray]:
    """Per species pair "A-B" (A <= B by name) and per frame, the smallest and largest nearest-neighbour distance.

    For each atom of A, the distance (Å, minimum image along periodic axes) to
    the nearest atom of B, excluding itself when A == B; then the minimum and
    maximum over the atoms of A. The direction matters for the maximum: for
    "H-O" it is each hydrogen's nearest oxygen (its covalent bond in water).

    Returns ``{"A-B": array of shape (n_frames, 2)}`` with columns (min, max).
    A pair is skipped in a frame where B is absent or A == B has one atom; its
    row is NaN there (a key appears when any frame has the pair). Rows are NaN
    too in a frame with non-finite positions.
    """
    return _collect([_frame_extremes(_FrameGeometry(atoms)) for atoms in frames])


def training_ranges(frames: Sequence[ase.Atoms]) -> dict[str, tuple[float, float]]:
    """Per species pair, (smallest per-frame min, largest per-frame max) nearest-neighbour distance over ``frames`` (Å)."""
    return {
        name: (float(np.nanmin(extremes[:, 0])), float(np.nanmax(extremes[:, 1])))
        for name, extremes in nearest_neighbour_extremes(frames).items()
    }


@dataclass(frozen=True)
class StabilityCriteria:
    """Bounds of a stable trajectory; the values come from the config (suggestions in the module docstring).

    max_departure_A: a nearest-neighbour distance leaving its training range by
        more than this (Å) is unstable.
    max_h_distance_A: a hydrogen farther than this (Å) from every heavy
        (non-H) atom is unstable.
    min_temperature_K, max_temperature_K: instantaneous temperature outside
        [min, max] (K) is unstable.
    """

    max_departure_A: float
    max_h_distance_A: float
    min_temperature_K: float
    max_temperature_K: float
    # The model's own uncertainty: a frame whose std passes the threshold the caller gives is
    # extrapolating; more than this fraction of the frames is unstable. None: not judged.
    max_extrapolating_fraction: float | None = None
    # Fu et al.'s RDF criterion: the integral of |g_MD(r) - g_train(r)| dr (Å) over a window of this many
    # frames, per species pair, above rdf_max_mae is unstable. None: not judged.
    rdf_max_mae: float | None = None
    rdf_window_frames: int = 1
    rdf_bin_A: float = 0.05
    rdf_min_range_A: float = 0.0

    def __post_init__(self) -> None:
        if not self.max_departure_A >= 0 or not self.max_h_distance_A > 0:
            raise ValueError(f"max_departure_A must be >= 0 and max_h_distance_A positive: {self}")
        if not self.min_temperature_K <= self.max_temperature_K:
            raise ValueError(f"min_temperature_K must not exceed max_temperature_K: {self}")


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare by identity
class Verdict:
    """Outcome of :func:`judge`.

    stable: no frame broke a rule.
    first_unstable_step: MD step of the first frame that broke a rule (None when stable).
    reason: every rule that frame broke, as sentences; "" when stable.
    distances: the per-frame nearest-neighbour extremes (see :func:`nearest_neighbour_extremes`).
    h_heavy_A: per frame, the largest distance of a hydrogen to its nearest heavy atom (NaN if undefined).
    last_step: MD step of the last frame judged.
    """

    stable: bool
    first_unstable_step: int | None
    reason: str
    distances: dict[str, np.ndarray]
    h_heavy_A: np.ndarray
    last_step: int
    bounds: dict[str, str] = field(default_factory=dict)  # each bound with its value and where it came from
    extrapolating: np.ndarray | None = None  # per frame: the model's std above its threshold
    rdf_mae: dict[str, np.ndarray] = field(default_factory=dict)  # per pair, per frame (NaN before a full window)

    @property
    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow.

        ``md_stable`` (1/0); ``stable_until_step`` (the first unstable step, or
        the last step when stable: the "stability" of Fu et al.);
        ``first_unstable_step`` only when unstable (MLflow has no None);
        ``nn_min_A-B`` / ``nn_max_A-B`` over all frames (Å); ``h_heavy_max``
        (Å) when the system has hydrogen and heavy atoms.
        """
        out: dict[str, float] = {
            "md_stable": 1.0 if self.stable else 0.0,
            "stable_until_step": float(self.last_step if self.stable else self.first_unstable_step),
        }
        if self.first_unstable_step is not None:
            out["first_unstable_step"] = float(self.first_unstable_step)
        for name, extremes in self.distances.items():
            if np.isfinite(extremes).any():
                out[f"nn_min_{name}"] = float(np.nanmin(extremes[:, 0]))
                out[f"nn_max_{name}"] = float(np.nanmax(extremes[:, 1]))
        if np.isfinite(self.h_heavy_A).any():
            out["h_heavy_max"] = float(np.nanmax(self.h_heavy_A))
        if self.extrapolating is not None:
            out["extrapolating_fraction"] = float(np.mean(self.extrapolating))
        for name, mae in self.rdf_mae.items():
            if np.isfinite(mae).any():
                out[f"rdf_mae_max_{name}"] = float(np.nanmax(mae))
        return out


def judge(
    frames: Sequence[ase.Atoms],
    temperatures_K: Sequence[float],
    steps: Sequence[int],
    ranges: Mapping[str, tuple[float, float]],
    criteria: StabilityCriteria,
    *,
    bounds: Mapping[str, str] | None = None,
    uncertainty: Sequence[float] | None = None,
    uncertainty_threshold: float | None = None,
    uncertainty_source: str = "",
    reference_rdf: RDF | None = None,
) -> Verdict:
    """Judge a trajectory frame by frame; the first frame that breaks a rule decides step and reason.

    ``temperatures_K[i]`` and ``steps[i]`` belong to ``frames[i]`` (the MD step
    number, not the frame index). ``ranges`` come from :func:`training_ranges`
    on the training data. Rules, per frame:

    - nearest-neighbour: a pair's min below ``low - max_departure_A`` or its
      max above ``high + max_departure_A``. A pair absent from ``ranges`` has
      no reference and is not judged.
    - hydrogen: a hydrogen farther than ``max_h_distance_A`` from every heavy atom.
    - temperature: outside [``min_temperature_K``, ``max_temperature_K``]
      (a NaN temperature is outside).
    - a frame with non-finite positions is unstable.
    - uncertainty (``uncertainty``: the model's std per frame, with ``criteria.max_extrapolating_fraction``):
      a frame above ``uncertainty_threshold`` is extrapolating; the frame at which more than that fraction of
      all the frames have been is unstable.
    - RDF (``reference_rdf``: :func:`rdf` of the training frames, with ``criteria.rdf_max_mae``): the last
      frame of the first window of ``rdf_window_frames`` frames whose RDF departs from the reference by more
      than ``rdf_max_mae`` (integral of |g - g_ref| over r, per pair) is unstable.

    ``bounds`` (:func:`bounds_from_training`) say where each bound came from; the verdict keeps them.
    """
    if not len(frames) == len(temperatures_K) == len(steps):
        raise ValueError(
            f"frames ({len(frames)}), temperatures_K ({len(temperatures_K)}) and steps ({len(steps)}) must have the same length"
        )
    if len(frames) == 0:
        raise ValueError("no frames to judge")
    per_frame, h_heavy, h_index, finite = [], [], [], []
    for atoms in frames:
        geometry = _FrameGeometry(atoms)
        finite.append(geometry.finite)
        per_frame.append(_frame_extremes(geometry))
        distance, index = _hydrogen_to_heavy(geometry)
        h_heavy.append(distance)
        h_index.append(index)
    distances = _collect(per_frame)
    h_heavy_A = np.asarray(h_heavy, dtype=float)
    departure = criteria.max_departure_A
    bounds = dict(bounds or {})
    extrapolating, allowed = None, None
    if uncertainty is not None and uncertainty_threshold is not None:  # recorded always, judged with a fraction
        extrapolating = np.asarray(uncertainty, dtype=float) > uncertainty_threshold
        judged = criteria.max_extrapolating_fraction is not None
        allowed = int(math.floor(criteria.max_extrapolating_fraction * len(frames))) if judged else len(frames)
        bounds.setdefault("uncertainty", f"{uncertainty_threshold:.4g} ({uncertainty_source}); " + (
            f"at most {criteria.max_extrapolating_fraction:g} of the frames beyond" if judged else "not judged (max_extrapolating_fraction null)"))
    rdf_mae: dict[str, np.ndarray] = {}
    if reference_rdf is not None and criteria.rdf_max_mae is not None:
        rdf_mae = windowed_rdf_mae(frames, reference_rdf, min(criteria.rdf_window_frames, len(frames)))
        bounds.setdefault("rdf", f"{criteria.rdf_max_mae:g} Å (integral of |g_MD - g_train| dr over 0-{reference_rdf.r_max:.2f} Å, "
                                 f"windows of {criteria.rdf_window_frames} frames; Fu et al. 2023)")
    seen = 0

    for i, step in enumerate(int(s) for s in steps):
        broken = [] if finite[i] else [f"non-finite atomic positions at step {step}"]
        for name, extremes in distances.items():
            if name not in ranges:
                continue
            low, high = ranges[name]
            smallest, largest = extremes[i]
            # NaN (pair absent in this frame) compares False: not judged
            for value, outside in ((smallest, smallest < low - departure), (largest, largest > high + departure)):
                if outside:
                    broken.append(
                        f"{name} nearest-neighbour distance {value:.2f} Å at step {step}, "
                        f"training range {low:.2f}-{high:.2f} Å (allowed departure {departure:g} Å)"
                    )
        if h_heavy_A[i] > criteria.max_h_distance_A:
            broken.append(
                f"hydrogen atom {h_index[i]} is {h_heavy_A[i]:.2f} Å from the nearest heavy atom at step {step} "
                f"(bound {criteria.max_h_distance_A:g} Å)"
            )
        temperature = float(temperatures_K[i])
        if not criteria.min_temperature_K <= temperature <= criteria.max_temperature_K:
            broken.append(
                f"temperature {temperature:.0f} K at step {step}, outside "
                f"{criteria.min_temperature_K:g}-{criteria.max_temperature_K:g} K"
            )
        if extrapolating is not None and extrapolating[i]:
            seen += 1
            if seen > allowed:
                broken.append(
                    f"{seen} of {len(frames)} frames extrapolating by step {step} (model std {uncertainty[i]:.3g} above "
                    f"{uncertainty_threshold:.3g}, {uncertainty_source}; allowed fraction {criteria.max_extrapolating_fraction:g})"
                )
        for name, mae in rdf_mae.items():
            if mae[i] > criteria.rdf_max_mae:
                broken.append(
                    f"{name} RDF departs from the training RDF by {mae[i]:.3g} Å at step {step} "
                    f"(integral of |g - g_train| dr over {criteria.rdf_window_frames} frames; bound {criteria.rdf_max_mae:g} Å)"
                )
        if broken:
            return Verdict(False, step, "; ".join(broken), distances, h_heavy_A, int(steps[-1]), bounds, extrapolating, rdf_mae)
    return Verdict(True, None, "", distances, h_heavy_A, int(steps[-1]), bounds, extrapolating, rdf_mae)


# --------------------------------------------------------------------------- bounds from the training data


def bounds_from_training(criteria: StabilityCriteria, training: Sequence[ase.Atoms], name: str) -> tuple[StabilityCriteria, dict[str, str]]:
    """``criteria`` widened where the training frames (file ``name``) show a wider range than the literature
    default, and each bound's source: a hydrogen farther from every heavy atom than ``max_h_distance_A`` in
    training moves that bound to its largest training distance plus ``max_departure_A`` (the allowance of the
    distance bands); training frames with momenta hotter than ``max_temperature_K`` move it to their hottest
    (colder than ``min_temperature_K``: to their coldest). Distance bands are always the training ranges."""
    sources = {"distance_bands": f"training ranges of {name} ± {criteria.max_departure_A:g} Å (allowance: Fu et al. 2023)"}
    h_far = [d for d in (_hydrogen_to_heavy(_FrameGeometry(a))[0] for a in training) if np.isfinite(d)]
    widened = {}
    if h_far and max(h_far) > criteria.max_h_distance_A:
        widened["max_h_distance_A"] = max(h_far) + criteria.max_departure_A
        sources["max_h_distance_A"] = (f"{widened['max_h_distance_A']:.2f} Å: training data ({name}: a hydrogen {max(h_far):.2f} Å from "
                                       f"every heavy atom, + {criteria.max_departure_A:g} Å)")
    else:
        sources["max_h_distance_A"] = f"{criteria.max_h_distance_A:g} Å: literature default (MLIPAudit 2025)" + (
            f"; training data reach {max(h_far):.2f} Å" if h_far else "")
    temperatures = [a.get_temperature() for a in training if "momenta" in a.arrays and len(a) > 0]
    high, low = criteria.max_temperature_K, criteria.min_temperature_K
    if temperatures and max(temperatures) > high:
        widened["max_temperature_K"] = float(max(temperatures))
    if temperatures and min(temperatures) < low:
        widened["min_temperature_K"] = float(min(temperatures))
    for key, default in (("min_temperature_K", low), ("max_temperature_K", high)):
        if key in widened:
            sources[key] = f"{widened[key]:.0f} K: training data ({name}: instantaneous temperature of its momenta)"
        else:
            sources[key] = f"{default:g} K: configured default (md.stability.{key})" + (
                f"; training frames {min(temperatures):.0f}-{max(temperatures):.0f} K" if temperatures else "; training frames carry no momenta")
    return replace(criteria, **widened), sources


# --------------------------------------------------------------------------- radial distribution functions


@dataclass(frozen=True, eq=False)
class RDF:
    """Partial radial distribution functions g_AB(r) of some frames, per species pair, on common bins."""

    r_max: float
    bin_A: float
    pairs: dict[str, np.ndarray]  # "A-B" -> g (n_bins,)

    @property
    def r(self) -> np.ndarray:
        return (np.arange(int(round(self.r_max / self.bin_A))) + 0.5) * self.bin_A


def usable_range(frames: Sequence[ase.Atoms]) -> float:
    """Half the smallest cell height over ``frames`` (Å): beyond it a periodic cell's pairs are its own images.
    0 when a frame is not periodic along every axis (no density, no RDF)."""
    heights = []
    for atoms in frames:
        if not np.all(atoms.pbc):
            return 0.0
        heights.append(float(np.min(1.0 / np.linalg.norm(np.linalg.inv(complete_cell(atoms.cell.array)).T, axis=1))))
    return 0.5 * min(heights) if heights else 0.0


def composition(atoms: ase.Atoms) -> str:
    """The reduced formula of ``atoms`` (``Al2Cu2`` and ``AlCu`` are both ``AlCu``): frames of one composition
    share partial RDFs; pooling several would compare a frame with an average of other systems."""
    return atoms.get_chemical_formula(mode="metal", empirical=True)


def of_composition(frames: Sequence[ase.Atoms], atoms: ase.Atoms) -> list[ase.Atoms]:
    """The frames of ``frames`` with the composition of ``atoms``."""
    wanted = composition(atoms)
    return [frame for frame in frames if composition(frame) == wanted]


def _pair_histograms(atoms: ase.Atoms, r_max: float, bin_A: float) -> dict[str, tuple[np.ndarray, float]]:
    """Per pair of one frame: the histogram of its distances and its ideal-gas normalisation factor
    (N_A N_B / V, N_A (N_A - 1) / V for A = B), both to be summed over frames."""
    from ase.neighborlist import neighbor_list

    n_bins = int(round(r_max / bin_A))
    i, j, d = neighbor_list("ijd", atoms, r_max)
    symbols = np.asarray(atoms.get_chemical_symbols())
    counts = {name: int(np.sum(symbols == name)) for name in np.unique(symbols)}
    volume = atoms.get_volume()
    out = {}
    for a, b in _pairs(counts):
        mine = (symbols[i] == a) & (symbols[j] == b)
        hist = np.histogram(d[mine], bins=n_bins, range=(0.0, n_bins * bin_A))[0].astype(float)
        norm = counts[a] * (counts[b] - (a == b)) / volume
        out[pair_name(a, b)] = (hist, norm)
    return out


def _shells(n_bins: int, bin_A: float) -> np.ndarray:
    edges = np.arange(n_bins + 1) * bin_A
    return 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)


def rdf(frames: Sequence[ase.Atoms], r_max: float, bin_A: float) -> RDF:
    """Average partial RDFs of ``frames`` up to ``r_max`` (Å)."""
    n_bins = int(round(r_max / bin_A))
    sums: dict[str, list] = {}
    for atoms in frames:
        for name, (hist, norm) in _pair_histograms(atoms, r_max, bin_A).items():
            total = sums.setdefault(name, [np.zeros(n_bins), 0.0])
            total[0] += hist
            total[1] += norm
    shells = _shells(n_bins, bin_A)
    return RDF(n_bins * bin_A, bin_A, {name: hist / (norm * shells) if norm > 0 else np.zeros(n_bins) for name, (hist, norm) in sums.items()})


def windowed_rdf_mae(frames: Sequence[ase.Atoms], reference: RDF, window: int) -> dict[str, np.ndarray]:
    """Per pair of ``reference``, per frame: the integral of |g - g_ref| dr (Å) of the window of ``window``
    frames ending there (NaN before the first full window, or for a frame whose positions are not finite)."""
    n_bins = len(reference.r)
    hists = {name: np.zeros((len(frames), n_bins)) for name in reference.pairs}
    norms = {name: np.zeros(len(frames)) for name in reference.pairs}
    for k, atoms in enumerate(frames):
        if not np.isfinite(atoms.positions).all():
            continue
        for name, (hist, norm) in _pair_histograms(atoms, reference.r_max, reference.bin_A).items():
            if name in hists:
                hists[name][k], norms[name][k] = hist, norm
    shells = _shells(n_bins, reference.bin_A)
    out = {}
    for name, g_ref in reference.pairs.items():
        mae = np.full(len(frames), np.nan)
        h, n = np.cumsum(hists[name], axis=0), np.cumsum(norms[name])
        for k in range(window - 1, len(frames)):
            hist = h[k] - (h[k - window] if k >= window else 0.0)
            norm = n[k] - (n[k - window] if k >= window else 0.0)
            if norm > 0:
                mae[k] = float(np.sum(np.abs(hist / (norm * shells) - g_ref)) * reference.bin_A)
        out[name] = mae
    return out


def energy_drift(
    time_fs: Sequence[float],
    total_energy_eV: Sequence[float],
    kinetic_energy_eV: Sequence[float],
    n_atoms: int,
) -> dict[str, float]:
    """Drift of the total energy of an NVE run.

    ``drift_meV_per_atom_per_ps``: slope of a least-squares line through total
    energy against time, in meV per atom per ps (the unit the field reports
    NVE drift in; a fit rather than end minus start, because E_tot oscillates
    step to step). ``drift_over_kinetic_std``: |slope x run length| (eV) over
    the standard deviation of the kinetic energy (eV); well below 1 the drift
    is lost in the thermal noise, above 1 it is not. Inf when the kinetic
    energy is constant and the drift is not zero.
    """
    time = np.asarray(time_fs, dtype=float)
    total = np.asarray(total_energy_eV, dtype=float)
    kinetic = np.asarray(kinetic_energy_eV, dtype=float)
    if not len(time) == len(total) == len(kinetic) or len(time) < 2:
        raise ValueError("time_fs, total_energy_eV and kinetic_energy_eV need the same length, at least 2")
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be positive, got {n_atoms}")
    slope_eV_per_fs = float(np.polyfit(time, total, 1)[0])
    drift_eV = abs(slope_eV_per_fs * (time[-1] - time[0]))
    spread = float(np.std(kinetic))
    return {
        # eV/fs -> meV/ps: x 1000 (eV -> meV) x 1000 (per fs -> per ps)
        "drift_meV_per_atom_per_ps": slope_eV_per_fs * 1.0e6 / n_atoms,
        "drift_over_kinetic_std": drift_eV / spread if spread > 0 else (math.inf if drift_eV > 0 else 0.0),
    }


def distance_bands_plot(
    path: Path,
    time_fs: Sequence[float],
    distances: Mapping[str, np.ndarray],
    ranges: Mapping[str, tuple[float, float]],
    criteria: StabilityCriteria,
    title: str,
    *,
    first_unstable_time_fs: float | None = None,
) -> Path:
    """One panel per species pair: per-frame min..max nearest-neighbour distance against time.

    NN = nearest neighbour, as in :func:`nearest_neighbour_extremes`. The
    training range is shaded, the allowed departure drawn as dashed lines; a
    cross marks the first frame where a pair left the allowed band, and a red
    line the verdict's first unstable time (``first_unstable_time_fs``, any
    rule: the caller converts the step with its time step) when given.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    path = Path(path)
    time = np.asarray(time_fs, dtype=float)
    names = sorted(distances)
    if not names:
        raise ValueError("no species pairs to plot")
    fig, axes = plt.subplots(len(names), 1, figsize=(7.5, 1.9 * len(names) + 1.2), sharex=True, squeeze=False)
    departure = criteria.max_departure_A
    for ax, name in zip(axes[:, 0], names):
        extremes = np.asarray(distances[name], dtype=float)
        ax.fill_between(time, extremes[:, 0], extremes[:, 1], color="tab:blue", alpha=0.45, lw=0, label="MD: min..max over atoms")
        ax.plot(time, extremes, color="tab:blue", lw=0.8)
        if name in ranges:
            low, high = ranges[name]
            ax.axhspan(low, high, color="tab:green", alpha=0.2, label="training range")
            ax.axhline(low - departure, color="k", ls="--", lw=0.9, label=f"allowed departure (±{departure:g} Å)")
            ax.axhline(high + departure, color="k", ls="--", lw=0.9)
            # the range in the panel itself: the legend is shared by all panels
            ax.text(
                0.995, 0.04, f"training {low:.2f}-{high:.2f} Å", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
            )
            outside = (extremes[:, 0] < low - departure) | (extremes[:, 1] > high + departure)
            if outside.any():
                first = int(np.argmax(outside))
                value = extremes[first, 0] if extremes[first, 0] < low - departure else extremes[first, 1]
                ax.plot(time[first], value, "X", color="tab:orange", ms=9, mec="k", zorder=5, label="pair leaves allowed band")
        if first_unstable_time_fs is not None:
            ax.axvline(first_unstable_time_fs, color="tab:red", lw=1.2, label=f"first unstable frame ({first_unstable_time_fs:g} fs)")
        ax.set_ylabel(f"{name} NN distance (Å)", fontsize=8)
    axes[-1, 0].set_xlabel("time (fs)")
    handles = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(title, fontsize=9)
    fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
