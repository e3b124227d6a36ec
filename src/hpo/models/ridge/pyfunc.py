"""The registered ridge model as an MLflow pyfunc, logged as code: energies (eV) and forces (eV/Å) per structure."""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import pandas as pd

from hpo import serving
from hpo.models.ridge.kind import MODEL_FILE, RidgeModel


class RidgePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model = RidgeModel.load(Path(context.artifacts["model_files"]) / MODEL_FILE)

    def predict(self, context, model_input, params=None):
        frames = serving.structures_of(model_input)
        return pd.DataFrame({"energy": self.model.energies(frames), "forces": [self.model.forces(a).tolist() for a in frames]})


mlflow.models.set_model(RidgePyfunc())
