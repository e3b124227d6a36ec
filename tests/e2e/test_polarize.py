"""`hpo polarize` end to end: an SA-GPR study through the same study, MLflow and promotion machinery as GAP,
then the polarizability of a trajectory (workshop data and own data with its own key, then its spectrum)."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hpo import polarize
from hpo.analysis import report
from hpo.progress import format_value
from hpo.registry import promote as hpo_promote
from hpo.search import loop
from hpo.config import ConfigError, load_config, output_overrides

from helpers import runs_of, TINY_SAGPR

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow
PER_COMPONENT = {f"val_rmse_{c}" for c in ("xx", "xy", "xz", "yy", "yz", "zz")}


def test_sagpr_study_promote_and_polarize(sagpr_cfg, tiny_data, tmp_path, capsys):
    cfg = sagpr_cfg("study.n_trials=3", "study.cv_folds=2")
    study = loop.run(cfg)
    assert cfg.study.name == "water-sagpr-50" and cfg.study.metric == "val_rmse"
    assert len(study.trials) == 3
    parents, children = runs_of(cfg)
    assert len(parents) == 1 and len(children) == 3
    for child in children:
        metrics = child.data.metrics
        assert PER_COMPONENT | {"val_rmse", "val_rmse_L0", "val_rmse_L2", "train_rmse", "rmse_gap", "rmse_ratio"} <= set(metrics)
        # the overfitting signal belongs to the fit on the training split (val_rmse is the 2 folds' mean)
        assert metrics["rmse_gap"] == pytest.approx(metrics["split_val_rmse"] - metrics["train_rmse"])
        artifacts = {a.path for a in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(child.info.run_id)}
        assert "parity_polarizability.png" in artifacts
    # trials 1 and 2 share the cache with trial 0 whenever their descriptor matches
    assert any((tmp_path / "experiments" / "sagpr_cache").rglob("*.npz"))

    # resuming it without cross-validation would mix split values with CV means
    with pytest.raises(ConfigError, match=r"scored its trials with study.cv_folds=2, this run asks for 1"):
        loop.run(sagpr_cfg("study.n_trials=4"))
    lineage = hpo_promote.promote(cfg)
    assert lineage["name"] == "water-sagpr"
    assert all(c.data.tags["kernel_route"] in ("pairs", "factorised") and c.data.params["n_env_effective"] == "None" for c in children)
    # the report puts the promoted trial and the default side by side: split, 2-fold CV, test
    page = report.write_report(cfg).html.read_text()
    table = page.split(f"<h2>{report.SECTIONS['generalisation']}")[1].split("</table>")[0]
    promoted, default = lineage["trial"], study.trials[0]
    assert f"<td>{promoted}</td>" in table and "(2 folds)" in table and "not promoted yet" not in table
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.search_runs([parents[0].info.experiment_id], "tags.run_type = 'promote'")[0]
    assert format_value(run.data.metrics["test_rmse"]) in table and format_value(run.data.metrics["default_test_rmse"]) in table
    assert format_value(default.user_attrs["split_val_rmse"]) in table
    trajectory = tiny_data / "gap_validate.xyz"
    result = polarize.main(sagpr_cfg(f"polarize.trajectory={trajectory}", "polarize.reference_train_size=50"))
    tensors = result["tensors"]
    assert tensors.shape == (6, 3, 3)
    np.testing.assert_allclose(tensors, tensors.transpose(0, 2, 1), atol=1e-10)
    lines = (result["outdir"] / "trajectory_cartesian.out").read_text().splitlines()
    assert len(lines) == 6 and all(len(line.split()) == 9 for line in lines)
    written = ase.io.read(result["outdir"] / "trajectory_polarizability.xyz", ":")
    np.testing.assert_allclose(np.reshape(written[2].info["Polarizability"], (3, 3)), tensors[2], atol=1e-8)
    assert (result["outdir"] / "polarizability.png").is_file()
    assert "predicted vs training data" in capsys.readouterr().out

    # the registered pyfunc: the 9 components per structure, as polarize predicts them
    import mlflow

    from hpo import serving

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    frames = ase.io.read(trajectory, ":")
    table = mlflow.pyfunc.load_model("models:/water-sagpr@champion").predict(serving.structures_input(frames))
    assert list(table.columns) == [f"alpha_{a}{b}" for a in "xyz" for b in "xyz"]
    np.testing.assert_allclose(table.to_numpy(), tensors.reshape(6, 9), rtol=0, atol=1e-9)
    check_polarizability_calculator(cfg, frames, tensors, tmp_path)

    carbon = ase.io.read(trajectory, ":2")
    carbon[1].numbers[0] = 6
    ase.io.write(tmp_path / "carbon.xyz", carbon)
    with pytest.raises(polarize.PolarizeError, match=r"carbon.xyz: frame 1 contains species C not seen in training"):
        polarize.main(sagpr_cfg(f"polarize.trajectory={tmp_path / 'carbon.xyz'}", "polarize.reference_train_size=50"))


def check_polarizability_calculator(cfg, frames, tensors, tmp_path):
    """``hpo.load_polarizability``: the model's tensors, and in ASE's unit through StaticRamanCalculator."""
    from ase.calculators.emt import EMT
    from ase.units import Bohr, Ha
    from ase.vibrations.placzek import PlaczekStatic
    from ase.vibrations.raman import StaticRamanCalculator

    import hpo

    alpha = hpo.load_polarizability("models:/water-sagpr@champion", tracking_uri=cfg.tracking.tracking_uri)
    np.testing.assert_allclose(alpha.predict(frames), tensors, rtol=0, atol=1e-9)
    atoms = frames[0].copy()
    np.testing.assert_allclose(alpha(atoms), tensors[0] * Bohr**2 / Ha, rtol=1e-12)  # atomic units -> e^2 A^2 / eV
    atoms.calc = EMT()  # cheap forces: the polarizability side is under test
    name = str(tmp_path / "raman")
    StaticRamanCalculator(atoms, lambda: alpha, name=name, indices=[0, 1, 2], delta=0.01).run()
    intensities = PlaczekStatic(atoms, name=name, indices=[0, 1, 2]).get_absolute_intensities()
    assert len(intensities) == 9 and np.all(np.isfinite(intensities)) and intensities.max() > 0


def test_sagpr_on_own_data_polarize_and_spectrum(tiny_data, tmp_path, capsys):
    """dataset=files with its own polarizability key: study, promotion, polarize and spectrum all find it."""
    from hpo import spectrum

    frames = ase.io.read(tiny_data / "gap_input_100.xyz", ":")
    for atoms in frames:
        atoms.info["alpha"] = atoms.info.pop("Polarizability")
    ase.io.write(tmp_path / "mine_train.xyz", frames[:10], format="extxyz")
    ase.io.write(tmp_path / "mine_val.xyz", frames[10:], format="extxyz")
    trajectory = [frames[10 + i % 4].copy() for i in range(12)]
    # the last frame with one O-H bond 0.6 A longer: beyond the validation set for the model's own std
    hydrogen = 1
    bond = trajectory[-1].get_distance(0, hydrogen, mic=True, vector=True)
    trajectory[-1].positions[hydrogen] += 0.6 * bond / np.linalg.norm(bond)
    for step, atoms in enumerate(trajectory):
        atoms.info = {"time_fs": 0.5 * step}
    ase.io.write(tmp_path / "trajectory.xyz", trajectory, format="extxyz")
    tiny = [o for o in TINY_SAGPR if not o.startswith("dataset.")]
    own = ["dataset=files", f"dataset.train={tmp_path / 'mine_train.xyz'}", f"dataset.val={tmp_path / 'mine_val.xyz'}", "dataset.name=mine"]
    make = lambda *extra: load_config([*output_overrides(tmp_path), *tiny, *own, *extra])  # noqa: E731

    cfg = make("study.n_trials=2")
    assert cfg.dataset.train_size is None and cfg.study.name == "mine-sagpr-all"
    loop.run(cfg)
    assert hpo_promote.promote(cfg)["name"] == "mine-sagpr"
    assert "no test split (dataset.test is not given)" in capsys.readouterr().out
    # a tight outlier threshold, so that some frames count as extrapolated
    result = polarize.main(make(f"polarize.trajectory={tmp_path / 'trajectory.xyz'}", "polarize.outlier_sigma=2.5"))
    assert 0 < result["n_outside"] < 12
    written = ase.io.read(result["outdir"] / "trajectory_polarizability.xyz", ":")
    np.testing.assert_allclose(np.reshape(written[1].info["alpha"], (3, 3)), result["tensors"][1], atol=1e-8)
    out = capsys.readouterr().out
    assert "predicted vs training data (train.xyz)" in out and "frames/s" in out
    # each written frame says whether it was predicted beyond the training data's spread; spectrum counts them
    assert [atoms.info["polarizability_extrapolated"] for atoms in written].count(True) == result["n_outside"]
    found = spectrum.main(make(f"spectrum.trajectory={result['outdir'] / 'trajectory_polarizability.xyz'}", "spectrum.min_frames=10"))
    assert (found["outdir"] / "raman.png").is_file()
    assert found["fraction_extrapolated"] == pytest.approx(result["fraction_outside"])
    # the model's own std: validation frames never pass the largest validation std; stretching a frame raises its std
    flags = [atoms.info["polarizability_uncertain"] for atoms in written]
    assert not any(flags[:11]) and flags.count(True) == result["n_uncertain"]
    stds = [atoms.info["polarizability_std_max"] for atoms in written]
    assert max(stds[:11]) <= result["uncertainty_threshold"] and stds[11] > 1.2 * stds[3]  # frame 3: the same frame unstretched
    assert found["fraction_uncertain"] == pytest.approx(result["fraction_uncertain"])
