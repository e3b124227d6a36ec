"""The MACE kind (hpo/models/mace/) end to end with the real mace-torch on the EMT set of emt_data.py: a study
whose pruner stops a weak trial by epoch, promotion with the MD screen MACE's calculator drives and the test
errors, and ``hpo md`` with the champion. A tiny network (8 channels) for 3 epochs: each fit takes about 10 s,
most of it the training child importing torch and mace-torch. Real Optuna, MLflow, ASE and torch; nothing mocked.
Needs mace-torch (the ``mace`` extra, which the ``test`` extra installs): a missing install fails, never skips."""

from __future__ import annotations

import ase.io
import mlflow
import numpy as np
import pytest

from emt_data import write_emt_dataset
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo import md, serving
from hpo.analysis import report
from hpo.config import ConfigError, load_config, output_overrides, validate
from hpo.registry.promote import promote
from hpo.search import loop
from hpo.search.storage import open_study

# the MACE predictions, screen and MD in this process on one thread, as threads=1 asks (conftest)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

EPOCHS = 3
TINY = [f"model.max_num_epochs={EPOCHS}", "model.num_channels=8", "model.batch_size=4", "model.fit_timeout_s=600", "model.cost_frames=2"]
# one searched parameter keeps the sampled trial cheap; the pruning test enqueues its trials by hand
SPACE = ["~search.space", "+search.space.lr={type:float,low:0.005,high:0.02,log:true}"]
# a learning rate this small leaves the network where it started: its first epoch's error is the worst
BAD_LR = 1e-7


def test_a_size_rung_is_refused_for_a_kind_pruned_by_epoch(tmp_path):
    """The kind's fidelity is the epoch: a pruner needs no fidelity rungs, and rungs of training subsets are refused."""
    base = [*output_overrides(tmp_path), "model=mace", "search=mace", "dataset=files", "dataset.train=a.xyz", "dataset.val=b.xyz"]
    validate(load_config([*base, "study.pruner=successive_halving"]))  # no rungs needed
    with pytest.raises(ConfigError, match="fidelity_rungs"):
        validate(load_config([*base, "study.pruner=successive_halving", "study.fidelity_rungs=[0.5,1.0]"]))


def test_mace_study_prunes_by_epoch_promotes_and_runs_md(tmp_path):
    emt = write_emt_dataset(tmp_path / "emt")
    base = [*output_overrides(tmp_path), "dataset=files", f"dataset.train={emt['train']}", f"dataset.val={emt['val']}",
            f"dataset.test={emt['test']}", "model=mace", "search=mace", *TINY, *SPACE, "threads=1"]
    cfg = load_config([*base, "study.n_trials=3", "study.pruner=successive_halving", "study.sampler=random"])
    # trial 0 the default, trial 1 a learning rate that cannot learn: successive halving (reduction factor 2)
    # compares it with trial 0 after epoch 1 and stops it there
    study = open_study(cfg, [], n_train=1)
    study.enqueue_trial({"lr": 0.01}, user_attrs={"is_default": True})
    study.enqueue_trial({"lr": BAD_LR})
    study = loop.run(cfg)

    trials = study.get_trials()
    assert len(trials) == 3 and trials[0].state == TrialState.COMPLETE
    bad = trials[1]
    assert bad.state == TrialState.PRUNED and bad.user_attrs["pruned_at_epoch"] == 1
    assert sorted(bad.intermediate_values) == [1]
    assert sorted(trials[0].intermediate_values) == list(range(1, EPOCHS + 1))  # one value per epoch
    assert bad.intermediate_values[1] > trials[0].intermediate_values[1]
    assert trials[0].user_attrs["md_ms_per_atom"] > 0 and trials[0].user_attrs["epochs_done"] == EPOCHS
    # the seed is the study's, recorded; the epochs in MLflow's history, step = epoch
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.data.params["seed"] == str(cfg.study.seed)
    history = client.get_metric_history(run.info.run_id, "val_force_rmse")
    assert {m.step for m in history} >= set(range(1, EPOCHS + 1))
    pruned_run = client.get_run(bad.user_attrs["mlflow_run_id"])
    assert pruned_run.data.tags["state"] == "PRUNED" and pruned_run.data.tags["pruned_at_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(pruned_run.info.run_id, "val_energy_rmse")] == [1]

    lineage = promote(load_config([*base, "promote.screen.k=2", "promote.screen.steps=10"]))
    assert lineage["name"] == "files-mace" and lineage["param.kind"] == "mace"
    assert lineage["md_stable"] == "true" and float(lineage["test_energy_rmse"]) > 0 and float(lineage["test_force_rmse"]) > 0
    # the registered pyfunc: energies and forces per structure, the kind's own requirements pinned
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    requirements = open(mlflow.pyfunc.get_model_dependencies("models:/files-mace@champion")).read()
    assert "torch==2.13.0\n" in requirements and "mace-torch==" in requirements
    frames = ase.io.read(emt["test"], ":3")
    predicted = mlflow.pyfunc.load_model("models:/files-mace@champion").predict(serving.structures_input(frames))
    assert np.all(np.isfinite(predicted["energy"])) and np.shape(predicted["forces"][0]) == (len(frames[0]), 3)
    screen = client.search_runs([run.info.experiment_id], "tags.run_type = 'md_screen'")
    assert screen and "uncertainty: not available" in screen[0].data.tags["start0.md_stability_bounds"]

    result = md.main(load_config([*base, "md.steps=10"]))  # models:/files-mace@champion, MACECalculator
    assert result["steps_completed"] == 10 and result["md_stable"]

    page = report.write_report(load_config(base))
    assert "parity_energy.png" in {path.name for path in page.figures} and page.html.is_file()
