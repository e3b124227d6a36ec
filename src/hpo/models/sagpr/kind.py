"""SA-GPR, the model kind: symmetry-adapted GPR of the polarizability on lambda-SOAP features.

One fit is ``estimator.SAGPR`` on the training frames; its predictions are compared per tensor component
(``TensorPredictions``). The kind is imported only when asked for, so GAP runs never import featomic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpo import plots
from hpo.data import read_tensors
from hpo.metrics import COMPONENTS
from hpo.models.base import FitContext, Fitted, ModelKind, Predictions, TrialFailure
from hpo.models.sagpr.estimator import SAGPR, component_rmse
from hpo.models.sagpr.parameters import ESTIMATOR_KEYS, PARAMETERS


def prefixed(prefix: str, errors: dict[str, float]) -> dict[str, float]:
    """``component_rmse`` keys -> trial metric names: val_rmse (6 unique), val_rmse_xx, val_rmse_L0, ..."""
    names = {"unique6": f"{prefix}_rmse", "all9": f"{prefix}_rmse_all9"}
    return {names.get(key, f"{prefix}_rmse_{key}"): value for key, value in errors.items()}


def unique_components(tensors: np.ndarray) -> np.ndarray:
    """(n, 6): the upper-triangle components of symmetric (n, 3, 3) tensors."""
    rows, cols = np.array(list(COMPONENTS.values())).T
    return np.asarray(tensors)[:, rows, cols]


@dataclass
class TensorPredictions(Predictions):
    """(n, 3, 3) polarizabilities in the data's unit, and their posterior std (None: the model keeps none)."""

    tensors: np.ndarray
    std: np.ndarray | None = None

    quantity = "polarizability"
    overfit_stems = (("rmse", "overfit"),)

    def errors(self, prefix: str, truth: "TensorPredictions") -> dict[str, float]:
        """RMSE per component, of the 6 unique ones, of all 9, of L0 and of L2."""
        return prefixed(prefix, component_rmse(truth.tensors, self.tensors))

    def table(self, truth: "TensorPredictions") -> str:
        header = ",".join([f"true_{c}" for c in COMPONENTS] + [f"pred_{c}" for c in COMPONENTS])
        index = tuple(np.array(list(COMPONENTS.values())).T)
        rows = [np.concatenate([t[index], p[index]]) for t, p in zip(truth.tensors, self.tensors)]
        return header + "\n" + "".join(",".join(f"{v:.8f}" for v in row) + "\n" for row in rows)

    @classmethod
    def parity_plot(cls, path: Path, series: dict, title: str) -> Path:
        return plots.tensor_parity_plot(path, {name: (truth.tensors, pred.tensors) for name, (truth, pred) in series.items()}, title)

    def calibration_pairs(self, truth: "TensorPredictions"):
        """Errors and posterior std of the 6 unique Cartesian components, in the model's units."""
        return None if self.std is None else (unique_components(self.tensors - truth.tensors), unique_components(self.std))


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

    def reference(self, split, params: dict, context: FitContext) -> TensorPredictions:
        # the split's own key: an own data set's test split may name it differently from the training set
        return TensorPredictions(read_tensors(split.frames, key=split.keys.polarizability, source=split.path.name,
                                              symmetry_tol=params["symmetry_tol"]))

    def fit(self, train, params: dict, workdir: Path, context: FitContext, upcoming=()) -> Fitted:
        """Fit an SA-GPR model of the polarizability; it is saved in ``workdir/model``."""
        truth = self.reference(train, params, context).tensors
        estimator = SAGPR(**{key: params[key] for key in ESTIMATOR_KEYS}, cache_dir=params["cache_dir"])
        start = time.perf_counter()
        try:
            estimator.fit(train.frames, truth)
        except np.linalg.LinAlgError as exc:
            raise TrialFailure("error", f"SA-GPR regression failed (reg too small?): {exc}") from exc
        fit_time = time.perf_counter() - start
        model_dir = workdir / "model"
        estimator.save(model_dir)
        return Fitted(
            model_files=[model_dir],
            params=params,
            chosen={"n_env_effective": estimator.n_env_},
            metrics={"fit_time_s": fit_time, **{f"fit_{k}": v for k, v in estimator.timings_.items()}},
            tags={"cache": dict(estimator.cache_stats_), "kernel_route": estimator.kernel_route_},
            train_predictions=TensorPredictions(estimator.train_predictions_),
            state=estimator,
        )

    def evaluate(self, fitted: Fitted, frames) -> TensorPredictions:
        return self._predict(fitted.state, frames, with_std=True)

    def _predict(self, estimator: SAGPR, frames, with_std: bool) -> TensorPredictions:
        try:
            if with_std and estimator.variance_:
                return TensorPredictions(*estimator.predict(frames, return_std=True))
            return TensorPredictions(estimator.predict(frames))
        except np.linalg.LinAlgError as exc:
            raise TrialFailure("error", f"SA-GPR regression failed (reg too small?): {exc}") from exc

    def files_in(self, path: Path) -> list[Path]:
        return [path]

    def holds(self, path: Path) -> bool:
        return path.is_dir() and (path / "metadata.json").is_file() and (path / "model.npz").is_file()

    def load(self, files: list[Path]) -> SAGPR:
        """The estimator: ``predict(frames, return_std=, progress=)`` gives (n, 3, 3) tensors in the data's unit."""
        return SAGPR.load(next(p for p in files if p.is_dir()))

    def predict(self, files: list[Path], frames, params: dict, with_std: bool = False) -> TensorPredictions:
        return self._predict(self.load(files), frames, with_std)

    def set_std_scale(self, files: list[Path], scale: float) -> None:
        folder = next(p for p in files if p.is_dir())
        model = SAGPR.load(folder)
        if model.variance_:  # the scale was fitted to the std as reported, i.e. with any earlier scale in
            model.variance_["scale"] = np.array(float(model.variance_.get("scale", 1.0)) * float(scale))
            model.save(folder)


KIND = SagprKind()
