"""The registered GAP as an MLflow pyfunc, logged as code (MLflow's models-from-code).

MLflow stores this file as text next to the model files and imports it when the model is loaded: nothing
is unpickled. It imports hpo, which the model's requirements pin to the version that registered it, so it
loads wherever that hpo is pip-installed. Load a promoted GAP with::

    import hpo.serving
    model = mlflow.pyfunc.load_model("models:/water-gap@champion")
    out = model.predict(hpo.serving.structures_input(frames))   # columns energy (eV), forces (eV/A per atom)

or serve it (``mlflow models serve -m models:/water-gap@champion --env-manager local``; the request's form is
in ``hpo.serving``). The ``gap.xml`` (artifact ``model_files/``) is quippy's ``Potential`` for MD.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class GapPyfunc(mlflow.pyfunc.PythonModel):
    """Energies (eV) and forces (eV/A) of structures under a GAP; the XML sits in the artifacts."""

    def load_context(self, context):
        from hpo.models.gap import gap_fit

        # parsing the XML costs seconds for a production model: once per load, not per request
        self.potential = gap_fit.load(Path(context.artifacts["model_files"]) / gap_fit.MODEL_FILE)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from hpo import serving
        from hpo.models.gap import gap_fit

        energies, forces = gap_fit.predict(self.potential, serving.structures_of(model_input))
        return pd.DataFrame({"energy": energies, "forces": [f.tolist() for f in forces]})


mlflow.models.set_model(GapPyfunc())
