"""quippy's descriptors of frames (with gradients when forces are needed), cached by content.

The same code gap_fit uses (quippy's ``Descriptor``), so the numbers are the same; environments are in
gap_fit's order (frame by frame, then by centre atom), so index ``i`` here is index ``i + 1`` in a
gap_fit ``sparse_file``. Both ``sparse_gap`` (predicting) and ``solver`` (fitting) read them.
Gradients are large (n_pairs x 3 x d doubles: about 3.5 MB per 12-atom water frame at n_max=4,
l_max=6, cutoff 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import ase
import numpy as np

from hpo.cache import Cache, digest, frame_digests

# Keys of a gap={...} descriptor string that configure the GP, not the descriptor.
GP_ONLY_KEYS = frozenset(
    {"n_sparse", "delta", "covariance_type", "zeta", "sparse_method", "sparse_file", "theta_uniform", "f0", "print_sparse_index", "unique_hash_tolerance", "mark_sparse_atoms", "add_species"}
)
_KEY_VALUE = re.compile(r"(\w+)=(\{[^}]*\}|\S+)")


def descriptor_key(descriptor: str) -> str:
    """The descriptor string without GP-only keys, normalised: two strings with the same key describe the same features."""
    name = descriptor.split(None, 1)[0]
    pairs = {key: " ".join(value.strip("{}").split()) for key, value in _KEY_VALUE.findall(descriptor)}
    return " ".join([name] + [f"{key}={pairs[key]}" for key in sorted(pairs) if key not in GP_ONLY_KEYS])


def descriptor_value(descriptor: str, key: str) -> str:
    """The value of one key of a descriptor string (e.g. ``zeta`` or ``delta``: each descriptor of a GAP has its own)."""
    for found, value in _KEY_VALUE.findall(descriptor):
        if found == key:
            return value
    raise KeyError(f"no {key}= in descriptor {descriptor!r}")


def quippy_version() -> str:
    from importlib import metadata

    return metadata.version("quippy-ase")


@dataclass(frozen=True)
class Environments:
    """quippy's descriptors of every environment of some frames for one descriptor string, with gradients if asked.

    Environments are in gap_fit's order (frame by frame, then by centre atom), so
    index ``i`` here is index ``i + 1`` in a gap_fit ``sparse_file``.
    """

    vectors: np.ndarray  # (n_env, d)
    frame: np.ndarray  # (n_env,) frame of each environment
    cutoff: np.ndarray  # (n_env,) covariance cutoff
    n_frames: int
    # Gradients, one row per (environment, neighbour atom) pair; None without gradients.
    grad: np.ndarray | None = None  # (n_pairs, 3, d) d q_env / d r_atom
    grad_cutoff: np.ndarray | None = None  # (n_pairs, 3)
    grad_env: np.ndarray | None = None  # (n_pairs,) environment index
    grad_atom: np.ndarray | None = None  # (n_pairs,) atom index over all frames (frame offsets added)

    @property
    def has_gradients(self) -> bool:
        return self.grad is not None

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"vectors": self.vectors, "frame": self.frame, "cutoff": self.cutoff, "n_frames": np.array(self.n_frames)}
        if self.has_gradients:
            out.update(grad=self.grad, grad_cutoff=self.grad_cutoff, grad_env=self.grad_env, grad_atom=self.grad_atom)
        return out

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> Environments:
        return cls(
            a["vectors"], a["frame"], a["cutoff"], int(a["n_frames"]),
            a.get("grad"), a.get("grad_cutoff"), a.get("grad_env"), a.get("grad_atom"),
        )


    @classmethod
    def concatenate(cls, parts: Sequence[Environments], atoms_per_part: Sequence[int]) -> Environments:
        """The environments of several frame lists in one, indices shifted (``atoms_per_part``: atoms of each)."""
        env_offsets = np.cumsum([0] + [len(p.vectors) for p in parts])
        frame_offsets = np.cumsum([0] + [p.n_frames for p in parts])
        atom_offsets = np.cumsum([0, *atoms_per_part])
        joined = cls(
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.frame + f for p, f in zip(parts, frame_offsets)]),
            np.concatenate([p.cutoff for p in parts]),
            int(frame_offsets[-1]),
        )
        if not parts or not parts[0].has_gradients:
            return joined
        return cls(
            joined.vectors, joined.frame, joined.cutoff, joined.n_frames,
            np.concatenate([p.grad for p in parts]),
            np.concatenate([p.grad_cutoff for p in parts]),
            np.concatenate([p.grad_env + e for p, e in zip(parts, env_offsets)]),
            np.concatenate([p.grad_atom + a for p, a in zip(parts, atom_offsets)]),
        )


def environments(
    descriptor: str,
    frames: Sequence[ase.Atoms],
    cache: Cache | None = None,
    gradients: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Environments | None:
    """quippy's descriptors (and, with ``gradients``, their gradients) of ``frames``.

    Cached per frame by content (the frame bit for bit, the descriptor key, quippy's version), so a hit
    can never be stale and any subset or fold of frames seen before is a hit. ``should_stop`` is asked
    between frames; when it says so the work is abandoned and None returned (e.g. gap_fit died while
    these descriptors were computed beside it).
    """
    cache = cache or Cache(None)
    base = digest("gap-descriptors", descriptor_key(descriptor), quippy_version(), gradients)
    parts = []
    calculator = None
    for atoms, frame_key in zip(frames, frame_digests(frames)):
        if should_stop is not None and should_stop():
            return None
        key = digest(base, frame_key)
        hit = cache.get("gap_descriptors", key)
        if hit is None:
            if calculator is None:
                from quippy.descriptors import Descriptor  # imported late: loading the Fortran library is slow

                calculator = Descriptor(descriptor)
            found = calculate_frame(calculator, descriptor, atoms, gradients)
            cache.put("gap_descriptors", key, found.arrays())
        else:
            found = Environments.from_arrays(hit)
        parts.append(found)
    return Environments.concatenate(parts, [len(atoms) for atoms in frames])


def calculate_frame(calculator, descriptor: str, atoms: ase.Atoms, gradients: bool) -> Environments:
    dimensions = calculator.dimensions()
    out = calculator.calc(atoms, grad=gradients)
    data = np.asarray(out["data"], dtype=float).reshape(-1, dimensions) if len(out.get("data", [])) else np.zeros((0, dimensions))
    cutoff = np.asarray(out["covariance_cutoff"], dtype=float).reshape(len(data)) if len(data) else np.zeros(0)
    found = Environments(data, np.zeros(len(data), dtype=int), cutoff, 1)
    if not gradients:
        return found
    if not len(data):
        return Environments(data, found.frame, cutoff, 1, np.zeros((0, 3, dimensions)), np.zeros((0, 3)), np.zeros(0, int), np.zeros(0, int))
    sizes = [len(neighbours) for neighbours in out["ii"]]
    grad = np.asarray(out["grad_data"], dtype=float).reshape(-1, 3, dimensions)
    if len(grad) != sum(sizes) or len(sizes) != len(data):
        raise ValueError(f"{descriptor}: quippy gave {len(grad)} gradient rows for neighbour lists of {sum(sizes)}")
    return Environments(
        data, found.frame, cutoff, 1,
        grad,
        np.asarray(out["grad_covariance_cutoff"], dtype=float).reshape(-1, 3),
        np.repeat(np.arange(len(data)), sizes),
        np.asarray(out["grad_index_0based"])[:, 1].astype(int),
    )
