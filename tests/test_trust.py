"""Models a chemist can trust: MD stability of every run, the stability gate of promote, test errors.

Everything runs the real engines on the tiny water slices: gap_fit, quippy's calculator in ASE's
dynamics, Optuna and MLflow. The tiny study of two trials is a real case for the gate: its best
trial (by validation energy RMSE) pulls a hydrogen off its oxygen within 100 NVE steps from
validation frame 0, while the hand-tuned default trial stays within the training distances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo import md as hpo_md
from hpo import stability
from hpo.config import load_config, output_overrides
from hpo.data import load_datasets
from hpo.models.gap.gap_fit import load
from hpo.registry import promote as hpo_promote
from hpo.registry.resolve import PromoteError
from hpo.search import loop
from hpo.search.selection import primary
from hpo.search.storage import load_study

from helpers import TINY_GAP, runs_of


@pytest.fixture(scope="module")
def tiny_study(tiny_data, tmp_path_factory):
    """A finished two-trial study (trial 0: the hand-tuned defaults); returns a config factory on its storage."""
    root = tmp_path_factory.mktemp("trust")
    # forces in the fit (the workshop force column, sigma 0.5): the case (best trial unstable, default
    # stable) was found with them; energy-only fits of 10 frames give two unstable trials here.
    # 10-frame models put a quarter of their MD frames beyond their own validation std (the uncertainty rule,
    # tested in test_variance.py, is recorded here and not judged): these tests are about the other rules
    overrides = [f"dataset.data_dir={tiny_data}", *output_overrides(root), *TINY_GAP, "study.n_trials=2", "model.solver=gap_fit", "model.fit_forces=true",
                 "md.stability.max_extrapolating_fraction=null"]
    loop.run(load_config(overrides))
    return lambda *extra: load_config([*overrides, *extra])


def ranked(cfg):
    study = load_study(cfg.study)
    return sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=primary)


def default_of(cfg):
    return next(t for t in ranked(cfg) if t.user_attrs.get("is_default"))


def model_file(trial) -> Path:
    return Path(trial.user_attrs["model_files"][0])


def screen_runs(cfg):
    _, children = runs_of(cfg)
    return {int(r.data.tags["trial"]): r for r in children if r.data.tags.get("run_type") == "md_screen"}


# --------------------------------------------------------------------------- #
# MD: stability is judged on every run
# --------------------------------------------------------------------------- #
def test_md_trace_with_a_broken_bond_is_unstable_at_its_step(tiny_study):
    """Real MD (the default trial's GAP, 20 steps logged every 2); then one hydrogen pushed onto its
    oxygen from the fifth logged frame on (MD step 8): md's judging path names that step and the H-O pair."""
    cfg = tiny_study("md.steps=20", "md.log_interval=2")
    default = default_of(cfg)
    data = load_datasets(cfg)
    ranges = stability.training_ranges(data.train.frames)
    _, trace, blow_up = hpo_md.run(data.val.frames[0], load(model_file(default)), cfg.md, Path(cfg.experiments_dir) / "md-intact")
    assert blow_up is None and trace.steps == list(range(0, 21, 2))

    intact = hpo_md.judge_trace(trace, ranges, cfg.md, Path(cfg.experiments_dir) / "md-intact")
    assert intact.verdict.stable and intact.metrics["md_stable"] == 1.0 and intact.tags["md_stable"] == "true"
    assert intact.verdict.last_step == 20 and "drift_meV_per_atom_per_ps" in intact.metrics
    assert (Path(cfg.experiments_dir) / "md-intact" / "distance_bands.png").is_file()

    hydrogen = trace.frames[0].get_chemical_symbols().index("H")
    for frame in trace.frames[4:]:
        oxygens = [i for i, s in enumerate(frame.get_chemical_symbols()) if s == "O"]
        vectors = frame.get_distances(hydrogen, oxygens, mic=True, vector=True)
        bond = vectors[np.argmin(np.linalg.norm(vectors, axis=1))]  # H -> its nearest O
        frame.positions[hydrogen] += bond * (1 - 0.3 / np.linalg.norm(bond))  # 0.3 Å from that O
    broken = hpo_md.judge_trace(trace, ranges, cfg.md)
    assert not broken.verdict.stable and broken.verdict.first_unstable_step == 8
    assert broken.verdict.reason.startswith("H-O nearest-neighbour distance 0.30 Å at step 8, training range")
    assert broken.tags["md_first_unstable_step"] == "8" and broken.metrics["first_unstable_step"] == 8.0


def test_md_main_records_verdict_and_costs(tiny_study, capsys):
    """``hpo md`` with a local model: the verdict, drift, distance bands and the cost assumptions are recorded."""
    cfg = tiny_study("md.steps=10", "md.reference_cost_s_per_frame=30", f"md.model_uri={model_file(default_of(tiny_study()))}")
    result = hpo_md.main(cfg)
    out = capsys.readouterr().out
    assert result["md_stable"] is True and result["verdict"].stable and result["first_unstable_step"] is None
    assert "MD stability" in out and "stable: every frame up to step 10" in out
    assert "ASSUMED md.reference_cost_s_per_step" in out and "search time UNKNOWN" in out
    # 10 training + 6 validation frames at an assumed 30 s each, no search time (a local file has no lineage)
    assert result["reference_data_cost_s"] == 16 * 30 and result["training_cost_s"] == 16 * 30
    assert "energy_drift_eV_per_atom_per_ps" not in result and "drift_meV_per_atom_per_ps" in result
    parents, _ = runs_of(cfg)
    run = next(r for r in parents if r.data.tags.get("run_type") == "md")
    assert run.info.status == "FINISHED" and run.data.tags["md_stable"] == "true"
    assert run.data.metrics["md_stable"] == 1.0 and "nn_min_H-O" in run.data.metrics and "train_nn_max_H-O" in run.data.metrics
    assert "ASSUMED" in run.data.tags["cost_assumptions"]
    artifacts = {f.path for f in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(run.info.run_id)}
    assert {"distance_bands.png", "nn_distances.csv", "md.png"} <= artifacts
    assert "md_stability_bounds" in run.data.tags and "literature default" in run.data.tags["md_stability_bounds"]


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
