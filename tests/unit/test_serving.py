"""Tests of hpo.serving: the registered GAP loads in a fresh process and is served by MLflow's model server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
import json
import os
import signal
import time
import urllib.request

import ase.io
import mlflow
import numpy as np
import pytest

import hpo
from hpo import serving

from helpers import free_port

# server (pyproject.toml markers): MLflow's model server
pytestmark = pytest.mark.server


def champion_reference(cfg, lineage, frames):
    """Energies and forces of ``frames`` from the champion's XML, through quippy in this process."""
    from hpo.models.gap import gap_fit

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (xml,) = list(model_dir.rglob(gap_fit.MODEL_FILE))
    return gap_fit.predict(gap_fit.load(xml), frames), model_dir


def test_registered_gap_loads_in_a_fresh_process_and_is_served(promoted, tiny_data, tmp_path):
    """The registered pyfunc carries its requirements (hpo pinned), signature and input
    example; a fresh process loads it by URI; ``mlflow models serve`` answers a request on 127.0.0.1."""
    cfg, lineage = promoted
    frames = ase.io.read(tiny_data / "gap_validate.xyz", ":2")
    (energies, forces), model_dir = champion_reference(cfg, lineage, frames)
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert f"hpo=={hpo.__version__}" in requirements and any(r.startswith("quippy-ase==") for r in requirements)
    info = mlflow.models.get_model_info(f"models:/water-gap/{lineage['version']}")
    assert info.signature.inputs.input_names() == [serving.INPUT_COLUMN]
    assert info.signature.outputs.input_names() == ["energy", "forces"]
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == [serving.INPUT_COLUMN]

    env = {**os.environ, "MLFLOW_TRACKING_URI": str(cfg.tracking.tracking_uri)}
    request = {"dataframe_split": serving.structures_input(frames).to_dict(orient="split", index=False)}
    (tmp_path / "request.json").write_text(json.dumps(request))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/water-gap@champion')\n"
        "table = pd.DataFrame(**json.load(open(sys.argv[1]))['dataframe_split'])\n"
        "print(json.dumps(model.predict(table).to_dict(orient='list')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "request.json")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(fresh["energy"], energies, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.concatenate(fresh["forces"]), np.concatenate(forces), rtol=0, atol=1e-9)

    # the server runs `uvicorn` from PATH: the environment's scripts, as in an activated virtual environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/water-gap@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("mlflow models serve did not answer /ping: " + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        post = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as response:
            answer = json.loads(response.read())
        print("request:", json.dumps(request)[:300], "...\nresponse:", json.dumps(answer)[:300], "...")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
    rows = answer["predictions"]
    assert len(rows) == 2
    np.testing.assert_allclose([row["energy"] for row in rows], energies, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.concatenate([row["forces"] for row in rows]), np.concatenate(forces), rtol=0, atol=1e-9)
