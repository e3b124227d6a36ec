"""hpo: tracked, resumable hyperparameter search for GAP and SA-GPR models of atomistic systems.

Public API (``hpo.api``): ``load_calculator(uri)``, ``load_model(uri)``, ``load_study(name)``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the API's imports (quippy, MLflow, Hydra) load only when it is used: `import hpo` stays instant
    if name in ("load_calculator", "load_model", "load_study"):
        from hpo import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
