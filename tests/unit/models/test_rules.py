"""Tests of hpo.models.rules: the constraint vocabulary."""

from __future__ import annotations

import pytest

from hpo.models.rules import allowed


@pytest.mark.parametrize(
    "name, value, ok",
    [("positive", 0.1, True), ("positive", 0, False), ("positive", float("nan"), False), ("count", 1, True),
     ("count", True, False), ("optional_count", None, True), ("non_negative_int", 0, True), (("a", "b"), "c", False),
     ("bool", False, True), ("bool", 0, False)],
)
def test_rules(name, value, ok):
    assert allowed(name, value) is ok
