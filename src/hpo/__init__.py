"""hpo: tracked, resumable hyperparameter search for GAP and SA-GPR models of atomistic systems."""

__version__ = "0.1.0"
