"""Tests of hpo.schema: unknown, missing and mistyped keys refused."""

from __future__ import annotations

import pytest

from hpo.config import ConfigError


@pytest.mark.parametrize(
    "override, message",
    [
        ("+study.n_trial=5", "study.n_trial is not a key of the study config (did you mean study.n_trials?)"),
        ("+model.cuttoff=3", "model.cuttoff is not a parameter of model 'gap' (did you mean model.cutoff?)"),
        ("study.n_trials=abc", "study.n_trials: Value 'abc' of type 'str' could not be converted to Integer"),
        ("~study.cv_folds", "study.cv_folds is missing from conf/study/"),
    ],
)
def test_typed_config_refuses_unknown_missing_and_mistyped_keys(override, message):
    from hpo import schema
    from hpo.config import load_config

    with pytest.raises(ConfigError) as raised:
        schema.check(load_config([override]))
    assert message in str(raised.value)
