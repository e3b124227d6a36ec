"""Allowed values of the MACE model config (conf/model/mace.yaml), one table for the config, every sampled trial
and the engine (``hpo.models.rules``), and the cross-parameter checks mace-torch would otherwise report only
after its imports and data loading (or not at all)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpo.models.base import ConfigError
from hpo.models.rules import allowed, describe

PARAMETERS = {
    "r_max": "positive",
    "num_channels": "count",
    # mace-torch builds hidden irreps num_channels x (0e + 1o + ... up to max_L); it is tested up to 3
    "max_L": (0, 1, 2, 3),
    "correlation": "count",
    "num_interactions": "count",
    "num_radial_basis": "count",
    "num_cutoff_basis": "count",
    "lr": "positive",
    "weight_decay": "non_negative",
    "batch_size": "count",
    "valid_batch_size": "count",
    "clip_grad": "positive",
    "max_num_epochs": "count",
    "patience": "count",
    "energy_weight": "non_negative",
    "forces_weight": "non_negative",
    "ema": "bool",
    "ema_decay": "fraction",
    "swa": "bool",
    "swa_start_fraction": "fraction",
    "swa_lr": "positive",
    "swa_energy_weight": "non_negative",
    "swa_forces_weight": "non_negative",
    "seed": "non_negative_int",
    "device": ("cpu", "cuda", "mps"),
    "default_dtype": ("float64", "float32"),
    "fit_timeout_s": "positive",
    "cost_frames": "non_negative_int",
}

# Above this correlation order mace-torch's symmetric contractions grow past what any published MACE uses
# (the MACE paper and mace-torch's default stop at 3); a search that samples more spends hours per trial.
MAX_CORRELATION = 4
# Stage two needs an epoch before it and one in it (engine.stage_two_start).
MIN_EPOCHS_WITH_SWA = 2


def check(params: Mapping[str, Any], prefix: str = "model") -> None:
    """Raise ``ConfigError`` for a value outside ``PARAMETERS`` or an impossible combination."""
    for name, rule in PARAMETERS.items():
        value = params.get(name)
        if not allowed(rule, value):
            raise ConfigError(f"{prefix}.{name}={value!r} is not allowed: {describe(rule)}")
    if params["correlation"] > MAX_CORRELATION:
        raise ConfigError(f"{prefix}.correlation={params['correlation']!r} is not allowed: at most {MAX_CORRELATION}")
    if params["energy_weight"] == 0 and params["forces_weight"] == 0:
        raise ConfigError(f"{prefix}.energy_weight and {prefix}.forces_weight are both 0: the loss has no term")
    if params["swa"] and params["max_num_epochs"] < MIN_EPOCHS_WITH_SWA:
        raise ConfigError(f"{prefix}.swa=true needs {prefix}.max_num_epochs >= {MIN_EPOCHS_WITH_SWA} (an epoch before stage two and one in it)")
