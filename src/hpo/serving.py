"""What a registered model takes and gives when loaded as an MLflow pyfunc or served by ``mlflow models serve``.

Input, for every model kind: a table with one column ``extxyz``, one structure per row, each an extended-XYZ
text of one frame (species, positions in Angstrom, cell and pbc; any other arrays are ignored). In a request
to a served model (``POST /invocations``)::

    {"dataframe_split": {"columns": ["extxyz"], "data": [["12\\nLattice=\\"...\\" ...\\nO 0.1 0.2 0.3\\n..."]]}}

``structures_input(frames)`` builds that table from ASE ``Atoms``. Output: one row per structure, the columns
the model kind declares (``ModelKind.pyfunc_outputs``): GAP ``energy`` (eV) and ``forces`` (one [fx, fy, fz]
per atom, eV/Angstrom); SA-GPR the 9 polarizability components ``alpha_xx`` ... ``alpha_zz`` row by row, in
the unit of its training data (atomic units for the workshop water set).
"""

from __future__ import annotations

import io

import ase
import ase.io

INPUT_COLUMN = "extxyz"


def structure_text(atoms: ase.Atoms) -> str:
    """One frame as extended XYZ, geometry only: reference energies or tensors of a data set stay out of a request."""
    bare = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    buffer = io.StringIO()
    ase.io.write(buffer, bare, format="extxyz")
    return buffer.getvalue()


def structures_input(frames: list[ase.Atoms]):
    """The pyfunc's input table for ``frames`` (pandas, column ``extxyz``)."""
    import pandas as pd

    return pd.DataFrame({INPUT_COLUMN: [structure_text(atoms) for atoms in frames]})


def structures_of(model_input) -> list[ase.Atoms]:
    """The frames of a pyfunc input: the table above, or a list of extended-XYZ texts. Each text is one structure,
    so the output rows match the input rows."""
    texts = list(model_input[INPUT_COLUMN]) if hasattr(model_input, "columns") else list(model_input)
    frames = []
    for row, text in enumerate(texts):
        read = ase.io.read(io.StringIO(str(text)), index=":", format="extxyz")
        if len(read) != 1:
            raise ValueError(f"row {row} of the input holds {len(read)} structures: give one extended-XYZ frame per row")
        frames.append(read[0])
    return frames


def signature(outputs):
    """The model signature: the ``extxyz`` column in, the kind's ``outputs`` (an MLflow ``Schema``) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=outputs)
