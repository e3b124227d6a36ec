"""hpo from Python: run and promote studies, load the registered champions as ASE calculators.

The two lines a chemist wants after ``hpo promote``::

    import hpo
    atoms.calc = hpo.load_calculator("models:/water-gap@champion")   # energies (eV), forces (eV/A)

and, with the models' own uncertainty (scikit-learn's ``return_std``; the posterior std of the latent GP)::

    energies, std = hpo.load_model("models:/water-gap@champion").predict(frames, return_std=True)      # eV per frame
    tensors, std = hpo.load_model("models:/water-sagpr@champion").predict(frames, return_std=True)     # (n, 3, 3), the model's units

``optimize`` and ``promote`` take the overrides of the command line (``["study.n_trials=20", "model=sagpr"]``)
and run what ``hpo optimize`` / ``hpo promote`` run, in this process. ``load_polarizability`` gives the SA-GPR
champion and a polarizability calculator for ``ase.vibrations.raman.StaticRamanCalculator``.

URIs are MLflow's (``models:/name@alias``, ``models:/name/version``, ``runs:/...``) or a local model (a ``gap.xml``,
an SA-GPR model folder: whatever a kind recognises, ``ModelKind.holds``);
the tracking store defaults to the one hpo writes under the current root (``root`` / ``HPO_ROOT``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StudySummary", "load_calculator", "load_model", "load_polarizability", "load_study", "optimize", "promote"]


def _config(overrides: list[str] | None = None):
    """The composed config, checked as the command line checks it (``ConfigError`` naming key and value)."""
    from hpo.config import load_config, validate

    cfg = load_config(list(overrides or []))
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class StudySummary:
    """What ``optimize`` ends with: the end-of-study table as values. ``best_value`` and ``default_value`` are in
    the study metric's unit (``metric``, ``unit``); ``gain`` is the best trial's improvement over the hand-tuned
    default trial (a fraction; None without one); ``study`` is the Optuna study itself."""

    name: str
    metric: str
    unit: str
    n_finished: int
    best_trial: int
    best_value: float
    best_params: dict
    default_value: float | None
    gain: float | None
    study: object = field(repr=False, compare=False)


def optimize(overrides: list[str] | None = None) -> StudySummary:
    """Run or resume the study of the config composed with ``overrides`` (Hydra's, as after ``hpo optimize``)
    until it holds ``study.n_trials`` finished trials; the same storage, MLflow runs and outputs as the command."""
    from optuna.trial import TrialState

    from hpo.progress import quiet
    from hpo.search import loop
    from hpo.search.selection import best_trial, default_trial, primary

    cfg = _config(overrides)
    quiet(bool(cfg.get("verbose", False)))
    study = loop.run(cfg)
    best, default = best_trial(study), default_trial(study)
    default_value = primary(default) if default is not None else None
    return StudySummary(
        name=study.study_name,
        metric=str(cfg.study.metric),
        unit=loop.metric_unit(cfg),
        n_finished=len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
        best_trial=best.number,
        best_value=primary(best),
        best_params=dict(best.params),
        default_value=default_value,
        gain=(default_value - primary(best)) / default_value if default_value else None,
        study=study,
    )


def promote(overrides: list[str] | None = None) -> dict:
    """Register the study's best trial (``promote.*`` overrides as for ``hpo promote``; the model kind comes from
    the study's record) under alias ``champion``; returns the version's lineage, with ``name`` and ``version``."""
    from hpo.progress import quiet
    from hpo.registry import promote as registry_promote

    cfg = _config(overrides)
    quiet(bool(cfg.get("verbose", False)))
    return registry_promote.promote(cfg)


def _stored_model(uri: str, tracking_uri: str | None):
    """The path of the model at ``uri`` (a local file or folder as given, else downloaded) and its kind."""
    from hpo.models import kind_holding
    from hpo.registry.resolve import PromoteError, resolve_model

    local = Path(uri).expanduser()
    tracking_uri = tracking_uri or str(_config().tracking.tracking_uri)
    path = local if local.exists() else resolve_model(uri, tracking_uri, Path(tempfile.mkdtemp(prefix="hpo-model-")))
    model_kind = kind_holding(path)
    if model_kind is None:
        raise PromoteError(f"model {uri!r} is no model hpo knows ({path})")
    return path, model_kind


def load_calculator(uri: str, tracking_uri: str | None = None):
    """A model of a kind that drives MD from the registry (or a local ``gap.xml``) as an ASE calculator: for a
    GAP quippy's ``Potential``, which gives energies (eV), forces (eV/A) and, for periodic cells, stress."""
    from hpo.registry.resolve import PromoteError

    path, model_kind = _stored_model(uri, tracking_uri)
    if not model_kind.drives_md:
        raise PromoteError(f"model {uri!r} is a {model_kind.display_name} model, which gives no energies and forces")
    return model_kind.calculator(model_kind.files_in(path))


def load_model(uri: str, tracking_uri: str | None = None):
    """A registered model (or a local ``gap.xml`` / SA-GPR model folder) as its kind's predictor
    (``ModelKind.load``): a GAP as ``SparseGap`` (energies in eV; with ``return_std`` the std of each frame's
    energy, when the model carries its posterior: every promoted GAP does), an SA-GPR model as ``SAGPR`` (tensors
    and their std per component)."""
    path, model_kind = _stored_model(uri, tracking_uri)
    return model_kind.load(model_kind.files_in(path))


def load_study(name: str, storage: str | None = None):
    """The Optuna study ``name`` in ``storage`` (default: the study storage hpo writes under the current root)."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage or str(_config().study.storage))


# What 1 of a polarizability unit is in ASE's (e^2 Angstrom^2 / eV, which ase.vibrations' Raman classes expect):
# atomic units (e^2 a0^2 / Eh, i.e. 4 pi eps0 bohr^3) times Bohr^2 / Ha; 4 pi eps0 Angstrom^3 divided by Bohr * Ha.
# Powers of (Bohr, Ha) per unit.
POLARIZABILITY_UNITS = {"bohr3": (2, -1), "angstrom3": (-1, -1)}


def polarizability_factor(unit: str) -> float:
    """The factor from ``unit`` (``bohr3``: atomic units; ``angstrom3``) to ASE's e^2 Angstrom^2 / eV."""
    from ase.units import Bohr, Ha

    if unit not in POLARIZABILITY_UNITS:
        raise ValueError(f"unit={unit!r} is not allowed: one of {sorted(POLARIZABILITY_UNITS)}")
    bohr_power, ha_power = POLARIZABILITY_UNITS[unit]
    return Bohr**bohr_power * Ha**ha_power


class Polarizability:
    """A registered SA-GPR model as a static polarizability calculator, ASE's way.

    ``model`` is the ``SAGPR`` estimator; ``predict(frames)`` gives (n, 3, 3) tensors in the model's own unit
    (that of its training data); calling the object on ``atoms`` gives one 3x3 tensor in ASE's unit, e^2
    Angstrom^2 / eV: the model's value times ``factor`` (``unit="bohr3"``, atomic units as in the workshop water
    data: Bohr^2 / Ha = 0.010291; ``"angstrom3"``: 1 / (Bohr Ha) = 0.069446). Multiply ASE's value by Bohr * Ha to
    get Angstrom^3. ``ase.vibrations.raman.StaticRamanCalculator`` instantiates its polarizability class itself,
    so hand it a function returning this object: ``StaticRamanCalculator(atoms, lambda: alpha, name="raman")``.
    """

    def __init__(self, model, unit: str = "bohr3"):
        self.model = model
        self.unit = unit
        self.factor = polarizability_factor(unit)

    def predict(self, frames):
        return self.model.predict(list(frames))

    def __call__(self, atoms, *args, **kwargs):
        return self.model.predict([atoms])[0] * self.factor


def load_polarizability(uri: str, tracking_uri: str | None = None, unit: str = "bohr3") -> Polarizability:
    """The SA-GPR model at ``uri`` (registry URI or a local model folder) as a :class:`Polarizability`;
    ``unit``: the unit of the polarizabilities it was trained on (``bohr3``, atomic units, for the workshop data)."""
    from hpo.registry.resolve import PromoteError

    path, model_kind = _stored_model(uri, tracking_uri)
    if "polarizability" not in model_kind.targets:
        raise PromoteError(f"model {uri!r} is a {model_kind.display_name} model, not one of the polarizability; "
                           "a model that drives MD loads with hpo.load_calculator")
    return Polarizability(model_kind.load(model_kind.files_in(path)), unit)
