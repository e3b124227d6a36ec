"""hpo: tracked, resumable hyperparameter search for GAP and SA-GPR models of atomistic systems.

Public API (``hpo.api``): ``optimize(overrides)``, ``promote(overrides)``, ``load_calculator(uri)``,
``load_model(uri)``, ``load_polarizability(uri)``, ``load_study(name)``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the API's imports (quippy, MLflow, Hydra) load only when it is used: `import hpo` stays instant
    if name in ("optimize", "promote", "load_calculator", "load_model", "load_polarizability", "load_study", "StudySummary"):
        from hpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
