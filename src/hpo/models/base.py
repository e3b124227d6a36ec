"""The contract every model kind implements, and what one fit hands back.

A model kind (GAP, SA-GPR, the next one) is a folder under ``hpo/models/`` whose ``kind.py``
defines one :class:`ModelKind` subclass; ``hpo.models.KINDS`` registers it. The trial loop,
promotion, plots and data loading ask the kind instead of comparing strings:

- ``targets``: what the data must carry (read by ``hpo.data``);
- ``parameters``: the constraint table (``hpo.models.rules``), the single source for config
  validation, sampled-trial checks and the estimator;
- ``score(cfg, params, data, workdir) -> Scored``: fit on the training frames, evaluate both sets,
  write CSVs and figures, raise :class:`TrialFailure` with a reason when no metric can be had;
- ``pyfunc_code``: the file MLflow loads the registered model with, ``pyfunc_outputs``: what it returns
  per structure (``hpo.serving``);
- ``trial_metrics``: metrics kept on the Optuna trial (what reports and promotion rules read).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna

from hpo.errors import ConfigError  # noqa: F401  (kinds raise it; hpo.errors is where it lives)
from hpo.models.rules import Rule, allowed, describe

# Why a trial ended without a metric (tag ``failure`` in MLflow, user attr in Optuna), or a study
# (``failure_rate``, on its parent run). A recorded reason is one of these words, alone or followed by ": "
# and a detail (``killed: SIGKILL, likely out of memory (peak 2.50 GB)``, hpo.liveness.killed_reason).
FAILURE_REASONS = (
    "gap_fit_error", "timeout", "missing_model", "memory_budget", "nan_metric", "invalid_params", "interrupted", "error",
    "refit_mismatch", "pruned", "killed", "disk_full", "time_budget", "failure_rate",
)


def failure_reason(reason: str) -> str:
    """``reason``, to be recorded as a ``failure`` tag or user attr, checked against ``FAILURE_REASONS`` (the
    word before any ": detail"): the reasons are a vocabulary users filter runs by."""
    if reason.split(": ", 1)[0] not in FAILURE_REASONS:
        raise ValueError(f"unknown failure reason {reason!r}; add it to FAILURE_REASONS")
    return reason


class TrialFailure(RuntimeError):
    """A fit that cannot produce a metric, with a reason from ``FAILURE_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = failure_reason(reason)


class OverBudget(optuna.TrialPruned):
    """Refused before the fit: an estimate is over its budget (pruned, not failed). ``metrics``: the estimate
    as recorded on the trial's run; ``parameter`` (set by the kind): the model parameter that drives it."""

    reason: ClassVar[str]
    parameter: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        raise NotImplementedError


class MemoryBudgetExceeded(OverBudget):
    """The estimated peak memory is over ``model.memory_budget_gb``."""

    reason = "memory_budget"

    def __init__(self, message: str, estimate_bytes: int):
        super().__init__(message)
        self.estimate_bytes = estimate_bytes

    @property
    def metrics(self) -> dict[str, float]:
        return {"memory_estimate_gb": self.estimate_bytes / 1e9}


class TimeBudgetExceeded(OverBudget):
    """The estimated time of a stage of the fit (e.g. the descriptor pass) is over the fit's time bound."""

    reason = "time_budget"

    def __init__(self, message: str, estimate_s: float):
        super().__init__(message)
        self.estimate_s = estimate_s

    @property
    def metrics(self) -> dict[str, float]:
        return {"time_estimate_s": self.estimate_s}


@dataclass
class Uncertainty:
    """A model's predictive std on some frames: named per-frame arrays (units in the name), ``primary`` the one
    thresholds apply to; ``per_atom`` (per frame, one value per atom) when the kind has one."""

    per_frame: dict[str, Any]
    primary: str
    per_atom: list | None = None
    per_atom_name: str = ""


@dataclass
class Scored:
    """What one fit produced: metrics, flags and the files worth keeping."""

    metrics: dict[str, float]
    params: dict[str, object]
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    model_files: list[Path] = field(default_factory=list)


def _step(node: Any, part: str) -> Any:
    """One part of a dotted path: a key, or an index into a list (``descriptors.0.cutoff``)."""
    return int(part) if isinstance(node, Sequence) and not isinstance(node, str) else part


def get_dotted(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[_step(node, part)]
    return node


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[_step(node, part)]
    node[_step(node, leaf)] = value


def has_dotted(tree: dict, dotted: str) -> bool:
    try:
        get_dotted(tree, dotted)
    except (KeyError, TypeError, IndexError, ValueError):
        return False
    return True


def with_values(params: dict, values: dict[str, object]) -> dict:
    """``params`` with the sampled (dotted) values put in; everything else keeps its value."""
    merged = copy.deepcopy(params)
    for name, value in values.items():
        set_dotted(merged, name, value)
    return merged


class ModelKind:
    """One kind of model: its data, its parameters and how a config of it is fitted and scored."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]]
    parameters: ClassVar[dict[str, Rule]]
    # Metrics kept on the Optuna trial besides the objectives.
    trial_metrics: ClassVar[tuple[str, ...]]
    # Module file that MLflow imports to load a registered model of this kind (models from code).
    pyfunc_code: ClassVar[Path]
    # Whether its models drive MD (promotion screens candidates with a short MD only then).
    drives_md: ClassVar[bool] = False
    # Whether its trials record train_loss/val_loss (study.loss), so a study may minimise them.
    records_loss: ClassVar[bool] = False
    # Model-config keys of its on-disk cache and of that cache's bound in GB (None: no cache).
    cache_keys: ClassVar[tuple[str, str] | None] = None

    def pyfunc_outputs(self):
        """The MLflow ``Schema`` of the registered pyfunc's output, one row per input structure (``hpo.serving``)."""
        raise NotImplementedError(f"model kind {self.name!r} declares no pyfunc outputs")

    def check(self, params: dict, prefix: str = "model") -> None:
        """Raise ``ConfigError`` for a parameter outside the table or an impossible combination."""
        for name, rule in self.parameters.items():
            value = get_dotted(params, name) if has_dotted(params, name) else None
            if not allowed(rule, value):
                raise ConfigError(f"{prefix}.{name}={value!r} is not allowed: {describe(rule)}")
        self.check_combination(params, prefix)

    def check_combination(self, params: dict, prefix: str) -> None:
        """Cross-parameter checks of this kind (none by default)."""

    def check_trial(self, params: dict) -> None:
        """Sampled parameters must be as valid as the config's: the fitting program may accept nonsense."""
        try:
            self.check(params)
        except ConfigError as exc:
            raise TrialFailure("invalid_params", str(exc)) from exc

    def fit_targets(self, params: dict) -> tuple[str, ...]:
        """The quantities a fit with ``params`` learns from (``targets``: those it can learn from)."""
        return self.targets

    def inactive_parameters(self, params: dict) -> dict[str, str]:
        """Parameters that cannot change this config's fit, each with the reason: the search leaves them
        out instead of spending trials on them (none by default)."""
        return {}

    def data_defaults(self, params: dict, data) -> dict[str, tuple[Any, str]]:
        """Values for the parameters set to ``auto`` (rules ``*_or_auto``), derived from the data (``Datasets``),
        each with the reason shown to the user: dotted name -> (value, why). None by default."""
        return {}

    def resolve_auto(self, params: dict, data) -> dict:
        """``params`` with every ``auto`` value replaced by its ``data_defaults`` value (``load_datasets`` has
        usually done so in the config already; this makes a fit independent of that order)."""
        found = self.data_defaults(params, data)
        return with_values(params, {name: value for name, (value, _) in found.items()}) if found else params

    def preflight(self, params: dict, frames: list) -> None:
        """Refuse a fit that cannot finish (e.g. over the memory budget) before it starts; none by default."""

    def score(self, cfg, params: dict, data, workdir: Path) -> Scored:
        raise NotImplementedError

    def test_errors(self, cfg, params: dict, files: list[Path], test, val) -> dict[str, float]:
        """``test_*`` errors of a registered model (its ``files``) on the test frames; ``val`` gives the scales
        of any loss. Called once per promotion."""
        raise NotImplementedError

    def attach_posterior(self, cfg, params: dict, data, files: list[Path]) -> list[Path]:
        """Make the model in ``files`` carry what its predictive std needs (a file beside it that registration
        copies), from the training data of ``data``; the files (unchanged by default: nothing to add)."""
        return files

    def predictive_std(self, files: list[Path], frames) -> Uncertainty | None:
        """The predictive std of the model in ``files`` on ``frames`` (None: it keeps no posterior)."""
        return None

    def calibration_pairs(self, cfg, params: dict, files: list[Path], split, data):
        """(errors, predictive std) of the model in ``files`` on a split's frames, flat arrays in the same units,
        and the quantity's name (e.g. "energy"); None when the model keeps no posterior. ``data``: the study's
        ``Datasets`` (its detected keys)."""
        return None

    def set_std_scale(self, files: list[Path], scale: float) -> None:
        """Multiply the model's stored calibration scale by ``scale`` (``hpo.calibration.fit_scale`` of the std it
        reports now), so every std it reports afterwards includes it (nothing by default)."""

    def production_model(self, cfg, params: dict, data, trial_files: list[Path], workdir: Path) -> tuple[list[Path], dict[str, float]]:
        """The files to register for a trial's model, and figures about making them (none by default: the
        trial's own files)."""
        return trial_files, {}
