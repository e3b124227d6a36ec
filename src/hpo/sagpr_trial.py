"""One SA-GPR fit as a trial: fit on the training frames, score both sets, write CSVs and plots.

Kept apart from :mod:`hpo.objective` so GAP runs never import featomic.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hpo import plots
from hpo.atomic import write_text
from hpo.data import Datasets
from hpo.metrics import overfitting
from hpo.objective import Scored, TrialFailure
from hpo.cache import Cache
from hpo.sagpr import SAGPR, component_rmse, read_tensors
from hpo.tracking import flatten

# Constructor arguments of SAGPR that come from the model config.
ESTIMATOR_KEYS = ("rc", "sigma", "n_max", "l_max", "zeta", "nc", "reg0", "reg2", "seed", "cache_dir")
COMPONENTS = ("xx", "xy", "xz", "yy", "yz", "zz")


def tensors_of(frames, cfg, model: dict) -> np.ndarray:
    return read_tensors(
        frames.frames, key=cfg.dataset.property_keys.polarizability, source=frames.path.name, symmetry_tol=model["symmetry_tol"]
    )


def prefixed(prefix: str, errors: dict[str, float]) -> dict[str, float]:
    """``component_rmse`` keys -> trial metric names: val_rmse (6 unique), val_rmse_xx, val_rmse_L0, ..."""
    names = {"unique6": f"{prefix}_rmse", "all9": f"{prefix}_rmse_all9"}
    return {names.get(key, f"{prefix}_rmse_{key}"): value for key, value in errors.items()}


def write_errors(path: Path, true: np.ndarray, pred: np.ndarray) -> None:
    header = ",".join([f"true_{c}" for c in COMPONENTS] + [f"pred_{c}" for c in COMPONENTS])
    rows = [np.concatenate([t[np.triu_indices(3)], p[np.triu_indices(3)]]) for t, p in zip(true, pred)]
    write_text(path, header + "\n" + "".join(",".join(f"{v:.8f}" for v in row) + "\n" for row in rows))


def score_sagpr(cfg, model: dict, data: Datasets, workdir: Path) -> Scored:
    """Fit an SA-GPR model of the polarizability; metrics are RMSEs per component, L=0, L=2 and overall."""
    train_true, val_true = tensors_of(data.train, cfg, model), tensors_of(data.val, cfg, model)
    estimator = SAGPR(**{key: model[key] for key in ESTIMATOR_KEYS})
    try:
        start = time.perf_counter()
        estimator.fit(data.train.frames, train_true)
        fit_time = time.perf_counter() - start
        start = time.perf_counter()
        train_pred = estimator.train_predictions_
        val_pred = estimator.predict(data.val.frames)
        eval_time = time.perf_counter() - start
    except np.linalg.LinAlgError as exc:
        raise TrialFailure("error", f"SA-GPR regression failed (reg too small?): {exc}") from exc
    found = {**prefixed("train", component_rmse(train_true, train_pred)), **prefixed("val", component_rmse(val_true, val_pred))}
    if not all(np.isfinite(v) for v in found.values()):
        raise TrialFailure("nan_metric", "non-finite SA-GPR metrics: the regression diverged")
    found["rmse_gap"], found["rmse_ratio"], overfit = overfitting(found["train_rmse"], found["val_rmse"], cfg.overfit_ratio)
    found.update(fit_time_s=fit_time, eval_time_s=eval_time, **{f"fit_{k}": v for k, v in estimator.timings_.items()})

    model_dir = workdir / "model"
    estimator.save(model_dir)
    write_errors(workdir / "train_errors.csv", train_true, train_pred)
    write_errors(workdir / "validation_errors.csv", val_true, val_pred)
    title = f"SA-GPR polarizability, {data.train.path.name} ({len(data.train)}) / {data.val.path.name} ({len(data.val)})"
    parity = plots.tensor_parity_plot(
        workdir / "parity_polarizability.png", {"train": (train_true, train_pred), "validation": (val_true, val_pred)}, title
    )
    if model["cache_dir"]:
        Cache(model["cache_dir"]).trim(int(model["cache_max_gb"] * 1e9))
    return Scored(
        metrics=found,
        params={**flatten(model), "threads": cfg.threads},
        tags={"overfit": str(overfit).lower(), "cache": dict(estimator.cache_stats_)},
        artifacts=[workdir / "train_errors.csv", workdir / "validation_errors.csv", parity],
        model_files=[model_dir],
    )
