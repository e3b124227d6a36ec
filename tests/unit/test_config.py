"""Tests of hpo.config: each bad config value fails with its key, its value and what is allowed."""

from __future__ import annotations

import pytest

from hpo import config as hpo_config
from hpo.config import ConfigError, validate

from helpers import make_cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.cutoff=-1.0", "model.cutoff=-1.0 is not allowed: a positive number"),
        ("model.n_max=0", "model.n_max=0 is not allowed: an integer >= 1"),
        ("model.atom_sigma=6.0", "model.atom_sigma=6.0 is not allowed: smaller than the cutoff"),
        ("model.covariance_type=cosine", "model.covariance_type='cosine' is not allowed: one of"),
        ("study.sampler=annealing", "study.sampler='annealing' is not allowed: one of ('tpe', 'random', 'grid')"),
        ("promote.screen.ensemble=npt", "promote.screen.ensemble='npt' is not allowed: one of ('nve', 'nvt')"),
        ("spectrum.correction=quantum", "spectrum.correction='quantum' is not allowed: one of ('harmonic',)"),
        ("promote.screen.k=-1", "promote.screen.k=-1 is not allowed: an integer >= 0 (0: no screening)"),
        ("promote.screen.start_frames=[]", "promote.screen.start_frames=[] is not allowed: indices into the validation file"),
        ("promote.within=-0.1", "promote.within=-0.1 is not allowed: a fraction >= 0 of the best metric"),
        ("model.kind=nequip", "model.kind='nequip' is not allowed"),
        ("dataset.train_size=75", "dataset.train_size=75 is not allowed: one of [50, 100, 200, 400]"),
        ("search.space.cutoff.low=seven", "search.space.cutoff.low='seven' is not allowed: a number"),
        ("search.space.cutoff.low=7.0", "search.space.cutoff.low=7.0 is not allowed: low <= high"),
        ("++search.space.cutoff={type:float,low:-1.0,high:3.0,log:true}", "search.space.cutoff.low=-1.0 is not allowed: a positive number when log"),
        ("search.space.n_max.low=0", "search.space.n_max.low=0 is not allowed: a value model.n_max may take"),
        ("+search.space.bogus={type:float,low:0,high:1}", "search.space.bogus="),
    ],
)
def test_config_errors_name_key_value_and_allowed(tiny_cfg, override, message):
    with pytest.raises(ConfigError) as error:
        hpo_config.validate(tiny_cfg(override))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{cutof:2.0}", "model.descriptors.0.cutof is not a descriptor key"),
        ("{cutoff:-2.0}", "model.descriptors.0.cutoff=-2.0 is not allowed: a positive number"),
        ("{cutoff:2.0,atom_sigma:3.0}", "model.descriptors.0.atom_sigma=3.0 is not allowed: smaller than the cutoff (2.0)"),
        ("{descriptor:distance_2b}", "model.descriptors.0.descriptor='distance_2b' is not allowed: one of ('soap',)"),
    ],
)
def test_a_bad_descriptor_entry_is_named(tiny_cfg, entry, message):
    from hpo import config as hpo_config
    from hpo.models.base import ConfigError

    with pytest.raises(ConfigError) as error:
        hpo_config.validate(tiny_cfg(f"model.descriptors=[{entry}]"))
    assert message in str(error.value)


def test_bad_objectives_are_refused(tiny_cfg):
    with pytest.raises(ConfigError, match=r"study\.objectives="):
        validate(tiny_cfg("study.objectives=[fit_time_s,val_energy_rmse]"))
    with pytest.raises(ConfigError, match=r"md_ms_per_atom only with model.cost_frames"):
        validate(tiny_cfg("study.objectives=[val_energy_rmse,md_ms_per_atom]"))
    with pytest.raises(ConfigError, match=r"study\.pruner="):
        validate(tiny_cfg("study.objectives=[val_energy_rmse,fit_time_s]", "study.fidelity_rungs=[0.5,1.0]", "study.pruner=hyperband"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["dataset=files", "dataset.val=v.xyz"], "dataset.train"),
        (["dataset=pool"], "dataset.files"),
        (["dataset=pool", "dataset.files=[a.xyz]", "dataset.split.val=0.6", "dataset.split.test=0.5"], "dataset.split"),
        (["dataset=pool", "dataset.files=[a.xyz]", "dataset.train_size=0"], "dataset.train_size"),
        (["dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz", "dataset.units.length=parsec"], "dataset.units.length"),
        (["dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz", "+dataset.keys.stress=S"], "dataset.keys.stress"),
        (["dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz", "dataset.e0=guess"], "dataset.e0"),
        (["study.loss.energy_weight=-1"], "study.loss.energy_weight"),
        (["model=sagpr", "study.metric=val_loss"], "study.metric"),
    ],
)
def test_bad_dataset_config_names_key_and_allowed(overrides, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")) as error:
        validate(make_cfg(tmp_path, *overrides))
    assert "is not allowed" in str(error.value) or "is not a key" in str(error.value)


def test_dataset_defaults(tmp_path):
    water = make_cfg(tmp_path)
    assert water.study.name == "water-gap-50" and water.model.metric == "val_energy_rmse" and water.model.fit_forces is False
    own = make_cfg(tmp_path, "dataset=files", "dataset.train=t.xyz", "dataset.val=v.xyz")
    validate(own)
    assert own.study.name == "files-gap-all" and own.study.metric == "val_loss" and own.model.fit_forces is True
