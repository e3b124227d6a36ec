"""Tests of hpo.models.sagpr.parameters: one constraint table for the config and the estimator."""

from __future__ import annotations

import inspect

import pytest

from hpo.config import ConfigError
from hpo.models import kind
from hpo.models.rules import sklearn_constraints
from hpo.models.sagpr.estimator import SAGPR
from hpo.models.sagpr.parameters import ESTIMATOR_KEYS, PARAMETERS

from helpers import SAGPR_PARAMS


def test_one_constraint_table_for_config_and_estimator():
    # SA-GPR's estimator validates with the same table the config does: l_max=0 is refused by both.
    estimator = sklearn_constraints({key: PARAMETERS[key] for key in ESTIMATOR_KEYS})
    assert set(estimator) == set(ESTIMATOR_KEYS)
    assert {k: [str(c) for c in v] for k, v in estimator.items()} == {
        k: [str(c) for c in SAGPR._parameter_constraints[k]] for k in ESTIMATOR_KEYS
    }
    with pytest.raises(ConfigError, match=r"model.l_max=0 is not allowed: an integer >= 1"):
        kind("sagpr").check({**SAGPR_PARAMS, "l_max": 0})
    with pytest.raises(Exception, match="l_max"):
        SAGPR(l_max=0).fit([], [])
    # and the estimator's defaults are the config's, so no default hides in Python
    defaults = {name: p.default for name, p in inspect.signature(SAGPR).parameters.items() if name in ESTIMATOR_KEYS}
    assert defaults == {key: SAGPR_PARAMS[key] for key in ESTIMATOR_KEYS}
