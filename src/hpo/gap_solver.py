"""A sparse-GP solver in numpy that gives the same GAP as ``gap_fit``, on sparse points hpo chooses.

Two halves, each checked against gap_fit itself (``tests/test_gap_solver.py``):

* **Sparse points chosen by hpo.** ``select_sparse`` picks environments by
  farthest-point sampling (or CUR, or at random) on quippy's descriptors;
  ``write_sparse_index_file`` and ``gap_fit_sparse_args`` hand exactly those to
  gap_fit (``sparse_method=index_file sparse_file=<file>``: 1-based indices, one
  per line, into the list of environments of that descriptor, frame by frame
  in file order, atom by atom). gap_fit copies one ``sparse_file`` to every
  species it splits a multi-species descriptor into, so hpo writes the
  per-species descriptors itself (``add_species=F``, joined by ``:``), each with
  its own index file. gap_fit sorts the indices; the model lists sparse points
  in increasing index order.

* **The same fit without gap_fit.** ``fit`` builds gap_fit's linear system from
  the same descriptors and solves it. gap_fit's model (gp_predict.F90,
  gap_fit_module.F90 of GAP, verified here by equality):

    - one sparse GP per descriptor (per centre species), dot-product kernel
      k(q, x) = delta^2 * c_q * c_x * (q . x)^zeta (c: covariance cutoff,
      1 for SOAP centres); K_MM is block diagonal over descriptors, plus
      ``sparse_jitter`` on its diagonal;
    - an energy target per frame: E - sum_atoms e0(Z), covariance with sparse
      point s the sum over the frame's environments of k(q_i, x_s); its noise
      sigma_E = default_sigma[0] * sqrt(n_atoms) (``sigma_per_atom=T``, the default);
    - a target per force component: -F (the energy gradient), covariance the
      gradient of the energy row w.r.t. that atom's position (descriptor
      gradients, plus the covariance cutoff's gradient); noise default_sigma[1],
      unscaled;
    - alpha from the least-squares problem [Lambda^-1/2 K_NM; U] alpha = [Lambda^-1/2 y; 0]
      with K_MM = U^T U, solved by QR (gap_fit's own route).

  The result is a ``sparse_gap.SparseGap``: it predicts like a model read from
  gap_fit's XML (energies; ``predict_forces`` for forces), and ``write_xml``
  writes it in gap_fit's layout for quippy's ``Potential`` (MD).

Descriptors and their gradients are computed once per (descriptor, frames) and
cached by content (``training_environments``, kind ``gap_solver_descriptors``);
a refit that changes only delta, zeta, sigmas, jitter, e0 or the sparse points
reuses them. Gradients are large (n_pairs x 3 x d doubles: about 3.5 MB per
12-atom water frame at n_max=4, l_max=6, cutoff 5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import ase
import numpy as np
import scipy.linalg

from hpo import gap
from hpo.cache import Cache, digest, frame_digests
from hpo.sparse_gap import SparseGap, SparseGP, descriptor_key, quippy_version

SPARSE_METHODS = ("fps", "cur", "random")
# force_parameter_name for an energy-only gap_fit: no frame has this column, so gap_fit adds no force targets.
NO_FORCE_KEY = "hpo_no_force_targets"


# --------------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class TrainingEnvironments:
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
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> TrainingEnvironments:
        return cls(
            a["vectors"], a["frame"], a["cutoff"], int(a["n_frames"]),
            a.get("grad"), a.get("grad_cutoff"), a.get("grad_env"), a.get("grad_atom"),
        )


def training_environments(
    descriptor: str, frames: Sequence[ase.Atoms], gradients: bool = False, cache: Cache | None = None
) -> TrainingEnvironments:
    """quippy's descriptors (and their gradients) of ``frames``; cached by content like ``sparse_gap.environments``."""
    key = digest("gap-solver-descriptors", descriptor_key(descriptor), frame_digests(frames), quippy_version(), gradients)
    cache = cache or Cache(None)
    hit = cache.get("gap_solver_descriptors", key)
    if hit is not None:
        return TrainingEnvironments.from_arrays(hit)
    from quippy.descriptors import Descriptor  # imported late: loading the Fortran library is slow

    calculator = Descriptor(descriptor)
    dimensions = calculator.dimensions()
    vectors, frame, cutoff = [], [], []
    grad, grad_cutoff, grad_env, grad_atom = [], [], [], []
    n_env = atom_offset = 0
    for index, atoms in enumerate(frames):
        out = calculator.calc(atoms, grad=gradients)
        data = np.asarray(out["data"], dtype=float).reshape(-1, dimensions) if len(out.get("data", [])) else np.zeros((0, dimensions))
        vectors.append(data)
        frame.append(np.full(len(data), index))
        cutoff.append(np.asarray(out["covariance_cutoff"], dtype=float).reshape(len(data)) if len(data) else np.zeros(0))
        if gradients and len(data):
            sizes = [len(neighbours) for neighbours in out["ii"]]
            g = np.asarray(out["grad_data"], dtype=float).reshape(-1, 3, dimensions)
            if len(g) != sum(sizes) or len(sizes) != len(data):
                raise ValueError(f"{descriptor}: quippy gave {len(g)} gradient rows for neighbour lists of {sum(sizes)}")
            grad.append(g)
            grad_cutoff.append(np.asarray(out["grad_covariance_cutoff"], dtype=float).reshape(-1, 3))
            grad_env.append(n_env + np.repeat(np.arange(len(data)), sizes))
            grad_atom.append(atom_offset + np.asarray(out["grad_index_0based"])[:, 1].astype(int))
        n_env += len(data)
        atom_offset += len(atoms)
    found = TrainingEnvironments(
        np.concatenate(vectors), np.concatenate(frame), np.concatenate(cutoff), len(frames),
    )
    if gradients:
        d = dimensions
        found = TrainingEnvironments(
            found.vectors, found.frame, found.cutoff, found.n_frames,
            np.concatenate(grad) if grad else np.zeros((0, 3, d)),
            np.concatenate(grad_cutoff) if grad_cutoff else np.zeros((0, 3)),
            np.concatenate(grad_env) if grad_env else np.zeros(0, int),
            np.concatenate(grad_atom) if grad_atom else np.zeros(0, int),
        )
    cache.put("gap_solver_descriptors", key, found.arrays())
    return found


# --------------------------------------------------------------------------- sparse points


def select_sparse(environments: np.ndarray | TrainingEnvironments, n_sparse: int, method: str = "fps", seed: int = 0) -> np.ndarray:
    """0-based indices of ``n_sparse`` environments, in selection order (a smaller n_sparse gives a prefix for fps/cur).

    fps: farthest-point sampling in descriptor space (Euclidean); the same
    points as ``skmatter.sample_selection.FPS(initialize="random",
    random_state=seed)`` (a test checks this) without re-reading the matrix
    at every step; a chosen point is never chosen again, even when all the
    remaining ones coincide with it. cur: skmatter's CUR on the descriptor
    matrix (deterministic; skmatter is only in the ``test`` extra). random: a
    seeded draw.
    """
    x = environments.vectors if isinstance(environments, TrainingEnvironments) else np.asarray(environments, float)
    n = len(x)
    n_sparse = int(min(n_sparse, n))
    if n_sparse <= 0:
        return np.zeros(0, dtype=int)
    if method == "random":
        return np.random.default_rng(seed).choice(n, n_sparse, replace=False)
    if method == "cur":
        import warnings

        from skmatter.sample_selection import CUR

        with warnings.catch_warnings():  # SOAP has all-zero columns (absent species pairs): harmless here
            warnings.filterwarnings("ignore", message="Column vector contains only zeros")
            return np.asarray(CUR(n_to_select=n_sparse).fit(x).selected_idx_, dtype=int)
    if method != "fps":
        raise ValueError(f"unknown sparse method {method!r}; expected one of {SPARSE_METHODS}")
    from sklearn.utils import check_random_state

    chosen = np.empty(n_sparse, dtype=int)
    chosen[0] = check_random_state(seed).randint(n)  # skmatter's draw of the first point
    squared_norms = np.einsum("ij,ij->i", x, x)
    distance = np.full(n, np.inf)
    for k in range(1, n_sparse):
        last = chosen[k - 1]
        d2 = squared_norms + squared_norms[last] - 2.0 * (x @ x[last])
        distance = np.minimum(distance, np.maximum(d2, 0.0))
        distance[chosen[:k]] = -1.0
        chosen[k] = int(np.argmax(distance))
    return chosen


def write_sparse_index_file(path: Path, indices: Sequence[int]) -> Path:
    """gap_fit's ``sparse_method=index_file`` format: 1-based environment indices, one per line."""
    path = Path(path)
    path.write_text("".join(f"{int(i) + 1}\n" for i in indices))
    return path


def read_sparse_index_file(path: Path) -> np.ndarray:
    """0-based indices of a gap_fit index file."""
    return np.array(Path(path).read_text().split(), dtype=int) - 1


def gap_fit_sparse_args(params: dict, frames: Sequence[ase.Atoms], index_files: Sequence[str | Path], counts: Sequence[int]) -> list[str]:
    """The ``gap={...}`` argument making gap_fit use hpo's sparse points: one descriptor per centre species.

    ``index_files`` (paths as gap_fit sees them from its working directory) and
    ``counts`` (indices in each) follow ``gap.expected_descriptors(params, frames)``
    (species in order of first appearance). Replaces gap_fit's own split (``add_species=F``)
    because gap_fit would give every species the same ``sparse_file``.
    """
    descriptors = gap.expected_descriptors(params, frames)
    if len(index_files) != len(descriptors):
        raise ValueError(f"{len(descriptors)} descriptors (one per species) but {len(index_files)} index files")
    parts = []
    for descriptor, index_file, n in zip(descriptors, index_files, counts):
        text = _replace_keys(descriptor, n_sparse=str(n), sparse_method="index_file")
        # gap_fit strips one level of braces when it splits gap={a : b}: species_Z={8 1 } must arrive doubled.
        text = text.replace("={", "={{").replace("}", "}}")
        parts.append(f"{text} sparse_file={index_file} add_species=F")
    return ["gap={" + " : ".join(parts) + "}"]


def _replace_keys(descriptor: str, **values: str) -> str:
    words = descriptor.split(" ")
    for i, word in enumerate(words):
        key = word.split("=", 1)[0]
        if key in values:
            words[i] = f"{key}={values[key]}"
    return " ".join(words)


def build_sparse_command(
    params: dict, train_file: str, e0: dict, keys, seed: int, frames: Sequence[ase.Atoms],
    index_files: Sequence[str | Path], counts: Sequence[int], energy_only: bool = False,
) -> list[str]:
    """``gap.build_command`` with hpo's sparse points (and, if ``energy_only``, no force targets)."""
    command = gap.build_command(params, train_file, e0, keys, seed)
    (gap_arg,) = gap_fit_sparse_args(params, frames, index_files, counts)
    out = []
    for arg in command:
        if arg.startswith("gap="):
            arg = gap_arg
        elif energy_only and arg.startswith("force_parameter_name="):
            arg = f"force_parameter_name={NO_FORCE_KEY}"
        out.append(arg)
    return out


def gap_fit_with_sparse(
    params: dict,
    train_file: Path,
    workdir: Path,
    e0: dict,
    keys,
    frames: Sequence[ase.Atoms],
    sparse: Sequence[np.ndarray],
    energy_only: bool = False,
    threads: int = 1,
    seed: int = 0,
) -> gap.GapFit:
    """Run gap_fit in ``workdir`` on hpo's sparse points (``sparse``: 0-based indices per descriptor of
    ``gap.expected_descriptors``); ``frames`` are the frames of ``train_file``. The model is ``workdir/gap.xml``.
    """
    import os
    import shlex
    import shutil
    import subprocess

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(train_file, workdir / "train.xyz")
    names = [write_sparse_index_file(workdir / f"sparse_{i}.idx", idx).name for i, idx in enumerate(sparse)]
    command = build_sparse_command(
        params, "train.xyz", e0, keys, seed, frames, names, [len(idx) for idx in sparse], energy_only=energy_only
    )
    (workdir / "gap_fit.cmd").write_text(shlex.join(command) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(workdir / "gap_fit.out", "w") as out, open(workdir / "gap_fit.err", "w") as err:
        try:
            process = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=err, timeout=params.get("fit_timeout_s"))
        except subprocess.TimeoutExpired as exc:
            raise gap.GapFitError("timeout", f"gap_fit ran longer than {params.get('fit_timeout_s')} s") from exc
    elapsed = time.perf_counter() - start
    tail = gap._tail(workdir / "gap_fit.out", workdir / "gap_fit.err")
    if process.returncode != 0 or "SYSTEM ABORT" in tail:
        raise gap.GapFitError("gap_fit_error", f"gap_fit exited with code {process.returncode} in {workdir}", tail)
    partial = workdir / gap.PARTIAL_MODEL_FILE
    if not partial.is_file():
        raise gap.GapFitError("missing_model", f"gap_fit wrote no {gap.PARTIAL_MODEL_FILE} in {workdir}", tail)
    model_file = workdir / gap.MODEL_FILE
    os.replace(partial, model_file)
    return gap.GapFit(model_file=model_file, command=command, fit_time_s=elapsed, workdir=workdir)


# --------------------------------------------------------------------------- the solver


@dataclass(frozen=True)
class Hyper:
    """The GP settings of one fit, in gap_fit's meaning."""

    delta: float
    zeta: float
    energy_sigma: float  # default_sigma[0], per atom (scaled by sqrt(n_atoms))
    force_sigma: float  # default_sigma[1]
    sparse_jitter: float
    e0: Mapping[int, float]  # isolated-atom energy per atomic number

    @classmethod
    def from_params(cls, params: dict, e0: Mapping[str, float]) -> Hyper:
        from ase.data import atomic_numbers

        sigma = params["default_sigma"]
        return cls(
            delta=float(params["delta"]), zeta=float(params["zeta"]),
            energy_sigma=float(sigma["energy"]), force_sigma=float(sigma["force"]),
            sparse_jitter=float(params["sparse_jitter"]),
            e0={atomic_numbers[s]: float(v) for s, v in e0.items()},
        )


@dataclass
class SolveTimes:
    kernels_s: float = 0.0
    solve_s: float = 0.0


def _sum_rows(groups: np.ndarray, n_groups: int, values: np.ndarray) -> np.ndarray:
    """Rows of ``values`` summed by group (a sparse 0/1 matrix product: much faster than np.add.at)."""
    import scipy.sparse

    ones = np.ones(len(groups))
    matrix = scipy.sparse.csr_matrix((ones, (groups, np.arange(len(groups)))), shape=(n_groups, len(groups)))
    return np.asarray(matrix @ values.reshape(len(groups), -1)).reshape((n_groups,) + values.shape[1:])


def _energy_gradient_kernels(env: TrainingEnvironments, x: np.ndarray, c_sparse: np.ndarray, delta: float, zeta: float) -> np.ndarray:
    """d k(q_env, x_s) / d r_atom per gradient pair: (n_pairs, 3, M); zero cutoff gradients (SOAP) cost nothing."""
    pair_dots = (env.vectors @ x.T)[env.grad_env]  # (n_pairs, M)
    n_pairs, d = len(env.grad_env), x.shape[1]
    grad_dots = (env.grad.reshape(n_pairs * 3, d) @ x.T).reshape(n_pairs, 3, -1)
    scale = zeta * pair_dots ** (zeta - 1) * env.cutoff[env.grad_env][:, None]
    d_k = grad_dots * scale[:, None, :]
    if np.any(env.grad_cutoff):
        d_k += env.grad_cutoff[:, :, None] * (pair_dots**zeta)[:, None, :]
    d_k *= delta**2 * c_sparse[None, None, :]
    return d_k


def _kernel_blocks(env: TrainingEnvironments, sparse: np.ndarray, hyper: Hyper, n_atoms: int | None):
    """Energy rows (n_frames, M) and, if ``n_atoms``, force rows (3 * n_atoms, M, atom-major) of one descriptor."""
    x = env.vectors[sparse]
    c_sparse = env.cutoff[sparse]
    k_env = hyper.delta**2 * env.cutoff[:, None] * (env.vectors @ x.T) ** hyper.zeta * c_sparse[None, :]
    energy_rows = _sum_rows(env.frame, env.n_frames, k_env)
    if n_atoms is None:
        return energy_rows, None
    if not env.has_gradients:
        raise ValueError("force targets need descriptor gradients: training_environments(..., gradients=True)")
    d_k = _energy_gradient_kernels(env, x, c_sparse, hyper.delta, hyper.zeta)
    return energy_rows, _sum_rows(env.grad_atom, n_atoms, d_k).reshape(3 * n_atoms, len(sparse))


def fit(
    found: Mapping[str, TrainingEnvironments],
    sparse: Mapping[str, np.ndarray],
    frames: Sequence[ase.Atoms],
    energies: np.ndarray,
    hyper: Hyper,
    forces: Sequence[np.ndarray] | None = None,
    times: SolveTimes | None = None,
    threads: int = 1,
) -> SparseGap:
    """The GAP gap_fit would fit on ``frames`` with these sparse points: a ``SparseGap`` (alphas solved in numpy).

    ``found`` maps each descriptor string (one per centre species, as in
    ``gap.expected_descriptors``) to the frames' environments; ``sparse`` maps it
    to 0-based environment indices (any order: used sorted, like gap_fit).
    ``forces`` (per frame, (n_atoms, 3), eV/A) adds force targets, which need
    environments with gradients. ``threads``: BLAS threads of the solve (on a
    loaded machine, many threads make a small QR a hundred times slower).
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=threads):
        return _fit(found, sparse, frames, energies, hyper, forces, times if times is not None else SolveTimes())


def _fit(found, sparse, frames, energies, hyper: Hyper, forces, times: SolveTimes) -> SparseGap:
    start = time.perf_counter()
    descriptors = list(found)
    n_atoms = np.array([len(a) for a in frames])
    total_atoms = int(n_atoms.sum())
    use_forces = forces is not None
    columns, k_mm_blocks, energy_cols, force_cols = [], [], [], []
    for descriptor in descriptors:
        env = found[descriptor]
        index = np.sort(np.asarray(sparse[descriptor], dtype=int))
        columns.append(index)
        x = env.vectors[index]
        c = env.cutoff[index]
        k_mm_blocks.append(hyper.delta**2 * np.outer(c, c) * (x @ x.T) ** hyper.zeta)
        energy_rows, force_rows = _kernel_blocks(env, index, hyper, total_atoms if use_forces else None)
        energy_cols.append(energy_rows)
        if use_forces:
            force_cols.append(force_rows)
    k_mm = scipy.linalg.block_diag(*k_mm_blocks)
    k_mm[np.diag_indices_from(k_mm)] += hyper.sparse_jitter
    k_nm = np.hstack(energy_cols)
    e0 = np.array([sum(hyper.e0.get(int(z), 0.0) for z in atoms.numbers) for atoms in frames])
    y = np.asarray(energies, dtype=float) - e0
    sigma = hyper.energy_sigma * np.sqrt(n_atoms)
    if use_forces:
        k_nm = np.vstack([k_nm, np.hstack(force_cols)])
        y = np.concatenate([y, -np.concatenate([np.asarray(f, float).reshape(-1) for f in forces])])
        sigma = np.concatenate([sigma, np.full(3 * total_atoms, hyper.force_sigma)])
    times.kernels_s += time.perf_counter() - start
    start = time.perf_counter()
    alpha = solve_alphas(k_mm, k_nm, y, sigma)
    times.solve_s += time.perf_counter() - start
    gps, offset = [], 0
    for descriptor, index in zip(descriptors, columns):
        env = found[descriptor]
        gps.append(
            SparseGP(
                descriptor=descriptor, delta=hyper.delta, zeta=hyper.zeta,
                alpha=alpha[offset : offset + len(index)], sparse_points=env.vectors[index],
            )
        )
        offset += len(index)
    species = sorted({int(z) for atoms in frames for z in atoms.numbers})
    return SparseGap(e0={z: float(hyper.e0.get(z, 0.0)) for z in species}, gps=tuple(gps))


def fit_frames(
    params: dict,
    frames: Sequence[ase.Atoms],
    energies: np.ndarray,
    e0: Mapping[str, float],
    forces: Sequence[np.ndarray] | None = None,
    sparse_method: str = "fps",
    seed: int = 0,
    cache: Cache | None = None,
    times: SolveTimes | None = None,
    threads: int = 1,
) -> tuple[SparseGap, dict[str, np.ndarray]]:
    """Everything after the data: descriptors (cached), hpo's sparse points, the solve. Returns the model and the sparse indices."""
    descriptors = gap.expected_descriptors(params, frames)
    found = {d: training_environments(d, frames, gradients=forces is not None, cache=cache) for d in descriptors}
    sparse = {d: select_sparse(found[d], params["n_sparse"], sparse_method, seed) for d in descriptors}
    model = fit(found, sparse, frames, energies, Hyper.from_params(params, e0), forces=forces, times=times, threads=threads)
    return model, sparse


def solve_alphas(k_mm: np.ndarray, k_nm: np.ndarray, y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """alpha minimising |Lambda^-1/2 (y - K_NM alpha)|^2 + alpha^T K_MM alpha, by QR as gap_fit does."""
    u = scipy.linalg.cholesky(k_mm, lower=False)  # K_MM = U^T U
    a = np.vstack([k_nm / sigma[:, None], u])
    b = np.concatenate([y / sigma, np.zeros(len(u))])
    q, r = np.linalg.qr(a)
    return scipy.linalg.solve_triangular(r, q.T @ b)


# --------------------------------------------------------------------------- forces of a SparseGap


def predict_forces(model: SparseGap, found: Mapping[str, TrainingEnvironments], frames: Sequence[ase.Atoms]) -> list[np.ndarray]:
    """Forces (eV/A) per frame from environments with gradients (``training_environments(..., gradients=True)``)."""
    total_atoms = sum(len(a) for a in frames)
    forces = np.zeros((total_atoms, 3))
    for gp in model.gps:
        env = found[gp.descriptor]
        ones = np.ones(len(gp.alpha))
        d_k = _energy_gradient_kernels(env, gp.sparse_points, ones, gp.delta, gp.zeta)
        forces -= _sum_rows(env.grad_atom, total_atoms, d_k @ gp.alpha)  # dE / dr_atom
    out, offset = [], 0
    for atoms in frames:
        out.append(forces[offset : offset + len(atoms)])
        offset += len(atoms)
    return out


def energies_of(model: SparseGap, found: Mapping[str, TrainingEnvironments], frames: Sequence[ase.Atoms]) -> np.ndarray:
    """Energies (eV) per frame from precomputed environments (with or without gradients)."""
    from hpo.sparse_gap import Environments

    envs = {d: Environments(e.vectors, e.frame, e.cutoff) for d, e in found.items()}
    return model.energies(frames, envs)


# --------------------------------------------------------------------------- a model quippy can load

N_ELEMENTS = 118  # gap_fit writes an e0 for every element
# gap_version of the quippy-ase 0.10.3 gap_fit; quippy reads older models differently (its compatibility switches).
GAP_VERSION = 1769700636


def write_xml(model: SparseGap, path: Path, label: str = "GAP_hpo") -> Path:
    """Write ``model`` in gap_fit's XML layout (``sparse_separate_file=F``), loadable by quippy's ``Potential``.

    For what needs quippy itself (MD, ``gap.load``) on a model hpo solved;
    ``SparseGap.read`` reads it back. ``label`` must be a valid XML name.
    """
    from xml.sax.saxutils import escape

    def number(value: float) -> str:
        return repr(float(value))

    lines = [f"<{label}>", f'<Potential label="{label}" init_args="IP GAP label={label}"/>']
    lines.append(f'<GAP_params label="{label}" gap_version="{GAP_VERSION}">')
    lines.append('  <GAP_data do_core="F">')
    lines += [f'    <e0 Z="{z}" value="{number(model.e0.get(z, 0.0))}"/>' for z in range(1, N_ELEMENTS + 1)]
    lines.append("  </GAP_data>")
    lines.append(f'  <gpSparse label="{label}" n_coordinate="{len(model.gps)}" fitted="T">')
    for i, gp in enumerate(model.gps, start=1):
        n, d = gp.sparse_points.shape
        lines.append(
            f'    <gpCoordinates label="{label}{i}" dimensions="{d}" signal_variance="{number(gp.delta)}" '
            f'signal_mean="0.0" sparsified="T" n_permutations="1" covariance_type="2" zeta="{number(gp.zeta)}" '
            f'n_sparseX="{n}">'
        )
        lines.append(f"      <descriptor>{escape(gp.descriptor)}</descriptor>")
        lines.append('      <permutation i="1">1</permutation>')
        for j, (alpha, point) in enumerate(zip(gp.alpha, gp.sparse_points), start=1):
            values = " ".join(number(v) for v in point)
            lines.append(f'      <sparseX i="{j}" alpha="{number(alpha)}" sparseCutoff="1.0">{values}</sparseX>')
        lines.append("    </gpCoordinates>")
    lines += ["  </gpSparse>", "</GAP_params>", f"</{label}>"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
