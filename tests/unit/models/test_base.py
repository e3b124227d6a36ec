"""Tests of hpo.models.base: the failure reasons are one vocabulary, checked wherever a reason is recorded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hpo

from hpo.models.base import FAILURE_REASONS, MemoryBudgetExceeded, TimeBudgetExceeded, TrialFailure, failure_reason
from hpo.search.objective import classify


def test_failure_reason_is_a_word_of_the_vocabulary_with_an_optional_detail():
    assert failure_reason("killed") == "killed"
    assert failure_reason("killed: SIGKILL, likely out of memory (peak 2.50 GB)").startswith("killed: ")
    for unknown in ("oom", "killed by SIGKILL", "Killed", ""):
        with pytest.raises(ValueError, match="add it to FAILURE_REASONS"):
            failure_reason(unknown)
    with pytest.raises(ValueError, match="unknown failure reason 'oom'"):
        TrialFailure("oom", "a reason nobody filters by")


def test_every_reason_the_code_records_is_in_the_vocabulary():
    """The literal reasons of src/hpo (TrialFailure and its subclasses, budget refusals, classify's outcomes,
    the study's failure_rate) are exactly FAILURE_REASONS: none missing, none unused."""
    source = "\n".join(p.read_text() for p in Path(hpo.__file__).parent.rglob("*.py"))
    raised = set(re.findall(r"(?:TrialFailure|GapFitError)\(\s*\"(\w+)\"", source))
    recorded = set(re.findall(r"failure_reason\(\"(\w+)\"\)", source)) | set(re.findall(r"^\s+reason = \"(\w+)\"$", source, re.M))
    classified = {classify(exc) for exc in (KeyboardInterrupt(), ValueError(), MemoryError(), RuntimeError(), TrialFailure("timeout", ""))}
    budgets = {MemoryBudgetExceeded.reason, TimeBudgetExceeded.reason}
    found = raised | recorded | classified | budgets
    assert {"gap_fit_error", "killed", "failure_rate", "pruned", "invalid_params", "error", "interrupted"} <= found
    assert found <= set(FAILURE_REASONS), found - set(FAILURE_REASONS)
    assert found == set(FAILURE_REASONS), set(FAILURE_REASONS) - found
