"""The registered SA-GPR model as an MLflow pyfunc, logged as code (MLflow's models-from-code).

MLflow stores this file as text next to the model's arrays (npz, read with ``allow_pickle=False``) and
imports it when the model is loaded: nothing is unpickled. It imports hpo, which the model's requirements
pin to the version that registered it. Load a promoted model with::

    import hpo.serving
    model = mlflow.pyfunc.load_model("models:/water-sagpr@champion")
    out = model.predict(hpo.serving.structures_input(frames))   # columns alpha_xx ... alpha_zz

(the unit of the training data: atomic units for the workshop water set), serve it with ``mlflow models
serve``, read the folder ``model_files/`` with ``hpo.models.sagpr.estimator.SAGPR.load``, or take
``hpo.load_polarizability`` for an ASE polarizability calculator.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class SagprPyfunc(mlflow.pyfunc.PythonModel):
    """The 9 polarizability components of each structure under an SA-GPR model."""

    def load_context(self, context):
        from hpo.models.sagpr.estimator import SAGPR

        self.model = SAGPR.load(Path(context.artifacts["model_files"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from hpo import serving
        from hpo.models.sagpr.kind import PYFUNC_COLUMNS

        tensors = self.model.predict(serving.structures_of(model_input))
        return pd.DataFrame(tensors.reshape(len(tensors), 9), columns=list(PYFUNC_COLUMNS))


mlflow.models.set_model(SagprPyfunc())
