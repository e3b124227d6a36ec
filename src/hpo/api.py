"""hpo from Python: the registered champion as an ASE calculator, a study as Optuna's object.

The two lines a chemist wants after ``hpo promote``::

    import hpo
    atoms.calc = hpo.load_calculator("models:/water-gap@champion")   # energies (eV), forces (eV/A)

and, with the models' own uncertainty (scikit-learn's ``return_std``; the posterior std of the latent GP)::

    energies, std = hpo.load_model("models:/water-gap@champion").predict(frames, return_std=True)      # eV per frame
    tensors, std = hpo.load_model("models:/water-sagpr@champion").predict(frames, return_std=True)     # (n, 3, 3), the model's units

URIs are MLflow's (``models:/name@alias``, ``models:/name/version``, ``runs:/...``) or a local ``gap.xml``;
the tracking store defaults to the one hpo writes under the current root (``root`` / ``HPO_ROOT``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["load_calculator", "load_model", "load_study"]


def _config(overrides: list[str] | None = None):
    from hpo.config import load_config

    return load_config(list(overrides or []))


def load_calculator(uri: str, tracking_uri: str | None = None):
    """A GAP from the registry (or a local ``gap.xml``) as an ASE calculator: quippy's ``Potential``, which
    gives energies (eV), forces (eV/A) and, for periodic cells, stress."""
    from hpo.models.gap import gap_fit
    from hpo.registry.resolve import PromoteError, resolve_model

    tracking_uri = tracking_uri or str(_config().tracking.tracking_uri)
    folder = resolve_model(uri, tracking_uri, Path(tempfile.mkdtemp(prefix="hpo-model-")))
    model_file = folder / gap_fit.MODEL_FILE if folder.is_dir() else folder
    if not model_file.is_file():
        local = Path(uri).expanduser()
        model_file = local if local.is_file() else model_file
    if not model_file.is_file():
        raise PromoteError(f"model {uri!r} holds no {gap_fit.MODEL_FILE}: not a GAP (an SA-GPR model predicts polarizabilities)")
    return gap_fit.load(model_file)


def load_model(uri: str, tracking_uri: str | None = None):
    """A registered model (or a local ``gap.xml`` / SA-GPR model folder) as its estimator: a GAP as
    ``SparseGap`` (energies in eV; with ``return_std`` the std of each frame's energy, when the model carries its
    posterior: every promoted GAP does), an SA-GPR model as ``SAGPR`` (tensors and their std per component)."""
    from hpo.models.gap import gap_fit
    from hpo.models.gap.sparse_gap import SparseGap
    from hpo.models.sagpr.estimator import SAGPR
    from hpo.registry.resolve import resolve_model

    local = Path(uri).expanduser()
    if local.is_file():
        return SparseGap.read(local)
    tracking_uri = tracking_uri or str(_config().tracking.tracking_uri)
    folder = local if local.is_dir() else resolve_model(uri, tracking_uri, Path(tempfile.mkdtemp(prefix="hpo-model-")))
    if (folder / gap_fit.MODEL_FILE).is_file():
        return SparseGap.read(folder / gap_fit.MODEL_FILE)
    return SAGPR.load(folder)


def load_study(name: str, storage: str | None = None):
    """The Optuna study ``name`` in ``storage`` (default: the study storage hpo writes under the current root)."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage or str(_config().study.storage))
