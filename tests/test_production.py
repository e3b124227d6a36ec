"""Promote a tiny study's best trial, load it back by alias, run MD with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ase.io
import json
import os
import signal
import time
import urllib.request

import mlflow
import numpy as np
import pytest

import hpo
from hpo import serving

from hpo import md as hpo_md
from hpo.registry import promote as hpo_promote
from hpo.registry.resolve import PromoteError
from hpo.search import loop, storage
from hpo.config import load_config, output_overrides

from helpers import TINY_GAP, free_port


@pytest.fixture(scope="module")
def promoted_root(tiny_data, tmp_path_factory):
    """One promoted study shared by this module's tests (promotion is the slow part)."""
    root = tmp_path_factory.mktemp("promoted")
    # gap_fit fitting forces too: its fits of these slices include a stable trial for the screen (see test_trust)
    # (the uncertainty rule is recorded, not judged: 10-frame models extrapolate in a quarter of their MD frames)
    overrides = [f"dataset.data_dir={tiny_data}", *output_overrides(root), *TINY_GAP, "model.solver=gap_fit", "model.fit_forces=true",
                 "md.stability.max_extrapolating_fraction=null"]
    cfg = load_config([*overrides, "study.n_trials=2"])
    loop.run(cfg)
    return overrides, cfg, hpo_promote.promote(cfg)


@pytest.fixture
def promoted(promoted_root):
    _, cfg, lineage = promoted_root
    return cfg, lineage


@pytest.fixture
def promoted_cfg(promoted_root):
    overrides = promoted_root[0]
    return lambda *extra: load_config([*overrides, *extra])


def test_promote_registers_champion_with_lineage(promoted):
    cfg, lineage = promoted
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version_by_alias("water-gap", "champion")
    assert version.version == lineage["version"]
    tags = version.tags
    assert tags["study"] == cfg.study.name
    assert tags["trial"] == str(lineage["trial"])
    assert "sha256.gap_input_50.xyz" in tags and "gap_fit_command" in tags
    assert "version.quippy-ase" in tags and "param.n_max" in tags
    # screened (promote.screen, k=3 of 2 trials) and evaluated once on the test split
    assert tags["md_stable"] == "true" and "screened" in tags
    assert float(tags["test_energy_rmse"]) > 0 and tags["train_file"] == "gap_input_50.xyz"

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/water-gap@champion")
    validation = f"{cfg.dataset.data_dir}/gap_validate.xyz"
    frames = ase.io.read(validation, ":")
    predicted = model.predict(serving.structures_input(frames))
    assert list(predicted.columns) == ["energy", "forces"] and len(predicted) == 6
    assert np.all(np.isfinite(predicted["energy"])) and np.shape(predicted["forces"][0]) == (12, 3)
    # the same model from Python with its calibrated posterior std (scikit-learn's return_std)
    import hpo

    numpy_energies, std = hpo.load_model("models:/water-gap@champion", cfg.tracking.tracking_uri).predict(frames, return_std=True)
    assert np.abs(numpy_energies - np.asarray(predicted["energy"], dtype=float)).max() < 1e-6 and std.shape == (6,) and np.all(std > 0)

    again = hpo_promote.promote(cfg)  # same trial: reuses the version, no duplicate
    assert again["version"] == lineage["version"]


@pytest.mark.parametrize("ensemble", ["nve", "nvt"])
def test_md_with_champion(promoted_cfg, ensemble):
    cfg = promoted_cfg(f"md={ensemble}", "md.steps=20", "md.timestep_fs=0.25")
    result = hpo_md.main(cfg)
    outdir = result["outdir"]
    assert (outdir / f"{ensemble}.log").is_file() and (outdir / "md.png").is_file()
    import ase.io

    frames = ase.io.read(result["trajectory"], ":")
    assert len(frames) == 21 and result["steps_completed"] == 20
    # the model's std per frame and per atom in the trajectory, and as a metric history on the run
    assert all(f.info["energy_std_eV_per_atom"] > 0 and f.arrays["local_energy_std_eV"].shape == (12,) for f in frames)
    assert result["energy_std_eV_per_atom_max"] == pytest.approx(max(f.info["energy_std_eV_per_atom"] for f in frames))
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run_id = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                "tags.run_type = 'md'", order_by=["attributes.start_time DESC"])[0].info.run_id
    assert len(client.get_metric_history(run_id, "energy_std_eV_per_atom")) == 21
    assert result["break_even_steps"] > 0 and result["speedup_per_step"] > 1
    # the study's reference data (10 training + 6 validation frames) is part of the model's cost
    assert result["reference_data_cost_s"] == 16 * cfg.md.reference_cost_s_per_frame
    assert result["training_cost_s"] == pytest.approx(result["search_time_s"] + result["reference_data_cost_s"])
    assert result["md_stable"] is True and result["stable_until_step"] == 20
    if ensemble == "nve":
        # a smooth small model conserves energy over 5 fs: well under 10 meV per atom
        assert result["max_abs_energy_change_eV"] / 12 < 0.01


def test_md_blow_up_guard_keeps_frames(promoted_cfg):
    # a local model file of any name works as well as a registry URI
    local = next(Path(promoted_cfg().experiments_dir).rglob("gap.xml"))
    renamed = local.with_name("my_water_model.xml")
    renamed.write_bytes(local.read_bytes())
    cfg = promoted_cfg("md.steps=20", "md.max_temperature_K=100", f"md.model_uri={renamed}")
    with pytest.raises(hpo_md.MDBlowUp, match=r"temperature .* \(bound md.max_temperature_K=100") as caught:
        hpo_md.main(cfg)
    # judged on the frames kept: the stability bound follows md.max_temperature_K
    verdict = caught.value.verdict
    assert not verdict.stable and verdict.first_unstable_step == 0 and "temperature 300 K at step 0" in verdict.reason


def test_promote_bad_inputs(tiny_cfg, tiny_overrides, tmp_path):
    with pytest.raises(storage.StudyError, match="no study named 'nothing-here'"):
        hpo_promote.promote(tiny_cfg("study.name=nothing-here", "study.n_trials=1"))
    # gap_fit aborts on sparse_method=uniform for descriptors of more than 30 dimensions (n_max >= 2, l_max 2: 31)
    cfg = tiny_cfg("study.n_trials=1", "study.name=all-fail", "model.solver=gap_fit", "model.sparse_method=uniform",
                   "~search.space", "+search.space={n_max:{type:int,low:2,high:3}}")
    with pytest.raises(storage.StudyError, match=r"4 of 4 trials failed \(study.max_failure_rate=0.5\)"):
        loop.run(cfg)
    with pytest.raises(PromoteError, match="has no finished trial"):
        hpo_promote.promote(cfg)
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "md", *tiny_overrides, "md.model_uri=models:/water-gap@missing"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 2 and "does not resolve" in done.stderr


def test_pipeline_runs_every_stage_then_reuses_them(tiny_data, tmp_path, capsys):
    from hpo import pipeline

    overrides = [
        f"dataset.data_dir={tiny_data}",
        *output_overrides(tmp_path),
        "pipeline.gap_trials=2",
        "pipeline.gap_train_size=50",
        "pipeline.sagpr_trials=2",
        "pipeline.sagpr_train_size=50",
        "pipeline.gap_overrides=['model.n_max=2','model.l_max=2','model.n_sparse=20','model.cutoff=3.0','search=gap_small','model.solver=gap_fit','model.fit_forces=true']",
        "pipeline.sagpr_overrides=['search=sagpr_small','model.n_max=2','model.l_max=2','model.nc=null','model.rc=3.0']",
        "md.steps=10",
        "md.stability.max_extrapolating_fraction=null",
    ]
    first = pipeline.run(overrides)
    assert first["md"]["steps_completed"] == 10
    assert first["polarize"]["n_frames"] == 11 and 0 <= first["polarize"]["fraction_outside"] <= 1
    assert 0 <= first["polarize"]["fraction_uncertain"] <= 1 and first["polarize"]["uncertainty_threshold"] > 0
    assert first["md"]["md_stable"] is True
    client = mlflow.tracking.MlflowClient(load_config(overrides).tracking.tracking_uri)
    sagpr = client.get_model_version("water-sagpr", first["sagpr_version"]).tags
    assert float(sagpr["test_rmse"]) > 0 and float(sagpr["test_rmse_xx"]) > 0 and "md_stable" not in sagpr
    # the same through the command line: every stage is found done and reused
    done = subprocess.run(
        [sys.executable, "-m", "hpo", "pipeline", *overrides], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reused") == 2 and done.stdout.count("reusing") == 2 and "already holds study" in done.stdout
    assert f"GAP version {first['gap_version']}," in done.stdout
    # an MD that leaves the stability criteria (here: a 1000 K floor) is not used for polarizabilities
    # (the gate is off, else promote itself would refuse every candidate under that floor)
    with pytest.raises(hpo_md.MDUnstable, match=r"not stable \(md_stable=false\): temperature .* at step 0"):
        pipeline.run([*overrides, "promote.screen.k=0", "md.stability.min_temperature_K=1000"])


def test_numpy_solved_trial_is_refitted_by_gap_fit_at_promotion(tiny_cfg):
    cfg = tiny_cfg("study.n_trials=2", "promote.screen.k=0")
    study = loop.run(cfg)
    assert {t.user_attrs.get("model_files") is not None for t in study.trials} == {True}
    lineage = hpo_promote.promote(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version("water-gap", lineage["version"])
    assert "gap_fit" in version.tags["gap_fit_command"] and "sparse_method=index_file" in version.tags["gap_fit_command"]
    promote_run = client.get_run(version.run_id)
    # gap_fit, handed hpo's sparse points, fits the model the numpy solver fitted
    assert promote_run.data.metrics["refit_max_energy_difference_eV"] < 1e-6
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (registered,) = list(model_dir.rglob("gap.xml"))
    assert "GAP_hpo" not in registered.read_text()[:500]  # gap_fit's own XML, not the one hpo's solver wrote


def test_promotion_registers_hpos_model_when_gap_fit_would_pass_the_budget(tiny_cfg):
    """A budget gap_fit's refit of the whole training set would pass, while a subset fits: hpo's own model is
    registered, after gap_fit and hpo's solver agreed on that subset; the choice and the check are recorded."""
    from hpo.config import model_params
    from hpo.data import load_datasets
    from hpo.models.gap.kind import gap_fit_memory_bytes

    cfg = tiny_cfg("study.n_trials=1", "promote.screen.k=0", "study.name=own-model")
    study = loop.run(cfg)
    params = {**model_params(cfg), **study.best_trial.params}
    frames = load_datasets(cfg).train.frames
    budget_gb = (gap_fit_memory_bytes(params, frames) + gap_fit_memory_bytes(params, frames[: len(frames) // 2])) / 2 / 1e9
    lineage = hpo_promote.promote(tiny_cfg("study.n_trials=1", "promote.screen.k=0", "study.name=own-model", f"model.memory_budget_gb={budget_gb}"))
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version("water-gap", lineage["version"])
    figures = client.get_run(version.run_id).data.metrics
    assert figures["production_gap_fit_refit"] == 0.0 and figures["refit_estimate_gb"] > budget_gb
    assert len(frames) // 2 <= figures["check_frames"] < len(frames)
    assert figures["check_max_energy_difference_eV"] < 1e-6
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (registered,) = list(model_dir.rglob("gap.xml"))
    assert "GAP_hpo" in registered.read_text()[:500]  # the XML hpo's solver wrote, in gap_fit's layout


def test_champion_as_an_ase_calculator(promoted, tiny_data):
    """``hpo.load_calculator`` on the registry URI gives quippy's energies and forces of the champion's XML."""
    import ase.io

    import hpo
    from hpo.models.gap import gap_fit

    cfg, lineage = promoted
    frames = ase.io.read(tiny_data / "gap_validate.xyz", ":2")
    calc = hpo.load_calculator("models:/water-gap@champion", tracking_uri=cfg.tracking.tracking_uri)
    energies, forces = [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (xml,) = list(model_dir.rglob(gap_fit.MODEL_FILE))
    reference_energies, reference_forces = gap_fit.predict(gap_fit.load(xml), frames)
    np.testing.assert_allclose(energies, reference_energies, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.concatenate(forces), np.concatenate(reference_forces), rtol=0, atol=1e-9)
    study = hpo.load_study(cfg.study.name, storage=cfg.study.storage)
    assert len(study.trials) == 2


def champion_reference(cfg, lineage, frames):
    """Energies and forces of ``frames`` from the champion's XML, through quippy in this process."""
    from hpo.models.gap import gap_fit

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/water-gap/{lineage['version']}", tracking_uri=cfg.tracking.tracking_uri))
    (xml,) = list(model_dir.rglob(gap_fit.MODEL_FILE))
    return gap_fit.predict(gap_fit.load(xml), frames), model_dir


def test_registered_gap_loads_in_a_fresh_process_and_is_served(promoted, tiny_data, tmp_path):
    """Issue 23, item 4: the registered pyfunc carries its requirements (hpo pinned), signature and input
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


def test_runs_record_the_datasets_they_saw(promoted):
    """Every trial run and the promote run list their data files as MLflow dataset inputs (the UI's Dataset column)."""
    cfg, lineage = promoted
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version("water-gap", lineage["version"])
    contexts = {d.dataset.name: [t.value for t in d.tags] for d in client.get_run(version.run_id).inputs.dataset_inputs}
    assert contexts == {"gap_input_50.xyz": ["training"], "gap_validate.xyz": ["validation"], "gap_input_400-minus-gap_input_50.xyz": ["test"]}
    trial_run = client.get_run(lineage["trial_run_id"])
    assert {d.dataset.name for d in trial_run.inputs.dataset_inputs} == {"gap_input_50.xyz", "gap_validate.xyz"}
    assert {d.dataset.digest for d in trial_run.inputs.dataset_inputs} == {lineage["sha256.gap_input_50.xyz"][:16], lineage["sha256.gap_validate.xyz"][:16]}
