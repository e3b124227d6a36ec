"""The registered MACE as an MLflow pyfunc, logged as code: energies (eV) and forces (eV/Å) per structure.

Load a promoted MACE with ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and predict on
``hpo.serving.structures_input(frames)``; the ``mace.model`` (artifact ``model_files/``) is mace-torch's own
model file, which ``MACECalculator`` runs MD with.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class MacePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from hpo.models.mace.kind import MODEL_FILE

        self.model_file = Path(context.artifacts["model_files"]) / MODEL_FILE

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from hpo import serving
        from hpo.models.mace import engine

        energies, forces = engine.predict(self.model_file, serving.structures_of(model_input))
        return pd.DataFrame({"energy": energies, "forces": [f.tolist() for f in forces]})


mlflow.models.set_model(MacePyfunc())
