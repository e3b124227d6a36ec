"""hpo.api from Python, end to end: the README's example (both studies, both promotions, the champions as
ASE calculators) run as it stands in a new process."""

from __future__ import annotations

import pytest
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def readme_python_example() -> str:
    section = (ROOT / "README.md").read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(tiny_data, tmp_path):
    """From an empty folder (the output root) on the tiny water slices: both studies, both promotions, the GAP
    as an ASE calculator and the SA-GPR model in ASE's static Raman calculator."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    # the SA-GPR study trains on the 200-frame file of the workshop set: here the 14-frame slice stands in
    shutil.copy(data / "gap_input_100.xyz", data / "gap_input_200.xyz")
    work = tmp_path / "work"
    work.mkdir()
    example = readme_python_example()
    # one change: a 14-frame GAP extrapolates along its screening MD (a quarter of the frames beyond its own
    # validation std), which the stability gate rightly refuses; the README's GAP sees 200 frames
    gate = 'hpo.promote(["dataset.train_size=200"'
    assert example.count(gate) == 1
    (work / "example.py").write_text(example.replace(gate, gate + ', "md.stability.max_extrapolating_fraction=null"'))
    env = {**os.environ, "HPO_DATA_DIR": str(data)}
    env.pop("HPO_ROOT", None)
    done = subprocess.run([sys.executable, "example.py"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    print(out[-3000:])
    assert re.search(r"^water-gap-200 \d+ [0-9.e-]+ eV per cell \{", out, re.M)
    assert re.search(r"Mode +Frequency +Intensity", out)  # PlaczekStatic's table of the molecule's modes
    client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
    gap, sagpr = (client.get_model_version_by_alias(name, "champion") for name in ("water-gap", "water-sagpr"))
    assert gap.tags["study"] == "water-gap-200" and sagpr.tags["study"] == "water-sagpr-200"
    assert out.strip().splitlines()[-1] == "4"  # load_study: the GAP study's 4 trials
