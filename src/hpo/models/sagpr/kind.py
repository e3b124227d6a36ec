"""SA-GPR, the model kind: symmetry-adapted GPR of the polarizability on lambda-SOAP features.

One trial fits ``estimator.SAGPR`` on the training frames, scores both sets per tensor component,
and writes CSVs and a parity plot. The kind is imported only when asked for, so GAP runs never
import featomic.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hpo import calibration, plots
from hpo.atomic import write_text
from hpo.cache import Cache
from hpo.data import read_tensors
from hpo.metrics import COMPONENTS, overfitting
from hpo.models.base import ModelKind, Scored, TrialFailure
from hpo.models.sagpr.estimator import SAGPR, component_rmse
from hpo.models.sagpr.parameters import ESTIMATOR_KEYS, PARAMETERS
from hpo.tracking import flatten


def tensors_of(frames, cfg, model: dict, key: str | None = None) -> np.ndarray:
    return read_tensors(
        frames.frames, key=key or frames.keys.polarizability, source=frames.path.name, symmetry_tol=model["symmetry_tol"]
    )


def prefixed(prefix: str, errors: dict[str, float]) -> dict[str, float]:
    """``component_rmse`` keys -> trial metric names: val_rmse (6 unique), val_rmse_xx, val_rmse_L0, ..."""
    names = {"unique6": f"{prefix}_rmse", "all9": f"{prefix}_rmse_all9"}
    return {names.get(key, f"{prefix}_rmse_{key}"): value for key, value in errors.items()}


def write_errors(path: Path, true: np.ndarray, pred: np.ndarray) -> None:
    header = ",".join([f"true_{c}" for c in COMPONENTS] + [f"pred_{c}" for c in COMPONENTS])
    index = tuple(np.array(list(COMPONENTS.values())).T)
    rows = [np.concatenate([t[index], p[index]]) for t, p in zip(true, pred)]
    write_text(path, header + "\n" + "".join(",".join(f"{v:.8f}" for v in row) + "\n" for row in rows))


# The registered model's output columns: the tensor row by row (xx, xy, xz, yx, ...), as the data files store it.
PYFUNC_COLUMNS = tuple(f"alpha_{a}{b}" for a in "xyz" for b in "xyz")


class SagprKind(ModelKind):
    name = "sagpr"
    display_name = "SA-GPR"
    targets = ("polarizability",)
    parameters = PARAMETERS
    trial_metrics = ("train_rmse", "val_rmse", "rmse_ratio", "fit_time_s", "eval_time_s")
    cache_keys = ("cache_dir", "cache_max_gb")
    pyfunc_code = Path(__file__).with_name("pyfunc.py")

    def pyfunc_outputs(self):
        from mlflow.types.schema import ColSpec, Schema

        return Schema([ColSpec("double", name) for name in PYFUNC_COLUMNS])

    def test_errors(self, cfg, params: dict, files: list[Path], test, val) -> dict[str, float]:
        """RMSE per component, of the 6 unique ones, of L0 and of L2."""
        folder = next(p for p in files if p.is_dir())
        return prefixed("test", component_rmse(tensors_of(test, cfg, params), SAGPR.load(folder).predict(test.frames)))

    def score(self, cfg, params: dict, data, workdir: Path) -> Scored:
        self.check_trial(params)
        return score_sagpr(cfg, params, data, workdir)

    def calibration_pairs(self, cfg, params: dict, files: list[Path], split, data):
        """Errors and posterior std of the 6 unique Cartesian components, in the model's units."""
        model = SAGPR.load(next(p for p in files if p.is_dir()))
        if not model.variance_:
            return None
        predicted, std = model.predict(split.frames, return_std=True)
        key = data.keys.polarizability
        return unique_components(predicted - tensors_of(split, cfg, params, key)), unique_components(std), "polarizability"

    def set_std_scale(self, files: list[Path], scale: float) -> None:
        folder = next(p for p in files if p.is_dir())
        model = SAGPR.load(folder)
        if model.variance_:  # the scale was fitted to the std as reported, i.e. with any earlier scale in
            model.variance_["scale"] = np.array(float(model.variance_.get("scale", 1.0)) * float(scale))
            model.save(folder)


def unique_components(tensors: np.ndarray) -> np.ndarray:
    """(n, 6): the upper-triangle components of symmetric (n, 3, 3) tensors."""
    rows, cols = np.array(list(COMPONENTS.values())).T
    return np.asarray(tensors)[:, rows, cols]


def score_sagpr(cfg, model: dict, data, workdir: Path) -> Scored:
    """Fit an SA-GPR model of the polarizability; metrics are RMSEs per component, L=0, L=2 and overall."""
    tensor_key = data.keys.polarizability
    train_true, val_true = tensors_of(data.train, cfg, model, tensor_key), tensors_of(data.val, cfg, model, tensor_key)
    estimator = SAGPR(**{key: model[key] for key in ESTIMATOR_KEYS}, cache_dir=model["cache_dir"])
    try:
        start = time.perf_counter()
        estimator.fit(data.train.frames, train_true)
        fit_time = time.perf_counter() - start
        start = time.perf_counter()
        train_pred = estimator.train_predictions_
        val_pred, val_std = estimator.predict(data.val.frames, return_std=True) if estimator.variance_ else (estimator.predict(data.val.frames), None)
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
    artifacts = []
    if val_std is not None:  # calibration of the posterior std on the validation split (hpo.calibration)
        _, calibrated = calibration.calibrate(
            "polarizability", {"val": (unique_components(val_pred - val_true), unique_components(val_std))},
            workdir / "calibration_polarizability.png", f"SA-GPR polarizability std, {data.val.path.name}")
        found.update(calibrated)
        artifacts.append(workdir / "calibration_polarizability.png")
    if model["cache_dir"]:
        Cache(model["cache_dir"]).trim(int(model["cache_max_gb"] * 1e9))
    return Scored(
        metrics=found,
        params={**flatten(model), "threads": cfg.threads, "n_env_effective": estimator.n_env_},
        tags={"overfit": str(overfit).lower(), "cache": dict(estimator.cache_stats_), "kernel_route": estimator.kernel_route_},
        artifacts=[workdir / "train_errors.csv", workdir / "validation_errors.csv", parity, *artifacts],
        model_files=[model_dir],
    )


KIND = SagprKind()
