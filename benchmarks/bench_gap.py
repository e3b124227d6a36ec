"""What a GAP trial costs besides gap_fit, and how fast hpo evaluates a fitted GAP.

1. Per-trial overhead at each training-set size: one real trial of the hand-tuned defaults through
   ``hpo.search.loop.run`` with ``model.solver=gap_fit`` (Optuna, MLflow and all) in a temporary directory;
   overhead = (trial wall time - gap_fit time) / gap_fit time.
2. Evaluation throughput on the validation frames with the model fitted at the first size:
   the plain quippy calculator loop against hpo's path (hpo.models.gap.sparse_gap, descriptors not cached),
   and the largest energy difference between the two.

    python benchmarks/bench_gap.py [--sizes 50 200]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from hpo.search import loop
from hpo.config import load_config, output_overrides
from hpo.data import load_datasets
from hpo.models.gap.sparse_gap import SparseGap


def one_trial(root: Path, train_size: int) -> tuple[float, float, Path]:
    """Wall time and gap_fit time of one default trial, and the model it fitted."""
    cfg = load_config(
        [
            *output_overrides(root),
            f"dataset.train_size={train_size}",
            "study.n_trials=1",
            "model.solver=gap_fit",  # this benchmark measures the overhead around gap_fit
        ]
    )
    study = loop.run(cfg)
    trial = study.trials[0]
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    fit_time = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics["fit_time_s"]
    return wall, fit_time, Path(trial.user_attrs["model_files"][0])


def quippy_loop(model_file: Path, frames) -> float:
    """Frames per second of the plain quippy calculator loop (energies), Potential parsing included."""
    from quippy.potential import Potential

    start = time.perf_counter()
    potential = Potential(param_filename=str(model_file))
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = potential
        atoms.get_potential_energy()
    return len(frames) / (time.perf_counter() - start)


def project_path(model_file: Path, frames) -> float:
    """Frames per second of hpo's evaluation with nothing cached: read the XML, descriptors, numpy.

    In a trial the descriptors are computed while gap_fit runs, so the trial waits only for the rest.
    """
    start = time.perf_counter()
    SparseGap.read(model_file).predict(frames)
    return len(frames) / (time.perf_counter() - start)


def max_difference(model_file: Path, frames) -> float:
    from quippy.potential import Potential

    potential = Potential(param_filename=str(model_file))
    reference = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = potential
        reference.append(atoms.get_potential_energy())
    return float(np.abs(SparseGap.read(model_file).predict(frames) - np.array(reference)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        rows, first_model = [], None
        for size in args.sizes:
            wall, fit_time, model_file = one_trial(Path(tmp) / f"n{size}", size)
            first_model = first_model or model_file
            rows.append((size, wall, fit_time))
        cfg = load_config([])
        frames = load_datasets(cfg).val.frames
        plain = quippy_loop(first_model, frames)
        ours = project_path(first_model, frames)
        difference = max_difference(first_model, frames)
    print()
    for size, wall, fit_time in rows:
        print(f"{size:4d} snapshots: trial {wall:7.1f} s, gap_fit {fit_time:7.1f} s, overhead ratio {(wall - fit_time) / fit_time:.3f}")
    print(f"evaluation of {len(frames)} validation frames: quippy loop {plain:.1f} frames/s, hpo {ours:.1f} frames/s")
    print(f"largest energy difference hpo - quippy: {difference:.2e} eV")
    print(f"evaluation speed-up {ours / plain:.2f}x; overhead ratio at {rows[0][0]} snapshots {(rows[0][1] - rows[0][2]) / rows[0][2]:.3f}")


if __name__ == "__main__":
    main()
