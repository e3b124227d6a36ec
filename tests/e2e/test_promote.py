"""`hpo promote` end to end on own data (dataset=files): a study, its promotion with test_loss, MD with the
champion on the own frames."""

from __future__ import annotations

import pytest

from helpers import files_overrides, make_cfg

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow


def test_own_data_study_promotes_with_test_loss(promoted_emt_gap):
    """The session's promoted GAP (conftest ``promoted_emt_gap``: a one-trial study on the EMT set, screened)."""
    root, emt, lineage = promoted_emt_gap["root"], promoted_emt_gap["emt"], promoted_emt_gap["lineage"]
    assert "registered files-gap version 1" in promoted_emt_gap["printed"] and "val_loss / test_loss" in promoted_emt_gap["printed"]
    assert lineage["name"] == "files-gap" and float(lineage["test_loss"]) > 0 and lineage["md_stable"] in ("true", "false")
    # MD with the champion starts from the own validation frames and judges stability on the own training set
    from hpo import md

    result = md.main(make_cfg(root, *files_overrides(emt), "md.steps=10"))
    assert result["steps_completed"] == 10 and "md_stable" in result
    assert {"train_nn_min_Cu-Cu", "nn_max_Cu-Cu"} <= set(result)
