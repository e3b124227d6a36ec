"""Polarizability of every frame of an MD trajectory, from a promoted model of the kind that learns it (SA-GPR).

Writes ``trajectory_cartesian.out`` (one line of 9 numbers per frame, the
layout of the hand workflow), the trajectory again as extended XYZ with a
``Polarizability`` key per frame, and a PNG of xx, yy, zz and xy against time.
The predictions are compared with the training data: a frame whose tensor lies
far outside the training distribution is reported, since the model is then
extrapolating.
"""

from __future__ import annotations

import time
from pathlib import Path

import ase.io
import numpy as np

from hpo import plots
from hpo.safe_files import atomic_write
from hpo.config import output_path
from hpo.data import DataError, model_data, read_tensors
from hpo.metrics import COMPONENTS
from hpo.models import kind_for_target
from hpo.progress import Bar
from hpo.registry.resolve import for_kind, resolve_model
from hpo.tracking import Tracker, provenance_tags


class PolarizeError(ValueError):
    """The trajectory cannot be predicted by this model (e.g. other species)."""


# Per-frame flag in the written trajectory: a component beyond polarize.outlier_sigma training std.
EXTRAPOLATED_KEY = "polarizability_extrapolated"
# Per-frame flag: the model's own predictive std (largest component) beyond polarize.uncertainty_factor x
# the largest seen on the validation frames; and the std itself (9 numbers, row by row, and the largest).
UNCERTAIN_KEY = "polarizability_uncertain"
STD_KEY = "polarizability_std"
STD_MAX_KEY = "polarizability_std_max"


def outliers(predicted: np.ndarray, reference: np.ndarray, n_sigma: float) -> np.ndarray:
    """Indices of frames with a component more than ``n_sigma`` reference std from the reference mean."""
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    z = np.abs(predicted - mean) / np.where(std > 0, std, np.inf)
    return np.flatnonzero(z.max(axis=(1, 2)) > n_sigma)


def comparison_table(predicted: np.ndarray, reference: np.ndarray) -> tuple[str, dict[str, float]]:
    """Mean and range of the predicted components next to the training data's."""
    lines = [f"  {'component':<10}{'predicted mean':>16}{'range':>22}{'training mean':>16}{'range':>22}"]
    metrics = {}
    for name, (i, j) in COMPONENTS.items():
        p, r = predicted[:, i, j], reference[:, i, j]
        lines.append(
            f"  {name:<10}{p.mean():>16.3f}{f'[{p.min():.2f}, {p.max():.2f}]':>22}"
            f"{r.mean():>16.3f}{f'[{r.min():.2f}, {r.max():.2f}]':>22}"
        )
        metrics.update({f"pred_mean_{name}": p.mean(), f"pred_std_{name}": p.std(), f"train_mean_{name}": r.mean()})
    return "\n".join(lines), metrics


def reference_set(cfg) -> tuple[str, list[ase.Atoms], str]:
    """The training frames the predictions are compared with: their file name, frames and polarizability key.

    Workshop layout: the training file of ``polarize.reference_train_size``. Own data (``dataset=files|pool``):
    the training split, with its detected (or ``dataset.keys.polarizability``) key; predictions are written
    under the same key, which ``hpo spectrum`` reads.
    """
    data = model_data(cfg, train_size=cfg.polarize.reference_train_size, need=("polarizability",))
    return data.train.path.name, data.train.frames, data.keys.polarizability


def validation_set(cfg) -> tuple[str, list[ase.Atoms]]:
    """The validation frames the model was selected on: their file name and frames."""
    data = model_data(cfg, train_size=cfg.polarize.reference_train_size, need=("polarizability",))
    return data.val.path.name, data.val.frames


def main(cfg) -> dict:
    """``python -m hpo polarize``: predict ``polarize.trajectory`` with ``polarize.model_uri``. The model is the
    kind's predictor (``ModelKind.load``): ``predict(frames, progress=, return_std=)`` gives (n, 3, 3) tensors."""
    settings = cfg.polarize
    trajectory = Path(settings.trajectory).expanduser()
    if not trajectory.is_file():
        raise DataError(f"polarize.trajectory={settings.trajectory!r} does not exist; run `hpo md` first or give a file")
    tracker = Tracker(cfg.tracking)
    outdir = output_path(cfg.experiments_dir) / "polarize" / time.strftime("%Y%m%d-%H%M%S")
    model_kind = kind_for_target("polarizability")
    uri = for_kind(settings.model_uri, model_kind.name)
    model = model_kind.load(model_kind.files_in(resolve_model(uri, tracker.tracking_uri, outdir / "model")))
    frames = ase.io.read(trajectory, ":")
    start = time.perf_counter()
    with_std = bool(getattr(model, "variance_", None))  # models saved before hpo kept their posterior have none
    try:
        with Bar(len(frames), "[hpo] polarizability", unit="frames") as bar:
            found = model.predict(frames, progress=lambda done, total: bar.set(done), return_std=with_std)
    except ValueError as exc:
        raise PolarizeError(f"{trajectory.name}: {exc}") from exc
    predicted, std = found if with_std else (found, None)
    frames_per_s = len(frames) / max(time.perf_counter() - start, 1e-9)
    print(f"[hpo] {len(frames)} frames predicted at {frames_per_s:.0f} frames/s", flush=True)

    train_name, reference_frames, key = reference_set(cfg)
    # only compared with (means, ranges): their symmetry was checked when the model was fitted
    reference = read_tensors(reference_frames, key, train_name, symmetry_tol=float("inf"))

    far = outliers(predicted, reference, settings.outlier_sigma)
    uncertain, uncertainty = np.zeros(0, dtype=int), {}
    if std is not None:
        validation_name, validation = validation_set(cfg)
        _, validation_std = model.predict(validation, return_std=True)
        largest = float(validation_std.max(axis=(1, 2)).max())
        threshold = float(settings.uncertainty_factor) * largest
        uncertain = np.flatnonzero(std.max(axis=(1, 2)) > threshold)
        uncertainty = {"uncertainty_threshold": threshold, "validation_std_max": largest, "n_uncertain": len(uncertain),
                       "fraction_uncertain": len(uncertain) / len(frames), "std_max": float(std.max()),
                       "std_median": float(np.median(std.max(axis=(1, 2))))}
    with atomic_write(outdir / "trajectory_cartesian.out") as tmp:
        np.savetxt(tmp, predicted.reshape(len(frames), 9), fmt="%.10f")
    if std is not None:
        with atomic_write(outdir / "trajectory_std.out") as tmp:
            np.savetxt(tmp, std.reshape(len(frames), 9), fmt="%.10f")
    flagged, doubtful = set(far.tolist()), set(uncertain.tolist())
    for index, (atoms, tensor) in enumerate(zip(frames, predicted)):
        atoms.info[key] = tensor.ravel()
        # read by `hpo spectrum`, which says how much of its input was extrapolated
        atoms.info[EXTRAPOLATED_KEY] = index in flagged
        if std is not None:
            atoms.info[STD_KEY] = std[index].ravel()
            atoms.info[STD_MAX_KEY] = float(std[index].max())
            atoms.info[UNCERTAIN_KEY] = index in doubtful
    with atomic_write(outdir / "trajectory_polarizability.xyz") as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    time_fs = np.array([a.info.get("time_fs", index) for index, a in enumerate(frames)], dtype=float)
    figure = plots.tensor_components_plot(
        outdir / "polarizability.png", time_fs, predicted, f"{model_kind.display_name} {uri} on {trajectory.name} ({len(frames)} frames)"
    )

    table, metrics = comparison_table(predicted, reference)
    metrics.update(frames_per_s=frames_per_s, n_frames=len(frames), n_outside=len(far), fraction_outside=len(far) / len(frames), max_asymmetry=float(np.abs(predicted - predicted.transpose(0, 2, 1)).max()))
    metrics.update(uncertainty)
    run_id = tracker.start_run("polarize", tags={"command": "polarize", "run_type": "polarize", "model_uri": uri, "trajectory": str(trajectory), **provenance_tags()})
    tracker.log(run_id, metrics=metrics)
    if std is not None:
        tracker.log_history(run_id, {"polarizability_std_max": std.max(axis=(1, 2))}, range(len(frames)))
    tracker.log_artifacts(run_id, [outdir / "trajectory_cartesian.out", outdir / "trajectory_std.out", outdir / "trajectory_polarizability.xyz", figure])
    tracker.end_run(run_id)
    print(f"[hpo] polarizability of {len(frames)} frames of {trajectory} in {outdir} (MLflow run {run_id})")
    print(f"  predicted vs training data ({train_name}):\n{table}")
    if len(far):
        print(
            f"[hpo] warning: {len(far)} frame(s) ({len(far) / len(frames):.1%}) lie more than {settings.outlier_sigma} training std from the training mean "
            f"(first: {far[:10].tolist()}): the model extrapolates there",
            flush=True,
        )
    if len(uncertain):
        print(
            f"[hpo] warning: {len(uncertain)} frame(s) ({len(uncertain) / len(frames):.1%}) have a predictive std above "
            f"{uncertainty['uncertainty_threshold']:.3g} ({settings.uncertainty_factor:g} x the largest on {validation_name}; first: {uncertain[:10].tolist()})",
            flush=True,
        )
    return {"outdir": outdir, "tensors": predicted, "std": std, **metrics}
