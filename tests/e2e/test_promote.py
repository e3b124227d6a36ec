"""`hpo promote` end to end on own data (dataset=files): a study, its promotion with test_loss, MD with the
champion on the own frames."""

from __future__ import annotations

import pytest
from hpo.search import loop

from helpers import files_overrides, make_cfg

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


def test_own_data_study_promotes_with_test_loss(emt, tmp_path, capsys):
    from hpo.registry.promote import promote

    cfg = make_cfg(tmp_path, *files_overrides(emt), "study.n_trials=1", "promote.screen.k=1", "promote.screen.steps=10")
    loop.run(cfg)
    promote(cfg)
    out = capsys.readouterr().out
    assert "registered files-gap version 1" in out and "val_loss / test_loss" in out
    # MD with the champion starts from the own validation frames and judges stability on the own training set
    from hpo import md

    result = md.main(make_cfg(tmp_path, *files_overrides(emt), "md.steps=10"))
    assert result["steps_completed"] == 10 and "md_stable" in result
    assert {"train_nn_min_Cu-Cu", "nn_max_Cu-Cu"} <= set(result)
