"""Tests of hpo.md: MD with a GAP (a local file or the registered champion), its stability judged on every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
import mlflow

from hpo import md as hpo_md, stability
from hpo.data import load_datasets
from hpo.models.gap.gap_fit import load

from helpers import runs_of, default_of, model_file

# slow (pyproject.toml markers): every test runs on a promoted study or a finished two-trial study (conftest, ~10-35 s to make)
pytestmark = pytest.mark.slow


# MD: stability is judged on every run
def test_md_trace_with_a_broken_bond_is_unstable_at_its_step(tiny_study):
    """Real MD (the default trial's GAP, 20 steps logged every 2); then one hydrogen pushed onto its
    oxygen from the fifth logged frame on (MD step 8): md's judging path names that step and the H-O pair."""
    cfg = tiny_study("md.steps=20", "md.log_interval=2")
    default = default_of(cfg)
    data = load_datasets(cfg)
    ranges = stability.training_ranges(data.train.frames)
    _, trace, blow_up = hpo_md.run(data.val.frames[0], load(model_file(default)), cfg.md, Path(cfg.experiments_dir) / "md-intact")
    assert blow_up is None and trace.steps == list(range(0, 21, 2))

    intact = hpo_md.judge_trace(trace, ranges, cfg.md, Path(cfg.experiments_dir) / "md-intact")
    assert intact.verdict.stable and intact.metrics["md_stable"] == 1.0 and intact.tags["md_stable"] == "true"
    assert intact.verdict.last_step == 20 and "drift_meV_per_atom_per_ps" in intact.metrics
    assert (Path(cfg.experiments_dir) / "md-intact" / "distance_bands.png").is_file()

    hydrogen = trace.frames[0].get_chemical_symbols().index("H")
    for frame in trace.frames[4:]:
        oxygens = [i for i, s in enumerate(frame.get_chemical_symbols()) if s == "O"]
        vectors = frame.get_distances(hydrogen, oxygens, mic=True, vector=True)
        bond = vectors[np.argmin(np.linalg.norm(vectors, axis=1))]  # H -> its nearest O
        frame.positions[hydrogen] += bond * (1 - 0.3 / np.linalg.norm(bond))  # 0.3 Å from that O
    broken = hpo_md.judge_trace(trace, ranges, cfg.md)
    assert not broken.verdict.stable and broken.verdict.first_unstable_step == 8
    assert broken.verdict.reason.startswith("H-O nearest-neighbour distance 0.30 Å at step 8, training range")
    assert broken.tags["md_first_unstable_step"] == "8" and broken.metrics["first_unstable_step"] == 8.0


def test_md_main_records_verdict_and_costs(tiny_study, capsys):
    """``hpo md`` with a local model: the verdict, drift, distance bands and the cost assumptions are recorded."""
    cfg = tiny_study("md.steps=10", "md.reference_cost_s_per_frame=30", f"md.model_uri={model_file(default_of(tiny_study()))}")
    result = hpo_md.main(cfg)
    out = capsys.readouterr().out
    assert result["md_stable"] is True and result["verdict"].stable and result["first_unstable_step"] is None
    assert "MD stability" in out and "stable: every frame up to step 10" in out
    assert "ASSUMED md.reference_cost_s_per_step" in out and "search time UNKNOWN" in out
    # 10 training + 6 validation frames at an assumed 30 s each, no search time (a local file has no lineage)
    assert result["reference_data_cost_s"] == 16 * 30 and result["training_cost_s"] == 16 * 30
    assert "energy_drift_eV_per_atom_per_ps" not in result and "drift_meV_per_atom_per_ps" in result
    parents, _ = runs_of(cfg)
    run = next(r for r in parents if r.data.tags.get("run_type") == "md")
    assert run.info.status == "FINISHED" and run.data.tags["md_stable"] == "true"
    assert run.data.metrics["md_stable"] == 1.0 and "nn_min_H-O" in run.data.metrics and "train_nn_max_H-O" in run.data.metrics
    assert "ASSUMED" in run.data.tags["cost_assumptions"]
    artifacts = {f.path for f in MlflowClient(cfg.tracking.tracking_uri).list_artifacts(run.info.run_id)}
    assert {"distance_bands.png", "nn_distances.csv", "md.png"} <= artifacts
    assert "md_stability_bounds" in run.data.tags and "literature default" in run.data.tags["md_stability_bounds"]


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


def _emt_md(atoms, steps: int, every: int, temperature_K: float, seed: int, warm_up: int = 100) -> list:
    """Frames of a Langevin MD of ``atoms`` with ASE's EMT, one every ``every`` steps after ``warm_up`` steps."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dynamics = Langevin(atoms, 2 * units.fs, temperature_K=temperature_K, friction=0.05, rng=rng)
    dynamics.run(warm_up)
    frames = []
    for _ in range(steps // every):
        dynamics.run(every)
        frames.append(atoms.copy())
    return frames


def test_rdf_reference_is_the_training_frames_of_the_start_frames_composition():
    """Training of two compositions (Cu and CuAl cells) pooled: a CuAl MD's Cu-Cu RDF is far from the pooled one
    (the false alarm this guards against), near the CuAl frames' own; judge_trace compares with the latter and
    says so; with validation frames the bound widens to their largest departure; a composition absent from
    training is not judged, and says why."""
    from ase.build import bulk
    from hpo.config import load_config

    copper = bulk("Cu", "fcc", a=3.63, cubic=True).repeat((2, 2, 2))
    alloy = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((2, 2, 2))
    alloy.set_chemical_symbols(["Cu", "Al"] * 16)
    training = _emt_md(copper, 40, 4, 600.0, 0) + _emt_md(alloy, 40, 4, 600.0, 1)
    md = _emt_md(alloy, 40, 4, 600.0, 2)
    trace = hpo_md.Trace(steps=list(range(len(md))), temperature=[600.0] * len(md), frames=md,
                         time_fs=[2.0 * i for i in range(len(md))])
    md_cfg = load_config(["md.stability.rdf_window_frames=5", "md.ensemble=nvt"]).md
    criteria = hpo_md.criteria_of(md_cfg)
    r_max = stability.usable_range([*stability.of_composition(training, md[0]), md[0]])
    pooled = stability.windowed_rdf_mae(md, stability.rdf(training, r_max, criteria.rdf_bin_A), 5)
    own = stability.windowed_rdf_mae(md, stability.rdf(stability.of_composition(training, md[0]), r_max, criteria.rdf_bin_A), 5)
    assert np.nanmax(pooled["Cu-Cu"]) > criteria.rdf_max_mae > np.nanmax(own["Cu-Cu"])

    judged = hpo_md.judge_trace(trace, stability.training_ranges(training), md_cfg, training=training, train_name="train.xyz")
    assert judged.verdict.stable, judged.verdict.reason
    assert judged.verdict.bounds["rdf_reference"] == "10 frames of train.xyz of the start frame's composition AlCu"
    assert np.nanmax(judged.verdict.rdf_mae["Cu-Cu"]) == pytest.approx(np.nanmax(own["Cu-Cu"]))

    # single validation frames of the alloy depart by up to 1.15 A (noise of 32-atom cells): the bound widens to that
    validation = _emt_md(alloy, 12, 4, 600.0, 3) + training[:2]
    floor = max(np.nanmax(v) for v in stability.windowed_rdf_mae(validation[:3], stability.rdf(training[10:], r_max, criteria.rdf_bin_A), 1).values())
    assert floor > criteria.rdf_max_mae
    widened = hpo_md.judge_trace(trace, stability.training_ranges(training), md_cfg, training=training, train_name="train.xyz",
                                 validation=validation, val_name="val.xyz")
    assert widened.verdict.bounds["rdf"].startswith(f"{floor:.3g} Å: the largest departure of one of 3 frames of val.xyz of that composition")
    assert widened.verdict.stable and f"rdf_max_mae={floor}" in widened.tags["md_stability_criteria"]

    only_copper = hpo_md.judge_trace(trace, stability.training_ranges(training), md_cfg, training=training[:10], train_name="cu.xyz")
    assert only_copper.verdict.bounds["rdf"] == "not judged: no frame of cu.xyz has the start frame's composition AlCu"
    assert not only_copper.verdict.rdf_mae
