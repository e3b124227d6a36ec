"""Lambda-SOAP features: featomic's spherical expansion, coupled by hpo.

The features are those of ``featomic.clebsch_gordan.EquivariantPowerSpectrum`` (a test checks
them to round-off): per atom, the Clebsch-Gordan coupling of two density expansion coefficients,

    P^lambda_mu(l1 s1 n1, l2 s2 n2) = sum_{m1 m2} C(l1 m1, l2 m2 | lambda mu) c^{s1}_{n1 l1 m1} c^{s2}_{n2 l2 m2},

for lambda = 0 (invariants) and 2 (the covariants of a symmetric tensor's L=2 part). featomic
computes the expansion c (fast, native code); the coupling is done here because the general
Python coupling in featomic costs about 6x more than these few batched matrix products (300
workshop frames: 3.7-4.3 s vs 0.65-0.71 s, ``benchmarks/bench_sagpr.py``), and because
a sparsified model needs only the columns it keeps (a few hundred of thousands): those are all
:func:`lambda_soap` computes when given ``columns``.

Per (l1, l2) pair, with K = species x n_max density channels:
Y = CG (I M x J) @ c_l2 (J x K) for all atoms at once, then P = c_l1^T (K x I) @ Y (I x M K)
per atom; the columns kept are then picked from the K x K channel pairs.

Column order and deduplication follow featomic's properties (:func:`unique_couplings`), so a
seeded farthest-point selection of columns picks the same columns as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import ase
import numpy as np

from hpo.models.sagpr.features import FeatureBlock, frame_ranges

__all__ = ["lambda_soap", "featomic_lambda_soap", "unique_couplings", "FEATURE_CHUNK_ATOMS"]

# Atoms featurised per featomic call: the full lambda = 2 features of 1000 atoms at n_max 8,
# l_max 6, 2 species take about 90 MB (smaller chunks stay in cache: 300 water frames 0.7 s); a
# large cell is never split.
FEATURE_CHUNK_ATOMS = 1000

LAMBDAS = (0, 2)


def lambda_soap(
    frames: Sequence[ase.Atoms],
    species: Sequence[int],
    rc: float,
    sigma: float,
    n_max: int,
    l_max: int,
    columns: tuple[np.ndarray, np.ndarray] | None = None,
) -> FeatureBlock:
    """Raw (unsparsified, unnormalised) lambda = 0 and 2 features of ``frames``.

    ``species`` fixes the neighbour channels, so the columns are the same for every frame even
    when a frame lacks a species. ``columns`` = (lambda = 0 columns, lambda = 2 columns) computes
    only those (indices into the full feature set, in that order). Frames are featurised
    FEATURE_CHUNK_ATOMS atoms at a time.
    """
    plan = _plan(
        float(rc), float(sigma), int(n_max), int(l_max), tuple(int(s) for s in species),
        None if columns is None else tuple(tuple(int(c) for c in cols) for cols in columns),
    )
    counts = [len(atoms) for atoms in frames]
    blocks = [_chunk(frames[start:stop], plan) for start, stop in frame_ranges(counts, FEATURE_CHUNK_ATOMS)]
    return FeatureBlock.concatenate(blocks)


def featomic_lambda_soap(
    frames: Sequence[ase.Atoms], species: Sequence[int], rc: float, sigma: float, n_max: int, l_max: int
) -> FeatureBlock:
    """The same features through featomic's own coupling (``EquivariantPowerSpectrum``), all frames at once.

    The reference :func:`lambda_soap` is checked against (tests) and timed against (benchmarks); several
    times slower and without column selection or chunking, so not used for fitting.
    """
    from featomic.clebsch_gordan import EquivariantPowerSpectrum
    from metatensor import Labels

    expansion = _expansion(float(rc), float(sigma), int(n_max), int(l_max))
    keys = Labels(["o3_lambda", "o3_sigma"], np.array([[lam, 1] for lam in LAMBDAS], dtype=np.int32))
    tensor = EquivariantPowerSpectrum(expansion, neighbor_types=list(species)).compute(
        list(frames), selected_keys=keys, neighbors_to_properties=True
    )
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = {}
    for lam in LAMBDAS:
        blocks = tensor.blocks(Labels(["o3_lambda"], np.array([[lam]], dtype=np.int32)))
        values = np.zeros((int(counts.sum()), 2 * lam + 1, len(blocks[0].properties)))
        for block in blocks:  # one block per centre species: scatter back to frame/atom order
            samples = block.samples.values
            values[offsets[samples[:, 0]] + samples[:, 1]] = block.values
        keep, weight = unique_couplings(blocks[0].properties.values)
        out[lam] = values[..., keep] * weight
    return FeatureBlock(x0=out[0][:, 0, :], x2=out[2], counts=counts)


def unique_couplings(properties: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns to keep, and their weights, so that dot products stay exact.

    A coupled feature (l1 s1 n1, l2 s2 n2) equals its swap (l2 s2 n2, l1 s1 n1) for even lambda.
    The original code kept both; featomic keeps l1 <= l2 only, but both orders within l1 == l2.
    Keeping one column per swap pair, times sqrt(2) when the pair has two members, leaves every
    dot product unchanged and saves 26% of the lambda = 2 and 47% of the lambda = 0 columns (at
    n_max 8, l_max 6, 2 species). ``properties`` rows are (l_1, l_2, neighbor_1_type, n_1,
    neighbor_2_type, n_2).
    """
    l1, l2 = properties[:, 0], properties[:, 1]
    first = properties[:, 2] * 10**6 + properties[:, 3]  # (species, n) in lexicographic order
    second = properties[:, 4] * 10**6 + properties[:, 5]
    keep = (l1 < l2) | (first <= second)
    paired = (l1 < l2) | (first < second)
    return np.flatnonzero(keep), np.where(paired, np.sqrt(2.0), 1.0)[keep]


@dataclass(frozen=True)
class _Coupling:
    """One (l1, l2) -> lambda coupling: which output columns it fills and from which channel pairs."""

    l1: int
    l2: int
    outputs: np.ndarray  # positions among the computed columns of this lambda
    channels1: np.ndarray  # density channels (species-major, n-minor) used on the l1 side
    channels2: np.ndarray
    pair: np.ndarray  # per output: index into the (channels1 x channels2) products
    weight: np.ndarray  # 1 or sqrt(2), see unique_couplings
    cg: np.ndarray  # (2 l1 + 1) (2 lambda + 1) x (2 l2 + 1)


def coupled_properties(species: Sequence[int], n_max: int, l_max: int, lam: int) -> np.ndarray:
    """Rows (l_1, l_2, neighbor_1_type, n_1, neighbor_2_type, n_2) of the lambda features, in featomic's order.

    ``EquivariantPowerSpectrum(...).compute_metadata(..., neighbors_to_properties=True)`` gives the
    same rows (l1 <= l2, |l1 - l2| <= lambda <= l1 + l2, l1 + l2 + lambda even: the o3_sigma = 1
    block); building that calculator took 0.56 s (n_max 8, l_max 6), about as long as featurising
    the 200 workshop training frames, so the rows are written out here and the comparison with
    featomic's features (tests) guards their order.
    """
    rows = [
        (l1, l2, s1, n1, s2, n2)
        for l1 in range(l_max + 1)
        for l2 in range(l1, l_max + 1)
        if abs(l1 - l2) <= lam <= l1 + l2 and (l1 + l2 + lam) % 2 == 0
        for s1 in species
        for n1 in range(n_max)
        for s2 in species
        for n2 in range(n_max)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 6)


@functools.lru_cache(maxsize=4)
def _expansion(rc: float, sigma: float, n_max: int, l_max: int):
    # imported here: featomic loads a native library, not needed for e.g. reading tensors
    import featomic

    return featomic.SphericalExpansion(
        cutoff={"radius": rc, "smoothing": {"type": "Step"}},
        density={"type": "Gaussian", "width": sigma},
        basis={"type": "TensorProduct", "max_angular": l_max, "radial": {"type": "Gto", "max_radial": n_max - 1}},
    )


@functools.lru_cache(maxsize=4)
def _clebsch_gordan(l_max: int):
    from featomic.clebsch_gordan import calculate_cg_coefficients

    return calculate_cg_coefficients(
        lambda_max=l_max, cg_backend="python-dense", arrays_backend="numpy", dtype=np.float64, device="cpu"
    )


@functools.lru_cache(maxsize=8)
def _plan(rc, sigma, n_max, l_max, species, columns):
    """featomic's expansion, per lambda (number of columns, couplings), the species and the channel count."""
    cg = _clebsch_gordan(l_max)
    channel = {(s, n): i for i, (s, n) in enumerate((s, n) for s in species for n in range(n_max))}
    plan = {}
    for position, lam in enumerate(LAMBDAS):
        keep, weight = unique_couplings(coupled_properties(species, n_max, l_max, lam))
        rows = coupled_properties(species, n_max, l_max, lam)[keep]
        if columns is not None:
            rows, weight = rows[list(columns[position])], weight[list(columns[position])]
        couplings = []
        for l1, l2 in sorted({(int(r[0]), int(r[1])) for r in rows}):
            outputs = np.flatnonzero((rows[:, 0] == l1) & (rows[:, 1] == l2))
            first = np.array([channel[(int(r[2]), int(r[3]))] for r in rows[outputs]])
            second = np.array([channel[(int(r[4]), int(r[5]))] for r in rows[outputs]])
            channels1, index1 = np.unique(first, return_inverse=True)
            channels2, index2 = np.unique(second, return_inverse=True)
            coefficients = np.asarray(cg.block({"l1": l1, "l2": l2, "lambda": lam}).values)[0, ..., 0]  # (m1, m2, mu)
            couplings.append(
                _Coupling(
                    l1, l2, outputs, channels1, channels2, index1 * len(channels2) + index2, weight[outputs],
                    np.ascontiguousarray(coefficients.transpose(0, 2, 1).reshape(-1, 2 * l2 + 1)),
                )
            )
        plan[lam] = (len(rows), couplings)
    return _expansion(rc, sigma, n_max, l_max), plan, species, len(channel)


def _chunk(frames: Sequence[ase.Atoms], plan) -> FeatureBlock:
    from metatensor import Labels

    expansion, lambdas, species, n_channels = plan
    density = expansion.compute(list(frames))
    # every species as a neighbour channel, present in these frames or not: fixed columns
    density = density.keys_to_properties(Labels(["neighbor_type"], np.array([[s] for s in species], dtype=np.int32)))
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = {lam: np.empty((int(counts.sum()), 2 * lam + 1, n)) for lam, (n, _) in lambdas.items()}
    for center in np.unique(density.keys.column("center_type")):
        by_l = {}
        for key, block in density.items():
            if int(key["center_type"]) == int(center):
                # properties (neighbor_type, n) -> species-major, n-minor, the plan's channel order
                props = block.properties.values
                order = np.argsort(props[:, 0] * 10**6 + props[:, 1], kind="stable")
                by_l[int(key["o3_lambda"])] = np.ascontiguousarray(block.values[:, :, order])
                samples = block.samples.values
        rows = offsets[samples[:, 0]] + samples[:, 1]
        n_atoms = len(rows)
        for lam, (n_columns, couplings) in lambdas.items():
            m = 2 * lam + 1
            local = np.empty((n_atoms, m, n_columns))
            for c in couplings:
                c1 = by_l[c.l1] if len(c.channels1) == n_channels else by_l[c.l1][:, :, c.channels1]
                c2 = by_l[c.l2] if len(c.channels2) == n_channels else by_l[c.l2][:, :, c.channels2]
                k1, k2 = c1.shape[2], c2.shape[2]
                y = c.cg @ c2  # (atoms, (2 l1 + 1) m, k2)
                p = c1.transpose(0, 2, 1) @ y.reshape(n_atoms, 2 * c.l1 + 1, m * k2)  # (atoms, k1, m k2)
                p = p.reshape(n_atoms, k1, m, k2).transpose(0, 2, 1, 3).reshape(n_atoms, m, k1 * k2)
                local[:, :, c.outputs] = p[:, :, c.pair] * c.weight
            out[lam][rows] = local
    return FeatureBlock(x0=out[0][:, 0, :], x2=out[2], counts=counts)
