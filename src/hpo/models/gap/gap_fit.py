"""Fit a GAP with QUIP's ``gap_fit`` program and evaluate it with quippy.

``gap_fit`` is driven entirely by its command line: with ``config_file=`` it
silently ignores every other argument, so we never use one. It also exits 0 on
some bad input (an unknown key inside ``gap={...}`` is ignored), which is why
the config is validated before we get here.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ase
import numpy as np

from hpo.models.base import TrialFailure

# Keys of the model config that go inside gap={soap ...}, in gap_fit's spelling.
DESCRIPTOR_KEYS = (
    "l_max",
    "n_max",
    "atom_sigma",
    "cutoff",
    "cutoff_transition_width",
    "central_weight",
    "n_sparse",
    "delta",
    "covariance_type",
    "zeta",
    "sparse_method",
)
MODEL_FILE = "gap.xml"
# gap_fit writes here; only a finished fit is renamed to MODEL_FILE, so no later stage
# ever picks up a half-written model.
PARTIAL_MODEL_FILE = "partial_gap.xml"
TAIL_LINES = 30


class GapFitError(TrialFailure):
    """gap_fit failed; ``reason`` is one of gap_fit_error, timeout, missing_model, killed."""

    def __init__(self, reason: str, message: str, tail: str = ""):
        super().__init__(reason, f"{message}\n--- last lines of gap_fit output ---\n{tail}" if tail else message)
        self.tail = tail


def environments_per_species(frames: list[ase.Atoms]) -> dict[str, int]:
    counts = Counter()
    for atoms in frames:
        counts.update(atoms.get_chemical_symbols())
    return dict(counts)


def effective_n_sparse(n_sparse: int, frames: list[ase.Atoms]) -> int:
    """gap_fit caps n_sparse at each species' number of environments; do it up front so the record is true."""
    return int(min(n_sparse, max(environments_per_species(frames).values())))


def covariance_memory_bytes(n_sparse: int | Sequence[int], frames: list[ase.Atoms], with_forces: bool = True) -> int:
    """gap_fit's own estimate of its covariance matrices, the arrays that grow with n_sparse.

    One descriptor per species, each with ``n_sparse`` points (a sequence: one value per descriptor setting of
    ``descriptor_settings``): S sparse points in all and T targets (one energy per frame and, ``with_forces``,
    three force components per atom). gap_fit prints these as "yY S T * 2", "yy S S" and "A S S+T * 2" under
    "Memory Estimate".
    """
    per_setting = [n_sparse] if isinstance(n_sparse, (int, np.integer)) else list(n_sparse)
    sparse = len(environments_per_species(frames)) * sum(int(n) for n in per_setting)
    targets = len(frames) + (3 * sum(len(atoms) for atoms in frames) if with_forces else 0)
    return 8 * (2 * sparse * targets + sparse * sparse + 2 * sparse * (sparse + targets))


def soap_dimensions(n_max: int, l_max: int, n_species: int) -> int:
    """Length of one SOAP vector as quippy builds it: every pair of (species, radial) channels per l, plus one."""
    channels = n_max * n_species
    return (l_max + 1) * channels * (channels + 1) // 2 + 1


def number_density(atoms: ase.Atoms) -> float | None:
    """Atoms per cubic Angstrom of a periodic cell; None for a cell without volume."""
    volume = abs(atoms.cell.volume) if atoms.cell.rank == 3 else 0.0
    return len(atoms) / volume if volume > 0 else None


def neighbours_per_atom(cutoff: float, frames: list[ase.Atoms]) -> float:
    """Estimated neighbours inside ``cutoff`` of one atom, from the densest frame: density * 4/3 pi rc^3
    (a frame without a cell counts all its atoms: no images)."""
    sphere = 4.0 / 3.0 * np.pi * cutoff**3
    counts = [density * sphere if (density := number_density(atoms)) else len(atoms) - 1 for atoms in frames]
    return float(max(counts))


def needs_gradients(params: dict) -> bool:
    """Whether a fit has force targets, and so descriptor gradients (both solvers: ``model.fit_forces``)."""
    return bool(params.get("fit_forces"))


def descriptor_memory_bytes(params: dict, frames: list[ase.Atoms]) -> int:
    """gap_fit's memory for the training descriptors and their gradients, the arrays that grow with the cutoff,
    summed over the descriptors of ``descriptor_settings`` (gap_fit holds them all at once).

    gap_fit keeps one SOAP vector per atom ("x d n" under "Memory Estimate") and, for the forces,
    one gradient vector per atom, neighbour and direction ("xPrime d 3n'"), n' counting each atom
    and its neighbours inside the cutoff. The neighbours are estimated from the density, which
    overestimates slightly (by about 1.3x on the water cells at 3 A). While it computes them, gap_fit
    holds one frame's gradients twice: measured peak memory (maxrss) of gap_fit on 1, 2 and 4 water
    frames at a 30 A cutoff was 207, 310 and 518 MB for 94, 188 and 377 MB of listed arrays.
    Without gradients (hpo's numpy solver, fit_forces=false) only the vectors are kept: a large
    cutoff then costs time, not memory.
    """
    species = len({int(z) for atoms in frames for z in atoms.numbers})
    centres = sum(len(atoms) for atoms in frames)
    total = 0
    for setting in descriptor_settings(params):
        dimensions = soap_dimensions(int(setting["n_max"]), int(setting["l_max"]), species)
        if not needs_gradients(params):
            total += 8 * dimensions * centres
            continue
        neighbours = neighbours_per_atom(float(setting["cutoff"]), frames) + 1.0
        gradients = 3 * centres * neighbours
        one_frame = 3 * max(len(atoms) for atoms in frames) * neighbours
        total += 8 * dimensions * (centres + gradients + one_frame)
    return int(total)


def largest_cutoff(params: dict, frames: list[ase.Atoms], budget_bytes: float) -> float:
    """The cutoff at which ``descriptor_memory_bytes`` reaches ``budget_bytes`` (other parameters as given)."""
    low, high = 0.0, 1.0
    while descriptor_memory_bytes({**params, "cutoff": high}, frames) <= budget_bytes and high < 1e4:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        if descriptor_memory_bytes({**params, "cutoff": middle}, frames) <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


def executable() -> str:
    """The gap_fit program of the running Python's quippy-ase (its scripts folder), else the one on PATH.

    The scripts folder comes first: a virtual environment used without being activated (``.venv/bin/python -m
    hpo``) has gap_fit there and not on PATH, and another gap_fit on PATH (a cluster module) may be of
    another version than the quippy that computes hpo's descriptors.
    """
    found = shutil.which("gap_fit", path=sysconfig.get_path("scripts")) or shutil.which("gap_fit")
    if found is None:
        raise GapFitError(
            "gap_fit_error",
            f"gap_fit not found in {sysconfig.get_path('scripts')} nor on PATH: it comes with quippy-ase (pip install quippy-ase)",
        )
    return found


def _number(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def descriptor_settings(params: dict) -> list[dict]:
    """Every descriptor of the GAP as a mapping of gap_fit's keys: the model's own SOAP, then each entry of
    ``model.descriptors`` (further descriptors summed into the energy) over the keys it does not set."""
    main = {key: params[key] for key in ("descriptor", *DESCRIPTOR_KEYS) if key in params}
    return [main] + [{**main, **dict(extra)} for extra in params.get("descriptors") or ()]


def descriptor_text(setting: dict) -> str:
    """The text of one descriptor inside gap={...} (a mapping of ``descriptor_settings``), as gap_fit receives it."""
    return " ".join([setting["descriptor"]] + [f"{k}={_number(setting[k])}" for k in DESCRIPTOR_KEYS])


def expected_descriptors(params: dict, frames: list[ase.Atoms]) -> list[str]:
    """The descriptor strings gap_fit will write into the model: per descriptor setting, one per centre species.

    gap_fit splits a multi-species descriptor into one per species found in the
    training frames, appending ``n_species``, ``Z`` and ``species_Z`` (in order of
    first appearance), descriptor after descriptor. Knowing them before the fit lets hpo compute the
    evaluation descriptors while gap_fit runs; a wrong guess only costs that head start.
    """
    species = list(dict.fromkeys(int(z) for atoms in frames for z in atoms.numbers))
    species_z = "{" + " ".join(map(str, species)) + " }"
    return [f"{descriptor_text(setting)} n_species={len(species)} Z={z} species_Z={species_z}"
            for setting in descriptor_settings(params) for z in species]


# force_parameter_name for an energy-only gap_fit: no frame has this column, so gap_fit adds no force targets.
NO_FORCE_KEY = "hpo_no_force_targets"
# A logical per-atom column of the training file: true leaves that atom's force out of the fit.
FORCE_MASK_KEY = "hpo_force_mask"


@dataclass(frozen=True)
class SparsePoints:
    """Sparse environments chosen by hpo for gap_fit: 0-based indices into the environments of each
    descriptor of ``expected_descriptors(params, frames)`` (``frames``: the training frames)."""

    frames: Sequence[ase.Atoms]
    indices: tuple[np.ndarray, ...]

    @property
    def files(self) -> list[str]:
        return sparse_file_names(len(self.indices))

    def write(self, workdir: Path) -> None:
        for name, indices in zip(self.files, self.indices):
            write_sparse_index_file(workdir / name, indices)


def sparse_file_names(n_descriptors: int) -> list[str]:
    """The index files' names in gap_fit's working directory, one per descriptor."""
    return [f"sparse_{i}.idx" for i in range(n_descriptors)]


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
    ``counts`` (indices in each) follow ``expected_descriptors(params, frames)``
    (species in order of first appearance, setting after setting). Replaces gap_fit's own split (``add_species=F``)
    because gap_fit would give every species the same ``sparse_file``.
    """
    descriptors = expected_descriptors(params, frames)
    if len(index_files) != len(descriptors):
        raise ValueError(f"{len(descriptors)} descriptors (one per species and setting) but {len(index_files)} index files")
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


def build_command(
    params: dict,
    train_file: str,
    e0: dict | None,
    keys,
    seed: int,
    sparse: SparsePoints | None = None,
    energy_only: bool = False,
    force_mask: bool = False,
) -> list[str]:
    """The gap_fit argument list for one model config (``conf/model/gap.yaml`` layout).

    With ``sparse`` gap_fit uses hpo's sparse points (index files) instead of choosing its own; with
    ``energy_only`` (or no ``keys.force``: a file without forces) it gets no force targets. ``e0``:
    isolated-atom energies (eV) per species, or None for gap_fit's ``e0_method=average``.
    """
    descriptors = " : ".join(descriptor_text(setting) for setting in descriptor_settings(params))
    sigma = params["default_sigma"]
    default_sigma = " ".join(_number(sigma[k]) for k in ("energy", "force", "virial", "hessian"))
    if e0 is None:  # the mean over training frames of the energy per atom, for every species
        e0_arg = "e0_method=average"
    else:
        e0_arg = "e0={" + ":".join(f"{symbol}:{_number(energy)}" for symbol, energy in sorted(e0.items())) + "}"
    gap_arg = f"gap={{{descriptors}}}"
    if sparse is not None:
        (gap_arg,) = gap_fit_sparse_args(params, sparse.frames, sparse.files, [len(i) for i in sparse.indices])
    return [
        "gap_fit",
        f"at_file={train_file}",
        gap_arg,
        f"default_sigma={{{default_sigma}}}",
        e0_arg,
        f"energy_parameter_name={keys.energy}",
        f"force_parameter_name={NO_FORCE_KEY if energy_only or not keys.force else keys.force}",
        *([f"force_mask_parameter_name={FORCE_MASK_KEY}"] if force_mask else []),
        f"sparse_jitter={_number(params['sparse_jitter'])}",
        # gap_fit aborts on rnd_seed=0 ("linear-congruential ... fail with seed idum=0").
        f"rnd_seed={seed + 1}",
        "do_copy_at_file=F",
        "sparse_separate_file=F",
        f"gp_file={PARTIAL_MODEL_FILE}",
    ]


class GAP:
    """A GAP potential fitted by ``gap_fit``, in the shape of a scikit-learn estimator.

    ``GAP(params, e0, keys, threads, seed).fit(train_file, workdir)`` runs gap_fit in ``workdir``
    (it writes .idx and sparse files next to its input) and sets the fitted attributes
    ``model_file_`` (gap.xml), ``command_`` (the argument list) and ``fit_time_s_`` (gap_fit's own wall
    time). ``params`` is the model config (``conf/model/gap.yaml`` layout), checked by the model kind
    before it gets here: gap_fit exits 0 on some impossible values. With ``sparse`` gap_fit uses the
    sparse points hpo chose (so hpo's own solver and gap_fit fit the same model); with ``energy_only``
    it gets no force targets.
    """

    def __init__(
        self,
        params: dict,
        e0: dict,
        keys,
        threads: int = 1,
        seed: int = 0,
        sparse: SparsePoints | None = None,
        energy_only: bool = False,
        force_atoms: Sequence[np.ndarray] | None = None,
    ):
        self.params = params
        self.e0 = e0
        self.keys = keys
        self.threads = threads
        self.seed = seed
        self.sparse = sparse
        self.energy_only = energy_only
        self.force_atoms = force_atoms  # per frame, the atoms whose forces enter the fit (None: all)

    def fit(self, train_file: Path, workdir: Path, while_fitting: Callable[[], None] | None = None) -> "GAP":
        """Fit on the frames of ``train_file``.

        ``while_fitting`` runs in this process while gap_fit runs (gap_fit's time does not include
        it): work that does not need the model, on a core gap_fit leaves free. If gap_fit dies
        meanwhile, the work is not waited for: the failure is raised as soon as it is seen.
        stdout and stderr go to ``gap_fit.out`` and ``gap_fit.err``. Raises ``GapFitError`` on a
        non-zero exit, a ``SYSTEM ABORT``, a timeout (``params['fit_timeout_s']``) or a missing model.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        local_train = workdir / "train.xyz"
        if self.force_atoms is None:
            if Path(train_file).resolve() != local_train.resolve():  # a cross-validation fold writes it there already
                shutil.copyfile(train_file, local_train)
        else:
            _write_force_mask(train_file, local_train, self.force_atoms)
        if self.sparse is not None:
            self.sparse.write(workdir)
        command = build_command(self.params, local_train.name, self.e0, self.keys, self.seed, self.sparse, self.energy_only,
                                force_mask=self.force_atoms is not None)
        (workdir / "gap_fit.cmd").write_text(shlex.join(command) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        out_path, err_path = workdir / "gap_fit.out", workdir / "gap_fit.err"
        timeout = self.params["fit_timeout_s"]
        start = time.perf_counter()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen([executable(), *command[1:]], cwd=workdir, env=env, stdout=out, stderr=err)
            # A thread notes when gap_fit ends, so the fit time stays gap_fit's own even if
            # while_fitting outlasts it (waiting on a process releases the GIL).
            ended: list[float] = []
            watcher = threading.Thread(target=lambda: (process.wait(), ended.append(time.perf_counter())), daemon=True)
            watcher.start()
            def overdue() -> bool:
                return time.perf_counter() - start > timeout

            try:
                if while_fitting is not None:
                    # the work beside gap_fit stops as soon as gap_fit has died or run out of time
                    while_fitting(lambda: process.poll() not in (None, 0) or overdue())
                watcher.join(timeout=max(timeout - (time.perf_counter() - start), 0.0))
            except BaseException:
                process.kill()  # never leave a gap_fit running behind a failed or interrupted trial
                process.wait()
                raise
            # timed out: still running, or ended only after its time was up (noticed after the work beside it)
            if watcher.is_alive() or (ended and ended[0] - start > timeout):
                process.kill()
                process.wait()
                raise GapFitError("timeout", f"gap_fit ran longer than model.fit_timeout_s={timeout} s", _tail(out_path, err_path))
        watcher.join()
        tail = _tail(out_path, err_path)
        if process.returncode < 0:  # a signal: on a workstation or a node, SIGKILL is almost always the OOM killer
            name = signal.Signals(-process.returncode).name
            likely = ", likely out of memory" if name == "SIGKILL" else ""
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # kB: the largest child of this process so far
            raise GapFitError("killed", f"gap_fit killed by {name}{likely} (largest gap_fit of this process so far: {peak:.2g} GB) in {workdir}", tail)
        if process.returncode != 0 or "SYSTEM ABORT" in tail:
            raise GapFitError("gap_fit_error", f"gap_fit exited with code {process.returncode} in {workdir}", tail)
        partial = workdir / PARTIAL_MODEL_FILE
        if not partial.is_file():
            raise GapFitError("missing_model", f"gap_fit exited 0 but wrote no {PARTIAL_MODEL_FILE} in {workdir}", tail)
        self.model_file_ = workdir / MODEL_FILE
        os.replace(partial, self.model_file_)
        self.command_ = command
        self.fit_time_s_ = ended[0] - start
        return self

    @property
    def command_line(self) -> str:
        return shlex.join(self.command_)


def _write_force_mask(train_file: Path, target: Path, force_atoms: Sequence[np.ndarray]) -> None:
    """``train_file`` with gap_fit's force mask column: true for every atom whose force stays out of the fit."""
    import ase.io

    frames = ase.io.read(train_file, ":")
    if len(frames) != len(force_atoms):
        raise ValueError(f"{train_file}: {len(frames)} frames but a force selection for {len(force_atoms)}")
    for atoms, kept in zip(frames, force_atoms):
        atoms.arrays[FORCE_MASK_KEY] = ~np.asarray(kept, dtype=bool)
    ase.io.write(target, frames, format="extxyz")


def _tail(*paths: Path) -> str:
    lines = []
    for path in paths:
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def load(model_file: Path):
    """A quippy Potential for a fitted GAP: parse the XML once, then predict any number of frames."""
    from quippy.potential import Potential  # imported late: loading the Fortran library is slow

    return Potential(param_filename=str(model_file))


def predict(potential, frames: list[ase.Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV per frame) and forces (eV/Angstrom) of ``frames`` under a loaded GAP."""
    energies, forces = [], []
    for atoms in frames:
        atoms = atoms.copy()  # keep the reference calculator of the data untouched
        atoms.calc = potential
        energies.append(atoms.get_potential_energy())
        forces.append(np.array(atoms.get_forces()))
    return np.array(energies), forces
