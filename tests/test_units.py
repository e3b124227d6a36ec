"""Fast tests of pure logic: no fit, no subprocess (the end-to-end tests cover the engines)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo.config import CONF_DIR, ConfigError
from hpo.models import kind
from hpo.models.gap import gap_fit
from hpo.models.gap.descriptors import descriptor_key
from hpo.models.rules import allowed, sklearn_constraints
from hpo.models.sagpr.estimator import SAGPR
from hpo.models.sagpr.parameters import ESTIMATOR_KEYS, PARAMETERS
from hpo.redact import redact, redact_text
from hpo.search.selection import cheapest_within, failure_verdict
from hpo.search.storage import trial_seed

# gap.yaml reads its own-data defaults (fit_forces, metric) from the dataset group: resolved here without one
GAP_PARAMS = OmegaConf.to_container(
    OmegaConf.create({"experiments_dir": "experiments", "dataset": {}, "model": OmegaConf.load(CONF_DIR / "model" / "gap.yaml")}), resolve=True
)["model"]
SAGPR_PARAMS = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "sagpr.yaml"))["model"]


def test_build_command_spells_every_gap_fit_argument():
    keys = SimpleNamespace(energy="energy", force="force")
    command = gap_fit.build_command(GAP_PARAMS, "train.xyz", {"O": -2026.4, "H": -12.1}, keys, seed=0)
    assert command[0] == "gap_fit" and "at_file=train.xyz" in command
    gap = next(a for a in command if a.startswith("gap="))
    assert gap.startswith("gap={soap l_max=6 n_max=4 atom_sigma=0.3 cutoff=5.0")
    assert "default_sigma={0.01 0.5 0.0 0.0}" in command
    assert "e0={H:-12.1:O:-2026.4}" in command  # species sorted
    assert "rnd_seed=1" in command  # gap_fit aborts on rnd_seed=0
    assert not any(a.startswith("config_file") for a in command)  # would silence every other argument
    energy_only = gap_fit.build_command(GAP_PARAMS, "train.xyz", {"H": 0.0}, keys, seed=0, energy_only=True)
    assert f"force_parameter_name={gap_fit.NO_FORCE_KEY}" in energy_only


def test_descriptor_key_ignores_gp_settings_and_spacing():
    a = "soap cutoff=3.0 n_max=2 l_max=2 n_sparse=20 delta=1.0 zeta=2 species_Z={8 1 }"
    b = "soap  l_max=2 cutoff=3.0 n_max=2 n_sparse=400 delta=0.1 zeta=4 species_Z={8  1}"
    assert descriptor_key(a) == descriptor_key(b)
    assert descriptor_key(a) != descriptor_key(a.replace("cutoff=3.0", "cutoff=3.5"))


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


@pytest.mark.parametrize(
    "name, value, ok",
    [("positive", 0.1, True), ("positive", 0, False), ("positive", float("nan"), False), ("count", 1, True),
     ("count", True, False), ("optional_count", None, True), ("non_negative_int", 0, True), (("a", "b"), "c", False),
     ("bool", False, True), ("bool", 0, False)],
)
def test_rules(name, value, ok):
    assert allowed(name, value) is ok


def test_gap_kind_refuses_impossible_combinations():
    with pytest.raises(ConfigError, match="atom_sigma=6.0 is not allowed: smaller than the cutoff"):
        kind("gap").check({**GAP_PARAMS, "atom_sigma": 6.0})
    with pytest.raises(ConfigError, match="model.kind='krr' is not allowed"):
        kind("krr")


def _study(values, costs=None, failed=0):
    study = optuna.create_study()
    dist = {"x": FloatDistribution(0, 1)}
    for i, value in enumerate(values):
        attrs = {"fit_time_s": costs[i]} if costs else {}
        study.add_trial(create_trial(value=value, params={"x": 0.5}, distributions=dist, user_attrs=attrs))
    for _ in range(failed):
        study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist, user_attrs={"failure": "gap_fit_error"}))
    return study


def test_failure_verdict_counts_failed_over_ended_trials():
    study_cfg = SimpleNamespace(min_trials_for_failure_rate=4, max_failure_rate=0.5)
    assert failure_verdict(_study([1.0, 2.0], failed=2), study_cfg) is None  # 2 of 4: not more than half
    verdict = failure_verdict(_study([1.0], failed=3), study_cfg)
    assert verdict.startswith("3 of 4 trials failed") and "gap_fit_error" in verdict
    assert failure_verdict(_study([], failed=3), study_cfg) is None  # too few ended trials to judge


def test_cheapest_within_trades_accuracy_for_cost():
    study = _study([0.100, 0.104, 0.120], costs=[10.0, 2.0, 1.0])
    assert cheapest_within(study, 0.05, "fit_time_s").values[0] == 0.104  # 0.120 is beyond 5 %
    assert cheapest_within(study, 0.0, "fit_time_s").values[0] == 0.100


def test_trial_seeds_differ_per_trial_and_repeat_per_study():
    assert trial_seed(0, 1) == trial_seed(0, 1)
    assert len({trial_seed(0, n) for n in range(100)}) == 100
    assert trial_seed(0, 1) != trial_seed(1, 1)


def test_redaction_hides_passwords_everywhere():
    url = "postgresql://alice:PLANTED@db.example:5432/hpo"
    assert "PLANTED" not in redact(url) and redact(url) == "postgresql://alice:***@db.example:5432/hpo"
    assert redact("https://bob:PLANTED@mlflow.example") == "https://bob:***@mlflow.example"
    assert redact("sqlite:///experiments/optuna.db") == "sqlite:///experiments/optuna.db"
    assert "PLANTED" not in redact_text("password authentication failed: PLANTED", url)


def test_import_graph_has_no_cycles():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    assert " 0 cycles" in done.stdout


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


def test_projected_process_routes_agree():
    """QR (more targets than sparse points) and the dual route (fewer) solve the same normal equations."""
    from hpo.models.sparse_gp import solve_projected_process

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    k_mm = x @ x.T + 1e-6 * np.eye(40)  # rank-deficient kernel plus jitter, as in a real fit
    for n in (25, 60):  # N < M: dual route; N >= M: QR
        k_nm = rng.normal(size=(n, 6)) @ x.T
        y = rng.normal(size=n)
        sigma = rng.uniform(0.1, 0.5, size=n)
        w = solve_projected_process(k_mm, k_nm, y, sigma)
        lhs = k_nm.T @ (k_nm / sigma[:, None] ** 2) + k_mm
        np.testing.assert_allclose(lhs @ w, k_nm.T @ (y / sigma**2), rtol=1e-6, atol=1e-8 * np.abs(lhs).max())


def test_search_leaves_out_parameters_that_cannot_change_the_fit(capsys):
    """Energy-only GAP fits (the workshop default) have no force targets: default_sigma.force is no dimension."""
    from hpo.config import load_config
    from hpo.search.space import search_space

    names = [p.name for p in search_space(load_config([]))]
    assert "default_sigma.force" not in names and "default_sigma.energy" in names
    assert "default_sigma.force left out (model.fit_forces=false" in capsys.readouterr().out
    assert "default_sigma.force" in [p.name for p in search_space(load_config(["model.fit_forces=true"]), quiet=True)]


def test_frame_ranges_hold_whole_frames_within_the_budget():
    from hpo.models.sagpr.features import frame_ranges

    counts = [3, 3, 5, 1, 10, 2]
    assert list(frame_ranges(counts, 6)) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # a 10-atom frame alone, not split
    assert list(frame_ranges(counts, 100)) == [(0, 6)]
    assert list(frame_ranges(counts, 6, start=2)) == [(2, 4), (4, 5), (5, 6)]
    assert list(frame_ranges([], 6)) == []
