"""Allowed values of the SA-GPR model config (conf/model/sagpr.yaml): one table for the config, every
sampled trial and the estimator's ``_parameter_constraints``."""

from hpo.models.sparse_gp import SPARSE_METHODS

PARAMETERS = {
    "rc": "positive",
    "sigma": "positive",
    "n_max": "count",
    # lambda = 2 features need l1 + l2 >= 2, so at least l = 1
    "l_max": "count",
    # integer: dot products of SOAP vectors may be negative
    "zeta": "count",
    "reg0": "non_negative",
    "reg2": "non_negative",
    "nc": "optional_count",
    "seed": "non_negative_int",
    # auto: the estimator decides per fit (it depends on the sampled zeta and nc), not data_defaults
    "n_env": "optional_count_or_auto",
    "env_auto_count": "count",
    "kernel_memory_gb": "positive",
    "projection_atoms": "optional_count",
    "env_selection": SPARSE_METHODS,
    "symmetry_tol": "positive",
    "cache_max_gb": "positive",
}

# The constructor arguments of the estimator, a subset of the config.
ESTIMATOR_KEYS = ("rc", "sigma", "n_max", "l_max", "zeta", "nc", "reg0", "reg2", "seed", "n_env", "env_selection",
    "env_auto_count", "kernel_memory_gb", "projection_atoms",
)
