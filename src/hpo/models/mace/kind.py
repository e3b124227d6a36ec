"""MACE, the model kind: an equivariant message-passing potential of energies and forces, trained by mace-torch's
own ``mace_run_train`` (``engine``), searched, screened with MD and promoted like GAP.

Its fidelity is the training epoch (``fidelity = "epoch"``, budget ``model.max_num_epochs``): after every epoch
the validation errors go to ``FitContext.report``, which the search turns into MLflow metric history and Optuna
intermediate values; a pruner that stops the trial there raises out of ``report`` and ``engine.train`` kills the
training child. The fit validates on ``FitContext.val`` (mace-torch keeps the checkpoint of lowest validation
loss, so the model is chosen on the same frames the search scores it on, as GAP's hyperparameters are).

Seeds: every fit is seeded with the run's seed (``study.seed``, the context's), recorded as the trial's ``seed``
parameter; on one thread the same seed gives the same model to 1e-8 eV (tests/unit/models/mace).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ase
import numpy as np

from hpo.models.base import FitContext, Fitted, ModelKind, TrialFailure
from hpo.models.mace import engine, parameters
from hpo.models.predictions import EnergyPredictions, energy_loss

MODEL_FILE = "mace.model"
# Beside the model: the device it was trained for (MD runs there when it exists on the machine that loads it).
SETTINGS_SUFFIX = ".json"
# What a fit's folder keeps besides the model: its log, its command line and mace-torch's per-epoch metrics.
# The TorchScript copy, checkpoints and the frames' copies go (2.6 MB per default fit; the data are hpo's own).
DISCARDED = ("checkpoints", engine.TRAIN_FILE, engine.VALID_FILE, *(name for name in engine.MODEL_FILES if "compiled" in name))


def _labelled(split) -> list[ase.Atoms]:
    """The frames of a ``FrameSet`` with their energies (eV) and forces (eV/Å) as hpo read them (units converted,
    whatever the file's keys), under the engine's default keys."""
    keys = engine.DataKeys()
    out = []
    for index, atoms in enumerate(split.frames):
        copy = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        copy.info[keys.energy] = float(split.energies[index])
        if split.forces:
            copy.arrays[keys.forces] = np.asarray(split.forces[index], dtype=float)
        out.append(copy)
    return out


def _discard(workdir: Path) -> None:
    """Remove what a fit leaves besides its model, log, command and metrics (``DISCARDED``)."""
    for name in DISCARDED:
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _device(files: list[Path]) -> str:
    """The device a stored model was trained for, if this machine has it; else the CPU."""
    settings = files[0].with_name(files[0].name + SETTINGS_SUFFIX)
    device = json.loads(settings.read_text()).get("device", "cpu") if settings.is_file() else "cpu"
    if device == "cpu":
        return device
    import torch

    available = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    return device if available else "cpu"


class MaceKind(ModelKind):
    name = "mace"
    display_name = "MACE"
    targets = ("energy", "force")
    parameters = parameters.PARAMETERS
    trial_metrics = (
        "train_energy_rmse", "val_energy_rmse", "val_energy_rmse_per_atom", "energy_rmse_ratio", "val_force_rmse", "val_loss",
        "fit_time_s", "eval_time_s", "epochs_done", "best_epoch", "md_ms_per_atom",
    )
    pyfunc_code = Path(__file__).with_name("pyfunc.py")
    pyfunc_requirements = ("torch", "mace-torch")
    drives_md = True
    records_loss = True
    fidelity = "epoch"
    fidelity_budget = "max_num_epochs"

    def pyfunc_outputs(self):
        from mlflow.types.schema import Array, ColSpec, Schema

        return Schema([ColSpec("double", "energy"), ColSpec(Array(Array("double")), "forces")])

    def check_combination(self, params: dict, prefix: str) -> None:
        parameters.check(params, prefix)

    def fit_targets(self, params: dict) -> tuple[str, ...]:
        return self.targets if float(params["forces_weight"]) > 0 else ("energy",)

    def fit(self, train, params: dict, workdir: Path, context: FitContext, upcoming=()) -> Fitted:
        """mace_run_train on ``train``, validated every epoch on ``context.val``; each epoch's validation errors
        (and ``val_loss`` of ``study.loss``) to ``context.report``. Raises ``TrialFailure`` ("fit_error",
        "timeout") when mace-torch fails; whatever ``report`` raises (a pruned trial) passes through."""
        if context.val is None:
            raise TrialFailure("error", "MACE validates every epoch: the fit needs the validation frames (FitContext.val)")
        params = {**params, "seed": int(context.seed)}  # the run's seed, recorded as the trial's parameter
        with_forces = float(params["forces_weight"]) > 0
        val_truth = EnergyPredictions.of(context.val)
        epochs: dict[int, dict[str, float]] = {}

        def on_epoch(epoch: int, found: dict[str, float]) -> None:
            found = dict(found)
            if context.loss is not None:  # the search's own loss, comparable with GAP's val_loss
                found.update({k: v for k, v in energy_loss(context.loss, found, val_truth, with_forces, ("val",)).items() if k == "val_loss"})
            epochs[epoch] = found
            if context.report is not None:
                context.report(epoch, found)

        start = time.monotonic()
        try:
            model_file = engine.train(_labelled(train), _labelled(context.val), params, workdir, on_epoch,
                                      e0=context.e0, threads=context.threads)
        except engine.MaceTrainingError as exc:
            if time.monotonic() - start >= float(params["fit_timeout_s"]):
                raise TrialFailure("timeout", str(exc)) from exc
            raise TrialFailure("fit_error", str(exc)) from exc
        finally:  # a pruned or failed fit too: its checkpoints would otherwise stay in every trial's folder
            fit_time = time.monotonic() - start
            _discard(workdir)
        kept = workdir / MODEL_FILE
        if model_file != kept:  # stage two's model (swa) replaces stage one's: one name for every stored MACE
            shutil.move(model_file, kept)
        kept.with_name(kept.name + SETTINGS_SUFFIX).write_text(json.dumps({"device": params["device"]}) + "\n")
        # mace-torch keeps the checkpoint of lowest validation loss (its own weighted loss; with swa among stage
        # two's epochs, whose loss weighs energies differently)
        first = engine.stage_two_start(params) + 1 if params["swa"] else 1
        losses = {epoch: found["val_mace_loss"] for epoch, found in epochs.items() if "val_mace_loss" in found and epoch >= first}
        figures = {"fit_time_s": fit_time, "epochs_done": float(max(epochs, default=0))}
        if losses:
            figures["best_epoch"] = float(min(losses, key=losses.get))
        return Fitted(
            model_files=[kept], params=params, chosen={"seed": params["seed"]}, metrics=figures,
            artifacts=[workdir / engine.LOG_FILE, workdir / engine.COMMAND_FILE],
            state=(kept, _device([kept]), with_forces),
        )

    def evaluate(self, fitted: Fitted, frames) -> EnergyPredictions:
        model_file, device, with_forces = fitted.state
        return self._predict(model_file, frames, device, with_forces)

    @staticmethod
    def _predict(model_file: Path, frames, device: str, with_forces: bool) -> EnergyPredictions:
        energies, forces = engine.predict(model_file, list(frames), device=device)
        return EnergyPredictions(energies, np.array([len(a) for a in frames]), forces if with_forces else None)

    def reference(self, split, params: dict, context: FitContext) -> EnergyPredictions:
        return EnergyPredictions.of(split)

    def loss_metrics(self, found, val, params, weights, prefixes=("train", "val")) -> dict[str, float]:
        return energy_loss(weights, found, val, float(params["forces_weight"]) > 0, prefixes)

    def cost_metrics(self, fitted: Fitted, frames) -> dict[str, float]:
        """``md_ms_per_atom``: milliseconds per atom of one MD step's energies and forces with the MACECalculator
        on ``model.cost_frames`` of ``frames``, after one call that loads the model and sets torch up."""
        count = int(fitted.params.get("cost_frames", 0))
        if not count:
            return {}
        model_file, device, _ = fitted.state
        calc = engine.calculator(model_file, device)
        timed = [atoms.copy() for atoms in list(frames)[:count]]
        calc.calculate(timed[0], ["energy", "forces"])
        start = time.perf_counter()
        for atoms in timed:
            calc.calculate(atoms, ["energy", "forces"])
        return {"md_ms_per_atom": (time.perf_counter() - start) * 1e3 / sum(len(atoms) for atoms in timed)}

    def failure_artifacts(self, workdir: Path) -> list[Path]:
        return [workdir / engine.LOG_FILE, workdir / engine.COMMAND_FILE]

    def lineage_tags(self, workdir: Path) -> dict[str, str]:
        command = workdir / engine.COMMAND_FILE
        return {"mace_run_train_command": command.read_text().strip()} if command.is_file() else {}

    def files_in(self, path: Path) -> list[Path]:
        return [path] if path.is_file() else [path / MODEL_FILE]

    def holds(self, path: Path) -> bool:
        return path.suffix == ".model" if path.is_file() else (path / MODEL_FILE).is_file()

    def predict(self, files: list[Path], frames, params: dict, with_std: bool = False) -> EnergyPredictions:
        """Energies and forces (no predictive std: a single MACE keeps none)."""
        return self._predict(files[0], frames, _device(files), float(params.get("forces_weight", 1.0)) > 0)

    def load(self, files: list[Path]):
        """The torch module (float64, evaluation mode)."""
        return engine._load_model(files[0], _device(files), "float64")

    def calculator(self, files: list[Path]):
        """mace-torch's ``MACECalculator`` in float64, on the device the model was trained for when present."""
        return engine.calculator(files[0], _device(files))

    def bundle(self, files: list[Path], folder: Path) -> None:
        for path in files:
            for companion in (path, path.with_name(path.name + SETTINGS_SUFFIX)):
                if companion.is_file():
                    shutil.copy(companion, folder / companion.name)


KIND = MaceKind()
