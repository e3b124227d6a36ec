"""Tests of hpo.search.space: parameters searched by path, parameters that cannot change the fit left out."""

from __future__ import annotations

import pytest
from pathlib import Path

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.search import loop

from helpers import runs_of


@pytest.mark.slow
def test_a_second_descriptor_is_searched_by_its_path(tiny_cfg):
    """model.descriptors adds a short SOAP beside the model's own; the search samples its cutoff by path
    (descriptors.0.cutoff), the trial fits both (two index files per species) and records the sampled value."""
    cfg = tiny_cfg(
        "study.n_trials=2",
        "model.descriptors=[{cutoff:2.0,atom_sigma:0.4,n_sparse:8,delta:0.3,zeta:3}]",
        "~search.space",
        "+search.space={descriptors.0.cutoff:{type:float,low:1.5,high:2.5}}",
    )
    study = loop.run(cfg)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    assert trials[0].params["descriptors.0.cutoff"] == 2.0  # the enqueued default: the config's entry
    assert 1.5 <= trials[1].params["descriptors.0.cutoff"] <= 2.5
    _, children = runs_of(cfg)
    for child in children:
        artifacts = {a.path for a in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(child.info.run_id)}
        assert {f"sparse_{i}.idx" for i in range(4)} <= artifacts  # 2 descriptors x 2 species (O, H)
        assert float(child.data.params["descriptors.0.cutoff"]) == trials[int(child.data.tags["trial_number"])].params["descriptors.0.cutoff"]
    xml = Path(study.best_trial.user_attrs["workdir"]) / "gap.xml"
    assert xml.read_text().count("<gpCoordinates") == 4


def test_search_leaves_out_parameters_that_cannot_change_the_fit(capsys):
    """Energy-only GAP fits (the workshop default) have no force targets: default_sigma.force is no dimension."""
    from hpo.config import load_config
    from hpo.search.space import search_space

    names = [p.name for p in search_space(load_config([]))]
    assert "default_sigma.force" not in names and "default_sigma.energy" in names
    assert "default_sigma.force left out (model.fit_forces=false" in capsys.readouterr().out
    assert "default_sigma.force" in [p.name for p in search_space(load_config(["model.fit_forces=true"]), quiet=True)]
