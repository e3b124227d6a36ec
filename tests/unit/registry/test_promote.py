"""Tests of hpo.registry.promote: the champion registered with its lineage, the stability gate, test errors,
the gap_fit refit of a numpy-solved trial.

Everything runs the real engines on the tiny water slices: gap_fit, quippy's calculator in ASE's
dynamics, Optuna and MLflow. The tiny study of two trials is a real case for the gate: its best
trial (by validation energy RMSE) pulls a hydrogen off its oxygen within 100 NVE steps from
validation frame 0, while the hand-tuned default trial stays within the training distances."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
import ase.io
import mlflow

from hpo.registry import promote as hpo_promote
from hpo.registry.resolve import PromoteError
from hpo.search import loop, storage
from hpo.search.selection import primary
from hpo import serving

from helpers import runs_of, ranked

# slow (pyproject.toml markers): every test promotes from a real study
pytestmark = pytest.mark.slow


def screen_runs(cfg):
    _, children = runs_of(cfg)
    return {int(r.data.tags["trial"]): r for r in children if r.data.tags.get("run_type") == "md_screen"}


# --------------------------------------------------------------------------- #
# promote: the stability gate and the test errors
# --------------------------------------------------------------------------- #
def test_no_screening_and_no_test_split(tiny_study, capsys):
    """k=0 turns the gate off; training on every frame of the test file leaves no test split, and promote says so."""
    cfg = tiny_study("promote.screen.k=0", "dataset.test_file=gap_input_50.xyz", "promote.alias=unscreened")
    lineage = hpo_promote.promote(cfg)
    out = capsys.readouterr().out
    assert "md_stable" not in lineage and "screening" not in out
    assert "no test split" in out and lineage["test_split"] == "none"
    assert not any(k.startswith("test_") and k != "test_split" for k in lineage)


def test_gate_with_no_stable_candidate_stops_naming_it(tiny_study):
    """k=1 screens only the best trial, which loses a hydrogen: nothing is registered, the run FAILED."""
    cfg = tiny_study("promote.screen.k=1", "promote.alias=gate-none")
    best = ranked(cfg)[0]
    with pytest.raises(PromoteError) as caught:
        hpo_promote.promote(cfg)
    message = str(caught.value)
    assert f"trial {best.number}: start frame 0: H-O nearest-neighbour distance" in message
    assert "training range" in message and "Nothing registered" in message
    screens = screen_runs(cfg)
    assert screens[best.number].data.tags["md_stable"] == "false"
    client = MlflowClient(cfg.tracking.tracking_uri)
    promote_run = client.get_run(screens[best.number].data.tags["mlflow.parentRunId"])
    assert promote_run.data.tags["run_type"] == "promote" and promote_run.info.status == "FAILED"
    with pytest.raises(Exception):
        client.get_model_version_by_alias("water-gap", "gate-none")


def test_gate_registers_the_best_stable_candidate_with_test_errors(tiny_study, capsys):
    """k=2: the best trial is unstable, the second (the hand-tuned default) is stable and is registered,
    tagged md_stable=true, with its test errors and the figures of its screen."""
    cfg = tiny_study("promote.screen.k=2")
    best, second = ranked(cfg)
    lineage = hpo_promote.promote(cfg)
    out = capsys.readouterr().out
    assert lineage["trial"] == second.number and lineage["md_stable"] == "true"
    screens = screen_runs(cfg)
    assert screens[best.number].data.tags["md_stable"] == "false" and screens[second.number].data.tags["md_stable"] == "true"
    assert all(r.data.tags["mlflow.parentRunId"] for r in screens.values())

    client = MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version_by_alias("water-gap", "champion")
    tags = version.tags
    assert tags["trial"] == str(second.number) and tags["md_stable"] == "true"
    assert f"trial {best.number}: start frame 0: H-O" in tags["screened"]
    assert float(tags["test_energy_rmse"]) > 0 and float(tags["test_energy_rmse_per_atom"]) > 0
    assert tags["train_size"] == "10" and tags["test_size"] == "10" and len(tags["test_split_sha256"]) == 64
    assert tags["default_trial"] == str(second.number) and tags["default_test_energy_rmse"] == tags["test_energy_rmse"]
    # its std calibrated on validation (the scale stored in the model), coverage recorded on test
    assert float(tags["std_scale"]) > 0 and 0 <= float(tags["test_energy_coverage_1std"]) <= 1
    assert 0 <= float(tags["test_energy_raw_coverage_2std"]) <= 1 and "calibration_energy.png" in {f.path for f in client.list_artifacts(version.run_id)}
    assert tags["screen_stable_ranked"] == str(second.number)
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test_energy_rmse"] == pytest.approx(float(tags["test_energy_rmse"]), rel=1e-5)
    figures = {f.path for f in client.list_artifacts(version.run_id, "screen")}
    assert "screen/distance_bands.png" in figures
    assert f"validation {primary(second):.5g}, test {float(tags['test_energy_rmse']):.4g}" in out and "(eV per cell" in out

    # the same promotion again reuses the version (the pipeline relies on it)
    again = hpo_promote.promote(cfg)
    assert again["version"] == version.version


def test_promote_trial_registers_an_unstable_model_with_a_warning(tiny_study, capsys):
    cfg = tiny_study(f"promote.trial={ranked(tiny_study())[0].number}", "promote.alias=forced")
    best = ranked(cfg)[0]
    lineage = hpo_promote.promote(cfg)
    out = capsys.readouterr().out
    assert lineage["trial"] == best.number and lineage["md_stable"] == "false"
    assert f"warning: promote.trial={best.number} is not stable in MD" in out
    version = MlflowClient(cfg.tracking.tracking_uri).get_model_version_by_alias("water-gap", "forced")
    assert version.tags["md_stable"] == "false" and "H-O nearest-neighbour" in version.tags["md_stability_reason"]
    assert float(version.tags["test_energy_rmse"]) > 0 and float(version.tags["default_test_energy_rmse"]) > 0


def test_promote_registers_champion_with_lineage(promoted):
    cfg, lineage = promoted
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version_by_alias("water-gap", "champion")
    assert version.version == lineage["version"]
    tags = version.tags
    assert tags["study"] == cfg.study.name
    assert tags["trial"] == str(lineage["trial"])
    assert "sha256.gap_input_50.xyz" in tags and "gap_fit_command" in tags
    assert "version.quippy-ase" in tags and "param.n_max" in tags
    # screened (promote.screen, k=3 of 2 trials) and evaluated once on the test split
    assert tags["md_stable"] == "true" and "screened" in tags
    assert float(tags["test_energy_rmse"]) > 0 and tags["train_file"] == "gap_input_50.xyz"

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/water-gap@champion")
    validation = f"{cfg.dataset.data_dir}/gap_validate.xyz"
    frames = ase.io.read(validation, ":")
    predicted = model.predict(serving.structures_input(frames))
    assert list(predicted.columns) == ["energy", "forces"] and len(predicted) == 6
    assert np.all(np.isfinite(predicted["energy"])) and np.shape(predicted["forces"][0]) == (12, 3)
    # the same model from Python with its calibrated posterior std (scikit-learn's return_std)
    import hpo

    numpy_energies, std = hpo.load_model("models:/water-gap@champion", cfg.tracking.tracking_uri).predict(frames, return_std=True)
    assert np.abs(numpy_energies - np.asarray(predicted["energy"], dtype=float)).max() < 1e-6 and std.shape == (6,) and np.all(std > 0)

    again = hpo_promote.promote(cfg)  # same trial: reuses the version, no duplicate
    assert again["version"] == lineage["version"]


def test_promote_bad_inputs(tiny_cfg, tiny_overrides, tmp_path):
    with pytest.raises(storage.StudyError, match="no study named 'nothing-here'"):
        hpo_promote.promote(tiny_cfg("study.name=nothing-here", "study.n_trials=1"))
    # gap_fit aborts on sparse_method=uniform for descriptors of more than 30 dimensions (n_max >= 2, l_max 2: 31)
    cfg = tiny_cfg("study.n_trials=1", "study.name=all-fail", "model.solver=gap_fit", "model.sparse_method=uniform",
                   "~search.space", "+search.space={n_max:{type:int,low:2,high:3}}")
    with pytest.raises(storage.StudyError, match=r"4 of 4 trials failed \(study.max_failure_rate=0.5\)"):
        loop.run(cfg)
    with pytest.raises(PromoteError, match="has no finished trial"):
        hpo_promote.promote(cfg)
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "md", *tiny_overrides, "md.model_uri=models:/water-gap@missing"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 2 and "does not resolve" in done.stderr


def test_numpy_solved_trial_is_refitted_by_gap_fit_at_promotion(tiny_cfg):
    cfg = tiny_cfg("study.n_trials=2", "promote.screen.k=0")
    study = loop.run(cfg)
    assert {t.user_attrs.get("model_files") is not None for t in study.trials} == {True}
    lineage = hpo_promote.promote(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version("water-gap", lineage["version"])
    assert "gap_fit" in version.tags["gap_fit_command"] and "sparse_method=index_file" in version.tags["gap_fit_command"]
    promote_run = client.get_run(version.run_id)
    # gap_fit, handed hpo's sparse points, fits the model the numpy solver fitted
    assert promote_run.data.metrics["refit_max_energy_difference_eV"] < 1e-6
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (registered,) = list(model_dir.rglob("gap.xml"))
    assert "GAP_hpo" not in registered.read_text()[:500]  # gap_fit's own XML, not the one hpo's solver wrote


def test_promotion_registers_hpos_model_when_gap_fit_would_pass_the_budget(tiny_cfg):
    """A budget gap_fit's refit of the whole training set would pass, while a subset fits: hpo's own model is
    registered, after gap_fit and hpo's solver agreed on that subset; the choice and the check are recorded."""
    from hpo.config import model_params
    from hpo.data import load_datasets
    from hpo.models.gap.kind import gap_fit_memory_bytes

    cfg = tiny_cfg("study.n_trials=1", "promote.screen.k=0", "study.name=own-model")
    study = loop.run(cfg)
    params = {**model_params(cfg), **study.best_trial.params}
    frames = load_datasets(cfg).train.frames
    budget_gb = (gap_fit_memory_bytes(params, frames) + gap_fit_memory_bytes(params, frames[: len(frames) // 2])) / 2 / 1e9
    lineage = hpo_promote.promote(tiny_cfg("study.n_trials=1", "promote.screen.k=0", "study.name=own-model", f"model.memory_budget_gb={budget_gb}"))
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version("water-gap", lineage["version"])
    figures = client.get_run(version.run_id).data.metrics
    assert figures["production_gap_fit_refit"] == 0.0 and figures["refit_estimate_gb"] > budget_gb
    assert len(frames) // 2 <= figures["check_frames"] < len(frames)
    assert figures["check_max_energy_difference_eV"] < 1e-6
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (registered,) = list(model_dir.rglob("gap.xml"))
    assert "GAP_hpo" in registered.read_text()[:500]  # the XML hpo's solver wrote, in gap_fit's layout


def test_runs_record_the_datasets_they_saw(promoted):
    """Every trial run and the promote run list their data files as MLflow dataset inputs (the UI's Dataset column)."""
    cfg, lineage = promoted
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version("water-gap", lineage["version"])
    contexts = {d.dataset.name: [t.value for t in d.tags] for d in client.get_run(version.run_id).inputs.dataset_inputs}
    assert contexts == {"gap_input_50.xyz": ["training"], "gap_validate.xyz": ["validation"], "gap_input_400-minus-gap_input_50.xyz": ["test"]}
    trial_run = client.get_run(lineage["trial_run_id"])
    assert {d.dataset.name for d in trial_run.inputs.dataset_inputs} == {"gap_input_50.xyz", "gap_validate.xyz"}
    assert {d.dataset.digest for d in trial_run.inputs.dataset_inputs} == {lineage["sha256.gap_input_50.xyz"][:16], lineage["sha256.gap_validate.xyz"][:16]}
