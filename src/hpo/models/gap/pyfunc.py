"""The registered GAP as an MLflow pyfunc, logged as code (MLflow's models-from-code).

MLflow stores this file as text next to the model files and imports it when the model is loaded:
nothing is unpickled. Load a promoted GAP with::

    model = mlflow.pyfunc.load_model("models:/water-gap@champion")
    energies = model.predict(["frames.xyz"])        # eV per frame

or take its ``gap.xml`` (artifact ``model_files/``) into quippy's ``Potential`` for MD.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class GapPyfunc(mlflow.pyfunc.PythonModel):
    """Energies (eV) of extended-XYZ frames under a GAP; the XML sits in the artifacts."""

    def load_context(self, context):
        self.model_dir = Path(context.artifacts["model_files"])

    def predict(self, context, model_input: list[str], params=None):
        import ase.io

        from hpo.models.gap import gap_fit

        frames = [atoms for path in model_input for atoms in ase.io.read(path, ":")]
        energies, _ = gap_fit.predict(gap_fit.load(self.model_dir / gap_fit.MODEL_FILE), frames)
        return energies


mlflow.models.set_model(GapPyfunc())
