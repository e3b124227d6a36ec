"""Fixtures shared by the unit tests: a promoted tiny study, a finished two-trial study."""

from __future__ import annotations

import pytest

from hpo.config import load_config, output_overrides
from hpo.registry import promote as hpo_promote
from hpo.search import loop

from helpers import TINY_GAP


@pytest.fixture(scope="session")
def tiny_study(tiny_data, tmp_path_factory):
    """A finished two-trial study (trial 0: the hand-tuned defaults); returns a config factory on its storage."""
    root = tmp_path_factory.mktemp("trust")
    # forces in the fit (the workshop force column, sigma 0.5): the case (best trial unstable, default
    # stable) was found with them; energy-only fits of 10 frames give two unstable trials here.
    # 10-frame models put a quarter of their MD frames beyond their own validation std (the uncertainty rule,
    # tested in models/gap/test_posterior.py, is recorded here and not judged): these tests are about the other rules
    overrides = [f"dataset.data_dir={tiny_data}", *output_overrides(root), *TINY_GAP, "study.n_trials=2", "model.solver=gap_fit", "model.fit_forces=true",
                 "md.stability.max_extrapolating_fraction=null"]
    loop.run(load_config(overrides))
    return lambda *extra: load_config([*overrides, *extra])


@pytest.fixture(scope="session")
def promoted_root(tiny_data, tmp_path_factory):
    """One promoted study shared by the tests that read it (promotion is the slow part)."""
    root = tmp_path_factory.mktemp("promoted")
    # gap_fit fitting forces too: its fits of these slices include a stable trial for the screen (see tiny_study)
    # (the uncertainty rule is recorded, not judged: 10-frame models extrapolate in a quarter of their MD frames)
    overrides = [f"dataset.data_dir={tiny_data}", *output_overrides(root), *TINY_GAP, "model.solver=gap_fit", "model.fit_forces=true",
                 "md.stability.max_extrapolating_fraction=null"]
    cfg = load_config([*overrides, "study.n_trials=2"])
    loop.run(cfg)
    return overrides, cfg, hpo_promote.promote(cfg)


@pytest.fixture
def promoted(promoted_root):
    _, cfg, lineage = promoted_root
    return cfg, lineage


@pytest.fixture
def promoted_cfg(promoted_root):
    overrides = promoted_root[0]
    return lambda *extra: load_config([*overrides, *extra])
