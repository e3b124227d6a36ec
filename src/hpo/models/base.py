"""The contract every model kind implements, and what one fit hands back.

A model kind (GAP, SA-GPR, the next one) is a folder under ``hpo/models/`` whose ``kind.py``
defines one :class:`ModelKind` subclass; ``hpo.models.KINDS`` registers it. The search, promotion,
MD, polarizability and reports ask the kind instead of comparing strings; a kind receives its own
parameters and a :class:`FitContext`, never the global config:

- capabilities as data: ``targets`` (what the data must carry, read by ``hpo.data``), ``drives_md``,
  ``records_loss``, ``cache_keys``, ``capped_params``, ``fidelity``/``fidelity_budget`` (what a pruner cuts
  short: training-set rungs, or a step the fit counts itself and reports through ``FitContext.report``),
  ``pyfunc_requirements``;
- ``parameters``: the constraint table (``hpo.models.rules``), the single source for config
  validation, sampled-trial checks and the estimator; ``effective_params``: the values a fit really
  uses (``auto`` resolved, caps applied);
- ``fit(train, params, workdir, context) -> Fitted`` and ``evaluate(fitted, frames) -> Predictions``;
  ``reference(split, params, context)``: the data's own values in the same form. Errors, CSVs,
  overfitting tags, parity plot and cache trimming are the search layer's (``hpo.search.scoring``);
- a stored model: ``files_in(path)`` (its files in a folder or a path), ``predict(files, frames, params)``,
  ``load(files)`` (the predictor object), ``calculator(files)`` (an ASE calculator, kinds that drive MD),
  ``bundle(files, folder)`` (what registration copies), ``production_model`` (what promotion registers);
- ``pyfunc_code``: the file MLflow loads the registered model with, ``pyfunc_outputs``: what it returns
  per structure (``hpo.serving``);
- ``trial_metrics``: metrics kept on the Optuna trial (what reports and promotion rules read).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
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
    "fit_error",  # the fitting program (a kind's own, run as a child process) exited with an error or no model
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


@dataclass(frozen=True)
class FitContext:
    """What a fit needs besides its own parameters: the run's thread budget and seed, and what the data say
    about themselves (``keys``: where each quantity is stored, ``hpo.data.DataKeys``; ``e0``: isolated-atom
    energies in eV, None when the fitting program is to take the mean energy per atom of the training frames;
    ``e0_values``: the energies subtracted either way, per species; ``loss``: the weights and scales of
    ``study.loss``, for kinds that record a loss; ``val``: the validation ``FrameSet``, for kinds that validate
    while they fit (per-epoch errors, the checkpoint kept); ``report``: for kinds whose fidelity is a step of
    their own (``ModelKind.fidelity``), called after each step with its number and validation metrics; it
    raises (``optuna.TrialPruned``) when the search stops the fit there, and the fit must let that through)."""

    threads: int
    seed: int
    keys: Any
    e0: dict[str, float] | None
    e0_values: dict[str, float]
    loss: dict | None = None
    val: Any = None
    report: Callable[[int, dict[str, float]], None] | None = None


class Predictions:
    """A model's values on some frames, in one quantity, comparable with the data's own values in the same form
    (``ModelKind.reference``). Subclasses say how two of them give error metrics, a CSV and a parity plot."""

    quantity: ClassVar[str]
    # (metric stem, tag): ``train_<stem>`` / ``val_<stem>`` give ``<stem>_gap``, ``<stem>_ratio`` and the tag
    overfit_stems: ClassVar[tuple[tuple[str, str], ...]] = ()

    def errors(self, prefix: str, truth: "Predictions") -> dict[str, float]:
        raise NotImplementedError

    def table(self, truth: "Predictions") -> str:
        """The CSV of true and predicted values, one row per frame."""
        raise NotImplementedError

    @classmethod
    def parity_plot(cls, path: Path, series: dict[str, tuple["Predictions", "Predictions"]], title: str) -> Path:
        """Predicted against true for each named series (truth, predicted), the training one first."""
        raise NotImplementedError

    def calibration_pairs(self, truth: "Predictions"):
        """(errors, std) as flat arrays in the same unit, or None when these predictions carry no std."""
        return None


@dataclass
class Fitted:
    """One fit: the model files, the parameters as fitted, values the fit chose itself (``chosen``, recorded
    beside the parameters), figures of the fit (timings, estimates), tags, files worth keeping, and
    ``train_predictions`` when the fit yields them for free. ``state``: the kind's own in-memory objects (a
    solver's factors, an estimator) that ``evaluate`` reuses; ``cache``: the ``hpo.cache.Cache`` the fit used,
    whose hit counts the trial reports."""

    model_files: list[Path]
    params: dict
    chosen: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, object] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    train_predictions: Predictions | None = None
    state: Any = None
    cache: Any = None


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
    # Parameters a fit may lower below the value asked for (``effective_params``); the value asked for is
    # recorded as ``<name>_requested`` beside the one fitted.
    capped_params: ClassVar[tuple[str, ...]] = ()
    # What a pruner cuts a trial short by: "train_size" (the search's fidelity rungs, nested training subsets)
    # or a step the fit counts itself (e.g. "epoch"), reported through ``FitContext.report``; for the latter
    # ``fidelity_budget`` names the model parameter holding the last step (the pruner's max resource).
    fidelity: ClassVar[str] = "train_size"
    fidelity_budget: ClassVar[str | None] = None
    # Distributions the registered pyfunc needs besides hpo's own (pinned at their installed versions).
    pyfunc_requirements: ClassVar[tuple[str, ...]] = ()

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

    def effective_params(self, params: dict, data) -> dict:
        """The parameters a fit on ``data`` (``Datasets``) really uses: ``auto`` resolved and any cap of the kind
        applied (the record says what was fitted); checked like a sampled trial."""
        params = copy.deepcopy(self.resolve_auto(params, data))
        self.check_trial(params)
        return params

    def fit(self, train, params: dict, workdir: Path, context: FitContext, upcoming=()) -> Fitted:
        """Fit on the ``train`` frames (``hpo.data.FrameSet``) with ``params`` as ``effective_params`` gave them,
        writing into ``workdir``; raise :class:`TrialFailure` when no model can be had. ``upcoming``: frame sets
        ``evaluate`` will be asked for next, which a fit may prepare while it runs."""
        raise NotImplementedError

    def evaluate(self, fitted: Fitted, frames) -> Predictions:
        """Predictions of a fresh fit on ``frames`` (a list of ``ase.Atoms``)."""
        raise NotImplementedError

    def reference(self, split, params: dict, context: FitContext) -> Predictions:
        """The data's own values of the frames of ``split`` (a ``FrameSet``), in the form ``evaluate`` gives."""
        raise NotImplementedError

    def loss_metrics(self, found: dict[str, float], val: Predictions, params: dict, weights: dict | None,
                     prefixes: tuple[str, ...] = ("train", "val")) -> dict[str, float]:
        """``<prefix>_loss`` of the errors in ``found`` (kinds with ``records_loss``), scaled by the validation
        values ``val``; none by default."""
        return {}

    def cost_metrics(self, fitted: Fitted, frames) -> dict[str, float]:
        """Figures of the model's cost measured on ``frames`` (e.g. an MD step), none by default."""
        return {}

    def failure_artifacts(self, workdir: Path) -> list[Path]:
        """Files of a failed fit worth keeping (the fitting program's output), none by default."""
        return []

    def lineage_tags(self, workdir: Path) -> dict[str, str]:
        """Tags a registered version carries about how its model was made (e.g. a command line), none by default."""
        return {}

    def files_in(self, path: Path) -> list[Path]:
        """The model files of a stored model: ``path`` is a registered model's folder or a local model."""
        raise NotImplementedError

    def holds(self, path: Path) -> bool:
        """Whether ``path`` (a folder or a file) is a stored model of this kind."""
        return False

    def predict(self, files: list[Path], frames, params: dict, with_std: bool = False) -> Predictions:
        """Predictions of the stored model ``files`` on ``frames``; ``with_std``: with its predictive std when it keeps one."""
        raise NotImplementedError

    def load(self, files: list[Path]):
        """The stored model as its predictor object (what ``hpo.load_model`` hands out)."""
        raise NotImplementedError

    def calculator(self, files: list[Path]):
        """An ASE calculator (energies, forces) of the stored model: kinds that drive MD."""
        raise NotImplementedError(f"model kind {self.name!r} does not drive MD")

    def bundle(self, files: list[Path], folder: Path) -> None:
        """Copy what the registered model consists of into ``folder`` (a folder model: its content; a file: itself)."""
        for path in files:
            if path.is_dir():
                shutil.copytree(path, folder, dirs_exist_ok=True)
            else:
                shutil.copy(path, folder / path.name)

    def attach_posterior(self, params: dict, data, files: list[Path], context: FitContext) -> list[Path]:
        """Make the model in ``files`` carry what its predictive std needs (a file beside it that registration
        copies), from the training data of ``data``; the files (unchanged by default: nothing to add)."""
        return files

    def predictive_std(self, files: list[Path], frames) -> Uncertainty | None:
        """The predictive std of the model in ``files`` on ``frames`` (None: it keeps no posterior)."""
        return None

    def set_std_scale(self, files: list[Path], scale: float) -> None:
        """Multiply the model's stored calibration scale by ``scale`` (``hpo.calibration.fit_scale`` of the std it
        reports now), so every std it reports afterwards includes it (nothing by default)."""

    def production_model(self, params: dict, data, trial_files: list[Path], workdir: Path,
                         context: FitContext) -> tuple[list[Path], dict[str, float]]:
        """The files to register for a trial's model, and figures about making them (none by default: the
        trial's own files)."""
        return trial_files, {}
