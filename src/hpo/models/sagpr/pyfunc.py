"""The registered SA-GPR model as an MLflow pyfunc, logged as code (MLflow's models-from-code).

MLflow stores this file as text next to the model's arrays (npz, read with ``allow_pickle=False``) and
imports it when the model is loaded: nothing is unpickled. Load a promoted model with::

    model = mlflow.pyfunc.load_model("models:/water-sagpr@champion")
    tensors = model.predict(["frames.xyz"])         # (n, 3, 3) polarizabilities

or read the folder ``model_files/`` with ``hpo.models.sagpr.estimator.SAGPR.load``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class SagprPyfunc(mlflow.pyfunc.PythonModel):
    """Polarizability tensors (n, 3, 3) of extended-XYZ frames under an SA-GPR model."""

    def load_context(self, context):
        from hpo.models.sagpr.estimator import SAGPR

        self.model = SAGPR.load(Path(context.artifacts["model_files"]))

    def predict(self, context, model_input: list[str], params=None):
        import ase.io

        frames = [atoms for path in model_input for atoms in ase.io.read(path, ":")]
        return self.model.predict(frames)


mlflow.models.set_model(SagprPyfunc())
