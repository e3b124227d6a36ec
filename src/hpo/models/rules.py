"""The vocabulary of parameter constraints: one table per model kind, written as data.

A rule is a string (``"positive"``, ``"count"``, ``"optional_count"``, ``"non_negative_int"``,
``"non_negative"``, ``"bool"``, ``"fraction"``, and ``"count_or_auto"``/``"positive_or_auto"`` for values a kind can derive
from the data: ``ModelKind.data_defaults``) or a tuple of allowed values. The same table checks the composed
config, every sampled trial and the estimator (``sklearn_constraints`` turns it into scikit-learn's
``_parameter_constraints``), so the three can never disagree.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Union

Rule = Union[str, tuple]

DESCRIPTIONS = {
    "positive": "a positive number",
    "non_negative": "a number >= 0",
    "count": "an integer >= 1",
    "optional_count": "null or an integer >= 1",
    "non_negative_int": "an integer >= 0",
    "bool": "true or false",
    "fraction": "a number in (0, 1]",
    "count_or_auto": "an integer >= 1 or auto (from the data)",
    "positive_or_auto": "a positive number or auto (from the data)",
    "optional_count_or_auto": "null, an integer >= 1 or auto",
}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def allowed(rule: Rule, value: Any) -> bool:
    """Whether ``value`` satisfies ``rule``."""
    if isinstance(rule, tuple):
        return value in rule
    if rule.endswith("_or_auto"):
        return value == "auto" or allowed(rule.removesuffix("_or_auto"), value)
    if rule == "bool":
        return isinstance(value, bool)
    if rule == "positive":
        return is_number(value) and value > 0
    if rule == "fraction":
        return is_number(value) and 0 < value <= 1
    if rule == "non_negative":
        return is_number(value) and value >= 0
    if rule == "optional_count" and value is None:
        return True
    integer = isinstance(value, int) and not isinstance(value, bool)
    return integer and value >= (0 if rule == "non_negative_int" else 1)


def describe(rule: Rule) -> str:
    """What ``rule`` allows, in words for an error message."""
    return DESCRIPTIONS[rule] if isinstance(rule, str) else f"one of {rule}"


def sklearn_constraints(table: dict[str, Rule]) -> dict[str, list]:
    """The same rules as scikit-learn's ``_parameter_constraints`` (checked by ``_validate_params``)."""
    from sklearn.utils._param_validation import Interval, StrOptions

    def one(rule: Rule) -> list:
        if isinstance(rule, tuple):
            return [StrOptions(set(rule))] if all(isinstance(v, str) for v in rule) else ["boolean"]
        return {
            "positive": [Interval(Real, 0, None, closed="neither")],
            "non_negative": [Interval(Real, 0, None, closed="left")],
            "count": [Interval(Integral, 1, None, closed="left")],
            "optional_count": [Interval(Integral, 1, None, closed="left"), None],
            "non_negative_int": [Interval(Integral, 0, None, closed="left")],
            "bool": ["boolean"],
            "fraction": [Interval(Real, 0, 1, closed="right")],
            "count_or_auto": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
            "positive_or_auto": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
            "optional_count_or_auto": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        }[rule]

    return {name: one(rule) for name, rule in table.items()}
