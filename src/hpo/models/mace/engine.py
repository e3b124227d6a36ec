"""Train a MACE potential with mace-torch's own training script, predict with it, hand out its ASE calculator.

Training runs mace-torch's ``mace_run_train`` (``mace.cli.run_train.main``) in a child process, in its own
process group and killed by Linux if this process dies (``CHILD_CODE``), rather than calling mace-torch's
python API in this process, because:

- ``run_train.run`` is the one training entry point mace-torch documents and maintains (data loading,
  statistics and scaling, E0s, EMA, stage two, checkpoints, the final model); the lower-level
  ``mace.tools.train`` would have to be re-assembled from ~1000 lines of ``run_train`` and re-checked at
  every mace-torch release;
- ``run_train.run`` changes process-wide state of the caller: it adds handlers to the root logger and sets
  it to DEBUG on every call, sets torch's default dtype and the global seeds; an Optuna worker running
  many trials would accumulate all of it;
- stopping is clean: a pruned trial kills the child's process group (SIGTERM, then SIGKILL), which frees
  its memory, threads and open files whatever it was doing. mace-torch offers no callback to stop its loop
  from inside; an exception raised in this process cannot reach it.

Per-epoch metrics come from mace-torch's own metrics file: ``MetricsLogger`` appends one JSON line per
evaluation to ``results/<name>_run-<seed>_train.txt`` (opened, written and closed each time, so every
complete line is final); this process reads the new lines every ``POLL_S`` and calls ``on_epoch`` once per
epoch with the validation errors in eV, eV/atom and eV/Angstrom. Cost of the child process: importing torch
and mace-torch, about 5-10 s per fit on this machine (see README.md of this folder).

Energies: MACE learns E - sum of E0 over the atoms; E0 (eV per isolated atom of each species) is given
(``e0``), as hpo's data provide it (``dataset.e0``); ``e0=None`` lets mace-torch fit them by least squares
(``E0s="average"``, what ``dataset.e0=average`` means for GAP). Isolated-atom frames in the training frames
are left out of the training file: their energy is E0 itself, and mace-torch's convention is to read them
as E0s, not to fit them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase
import ase.data
import ase.io
import numpy as np

# What each fit's files are called inside its workdir (mace-torch derives the metrics file from them).
RUN_NAME = "mace"
TRAIN_FILE = "train.xyz"
VALID_FILE = "valid.xyz"
LOG_FILE = "mace_run_train.log"
COMMAND_FILE = "mace_run_train.cmd"
# How often (s) the metrics file is read while mace-torch trains: an epoch of the smallest useful fit takes
# a fraction of a second to seconds, so a quarter second adds no visible latency and no visible load.
POLL_S = 0.25
# After SIGTERM the child gets this long (s) to exit before SIGKILL: torch exits at once on SIGTERM; a
# checkpoint being written is lost either way (the fit is abandoned).
TERMINATE_GRACE_S = 10.0
# Lines of mace-torch's log quoted in an error.
LOG_TAIL_LINES = 30

# mace-torch's evaluation keys -> hpo's metric names (hpo.metrics.energy_force_metrics), with their units.
EPOCH_METRICS = {
    "rmse_e": "val_energy_rmse",  # eV per cell
    "mae_e": "val_energy_mae",  # eV per cell
    "rmse_e_per_atom": "val_energy_rmse_per_atom",  # eV/atom
    "mae_e_per_atom": "val_energy_mae_per_atom",  # eV/atom
    "rmse_f": "val_force_rmse",  # eV/Angstrom, over all force components
    "mae_f": "val_force_mae",  # eV/Angstrom
    "loss": "val_mace_loss",  # mace-torch's own weighted loss (energy_weight, forces_weight): not study.loss
}

# Model parameters passed to run_train under the same name (conf/model/mace.yaml says what each means).
PASSED_AS_IS = (
    "r_max", "num_channels", "max_L", "correlation", "num_interactions", "num_radial_basis", "num_cutoff_basis",
    "lr", "weight_decay", "batch_size", "valid_batch_size", "energy_weight", "forces_weight", "max_num_epochs",
    "patience", "clip_grad", "seed", "device", "default_dtype",
)

OnEpoch = Callable[[int, dict[str, float]], None]


class MaceTrainingError(RuntimeError):
    """mace-torch's training exited with an error or wrote no model; the message quotes its log."""


@dataclass(frozen=True)
class DataKeys:
    """Where the frames keep their labels: ``atoms.info[energy]`` (eV per cell) and ``atoms.arrays[forces]``
    (eV/Angstrom). mace-torch is told these names (``--energy_key``/``--forces_key``); nothing is renamed."""

    energy: str = "REF_energy"
    forces: str = "REF_forces"


def is_isolated_atom(atoms: ase.Atoms) -> bool:
    """One atom and no periodic direction: the isolated-atom frames that carry E0 (hpo's data and the
    libAtoms convention also label them ``config_type=isolated_atom``; the geometry is enough)."""
    return len(atoms) == 1 and not any(atoms.pbc)


def e0_argument(e0: Mapping[str, float] | None) -> str:
    """mace-torch's ``--E0s``: a dict literal {atomic number: eV}, or ``average`` (fitted by least squares)."""
    if e0 is None:
        return "average"
    numbers = {int(ase.data.atomic_numbers[symbol]): float(energy) for symbol, energy in e0.items()}
    return repr(dict(sorted(numbers.items())))


def stage_two_start(params: Mapping[str, Any]) -> int:
    """The epoch (0-based, mace-torch's count) at which stage two ("SWA") starts: ``swa_start_fraction`` of the
    epochs, at least 1 and before the last, so a short fit still has an epoch of each stage."""
    epochs = int(params["max_num_epochs"])
    return min(max(1, int(round(float(params["swa_start_fraction"]) * epochs))), max(1, epochs - 1))


def run_train_arguments(params: Mapping[str, Any], workdir: Path, e0: Mapping[str, float] | None, keys: DataKeys) -> list[str]:
    """The ``mace_run_train`` arguments of one fit: every directory inside ``workdir``, nothing downloaded,
    no plots, validation every epoch, no closing error table, the model saved for CPU."""
    args = {name: params[name] for name in PASSED_AS_IS}
    args.update(
        name=RUN_NAME, model="MACE", train_file=str(workdir / TRAIN_FILE), valid_file=str(workdir / VALID_FILE),
        work_dir=str(workdir), log_dir=str(workdir / "logs"), model_dir=str(workdir),
        checkpoints_dir=str(workdir / "checkpoints"), results_dir=str(workdir / "results"),
        downloads_dir=str(workdir / "downloads"), energy_key=keys.energy, forces_key=keys.forces,
        E0s=e0_argument(e0), loss="weighted", error_table="PerAtomRMSE", eval_interval=1, plot=False,
        num_workers=0, pin_memory=False, compute_stress=False,
        # run_train's closing error table re-evaluates the training and validation sets (about an epoch's
        # forward passes); hpo evaluates the model itself (predict), so the table is skipped: its loaders are
        # named train_Default / valid_Default and the option skips names containing the string
        skip_evaluate_heads="Default",
    )
    line = [f"--{name}={value}" for name, value in args.items()]
    # store_true switches of run_train: present or absent, no value
    line.append("--save_cpu")
    if params["ema"]:
        line += ["--ema", f"--ema_decay={params['ema_decay']}"]
    if params["swa"]:
        line += ["--swa", f"--start_swa={stage_two_start(params)}", f"--swa_lr={params['swa_lr']}",
                 f"--swa_energy_weight={params['swa_energy_weight']}", f"--swa_forces_weight={params['swa_forces_weight']}"]
    return line


# The child process: mace-torch's own ``mace_run_train`` entry point, after asking Linux to SIGKILL it when this
# process dies (PR_SET_PDEATHSIG): a worker killed by a signal or the OOM killer (hpo's "killed" trials) would
# otherwise leave its training running for up to fit_timeout_s. Inline (-c) so the child imports nothing of hpo.
CHILD_CODE = """
import ctypes, os, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
if os.getppid() != parent:  # the parent died before prctl took effect
    sys.exit(1)
sys.argv[0] = "mace_run_train"
from mace.cli.run_train import main
main()
"""


def child_command(arguments: Sequence[str]) -> list[str]:
    """The command line that runs ``mace_run_train arguments`` as a child of this process (``CHILD_CODE``)."""
    return [sys.executable, "-c", CHILD_CODE, str(os.getpid()), *arguments]


def _has_label(atoms: ase.Atoms, key: str, ase_name: str) -> bool:
    """Whether ``atoms`` carries ``key``: in info/arrays, or, for ASE's own names ("energy", "forces"), in the
    calculator ASE's reader attaches (mace-torch reads them from there under those names)."""
    where = atoms.info if ase_name == "energy" else atoms.arrays
    if key in where:
        return True
    return key == ase_name and atoms.calc is not None and ase_name in getattr(atoms.calc, "results", {})


def write_training_files(
    train_frames: Sequence[ase.Atoms], val_frames: Sequence[ase.Atoms], workdir: Path, keys: DataKeys, need_forces: bool = True
) -> None:
    """The two extended-XYZ files run_train reads; isolated atoms left out of training (their energy is E0).
    Every frame must carry its energy, and its forces when they are fitted (a frame without a label would be
    trained on as zero or fail inside mace-torch after its imports)."""
    train = [atoms for atoms in train_frames if not is_isolated_atom(atoms)]
    for name, frames in (("training", train), ("validation", list(val_frames))):
        if not frames:
            raise ValueError(f"no {name} frames (isolated atoms do not count)")
        for index, atoms in enumerate(frames):
            if not _has_label(atoms, keys.energy, "energy"):
                raise ValueError(f"{name} frame {index} has no energy under {keys.energy!r}")
            if need_forces and not _has_label(atoms, keys.forces, "forces"):
                raise ValueError(f"{name} frame {index} has no forces under {keys.forces!r}")
    ase.io.write(workdir / TRAIN_FILE, train, format="extxyz")
    ase.io.write(workdir / VALID_FILE, list(val_frames), format="extxyz")


# run_train saves the best checkpoint of stage one as <name>.model and, with stage two (swa), the best of stage
# two as <name>_stagetwo.model (the one mace-torch users deploy); both also as TorchScript (*_compiled.model).
MODEL_FILES = (f"{RUN_NAME}.model", f"{RUN_NAME}_stagetwo.model", f"{RUN_NAME}_compiled.model", f"{RUN_NAME}_stagetwo_compiled.model")


def model_file_name(params: Mapping[str, Any]) -> str:
    """The model a fit hands back: the last stage's best checkpoint."""
    return MODEL_FILES[1] if params["swa"] else MODEL_FILES[0]


def metrics_file(workdir: Path, seed: int) -> Path:
    """Where mace-torch's MetricsLogger writes (``tools.get_tag`` + ``_train.txt``)."""
    return workdir / "results" / f"{RUN_NAME}_run-{seed}_train.txt"


class _Tail:
    """The complete lines appended to a file since the last read (a line being written waits for its newline)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        return [line.decode() for line in complete if line.strip()]


def epoch_metrics(line: str) -> tuple[int, dict[str, float]] | None:
    """(epochs done, metrics in hpo's names) of one metrics-file line; None for the per-batch lines and for the
    evaluation before training (epoch null). mace-torch counts epochs from 0: its epoch k is the (k+1)-th."""
    record = json.loads(line)
    if record.get("mode") != "eval" or record.get("epoch") is None:
        return None
    found = {ours: float(record[theirs]) for theirs, ours in EPOCH_METRICS.items() if isinstance(record.get(theirs), (int, float))}
    return int(record["epoch"]) + 1, found


def _stop(process: subprocess.Popen) -> None:
    """End the child and everything it started (its process group), and reap it: no stray process."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:  # exited between poll and kill
            process.wait()


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def train(
    train_frames: Sequence[ase.Atoms],
    val_frames: Sequence[ase.Atoms],
    params: Mapping[str, Any],
    workdir: Path,
    on_epoch: OnEpoch | None = None,
    *,
    e0: Mapping[str, float] | None,
    keys: DataKeys = DataKeys(),
    threads: int = 1,
    timeout_s: float | None = None,
) -> Path:
    """Train a MACE on ``train_frames``, validated every epoch on ``val_frames``; the model file (``workdir/mace.model``,
    ``mace_stagetwo.model`` with ``swa``).

    ``params``: the model config (conf/model/mace.yaml). ``e0``: eV per isolated atom of each species (None:
    fitted). ``threads``: torch's CPU threads in the child (OMP_NUM_THREADS). ``on_epoch(epochs_done, metrics)``
    is called after every epoch, in order, with ``EPOCH_METRICS`` of the validation set (the EMA weights when
    ``ema``); if it raises, training is stopped (the child's process group killed and reaped) and the exception
    propagates. The model file holds the epoch of lowest validation loss (mace-torch's checkpoint; with ``swa``
    the lowest of stage two, whose loss weighs energies by ``swa_energy_weight``), not necessarily the last. Raises ``MaceTrainingError`` (with the log's tail) when run_train fails or exceeds
    ``timeout_s`` (default: ``params["fit_timeout_s"]``).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # What an earlier fit in this folder left must not pass for this one: run_train's final model is the
    # checkpoint of the highest epoch in checkpoints/, whichever run wrote it.
    for name in MODEL_FILES:
        (workdir / name).unlink(missing_ok=True)
    for stale in ("checkpoints", "results"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    write_training_files(train_frames, val_frames, workdir, keys, need_forces=float(params["forces_weight"]) > 0)
    model_file = workdir / model_file_name(params)
    tail = _Tail(metrics_file(workdir, int(params["seed"])))
    timeout_s = timeout_s if timeout_s is not None else params.get("fit_timeout_s")
    log = workdir / LOG_FILE
    arguments = run_train_arguments(params, workdir, e0, keys)
    # the command as a user would type it, kept beside the log (the trial's record of how it was trained)
    (workdir / COMMAND_FILE).write_text(" ".join(["mace_run_train", *map(shlex.quote, arguments)]) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(child_command(arguments), cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            done = process.poll() is not None  # read after the exit is seen, so no line is missed
            for line in tail.new_lines():
                found = epoch_metrics(line)
                if found is not None and on_epoch is not None:
                    on_epoch(*found)
            if done:
                break
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise MaceTrainingError(f"mace-torch training exceeded {timeout_s:g} s; last lines of {log}:\n{_log_tail(log)}")
            time.sleep(POLL_S)
    finally:
        _stop(process)
    if process.returncode != 0 or not model_file.is_file():
        raise MaceTrainingError(
            f"mace-torch training {'exited with ' + str(process.returncode) if process.returncode else 'wrote no model'}; "
            f"last lines of {log}:\n{_log_tail(log)}"
        )
    return model_file


def _load_model(model_file: Path, device: str, dtype: str):
    import torch

    # a whole pickled module (mace-torch's own format), written by our own training: weights_only cannot load it
    model = torch.load(model_file, map_location=device, weights_only=False)
    model = model.double() if dtype == "float64" else model.float()
    for parameter in model.parameters():
        parameter.requires_grad = False  # forces are taken w.r.t. positions, not weights
    return model.to(device).eval()


def predict(
    model_file: Path, frames: Sequence[ase.Atoms], batch_size: int = 8, device: str = "cpu", dtype: str = "float64"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV per frame, E0s included) and forces (eV/Angstrom, one (n_atoms, 3) array per frame) of
    ``frames``, evaluated in batches. Leaves torch's default dtype as it was."""
    from mace import data as mace_data
    from mace.tools import torch_geometric, torch_tools, utils

    model = _load_model(Path(model_file), device, dtype)
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    r_max = float(model.r_max)
    heads = getattr(model, "heads", None) or ["Default"]
    with torch_tools.default_dtype(dtype):
        # the labels are not read: predictions only (keys that no frame has)
        keyspec = mace_data.KeySpecification(info_keys={}, arrays_keys={})
        configs = [mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name=heads[0]) for atoms in frames]
        dataset = [mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=r_max, heads=heads) for config in configs]
        loader = torch_geometric.dataloader.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
        energies: list[float] = []
        forces: list[np.ndarray] = []
        for batch in loader:
            batch = batch.to(device)
            output = model(batch.to_dict(), compute_stress=False, training=False)
            energies.extend(output["energy"].detach().cpu().numpy().tolist())
            per_atom = output["forces"].detach().cpu().numpy()
            bounds = batch.ptr.cpu().numpy()
            forces.extend(per_atom[start:end].copy() for start, end in zip(bounds[:-1], bounds[1:]))
    return np.array(energies, dtype=float), forces


def calculator(model_file: Path, device: str = "cpu"):
    """mace-torch's ASE calculator of the model, in float64 (MD and finite differences need its precision)."""
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(model_file), device=device, default_dtype="float64")
