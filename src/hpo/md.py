"""Molecular dynamics with a promoted GAP: NVE (velocity Verlet) or NVT (Langevin), with ASE.

Outputs go to one run directory: the ASE log (``nve.log`` / ``nvt.log``), the
trajectory as extended XYZ, ``energies.csv`` and a PNG of energies and
temperature against time. A blow-up guard stops the run when the temperature
or the largest force passes its bound, keeping what was written so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from hpo.atomic import write_text
from hpo.config import ConfigError


class MDBlowUp(RuntimeError):
    """The dynamics left the physical range; the run stopped early."""


@dataclass
class Trace:
    """Per-step observables, appended by the observer."""

    time_fs: list[float] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    kinetic: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    max_force: list[float] = field(default_factory=list)

    @property
    def total(self) -> np.ndarray:
        return np.asarray(self.potential) + np.asarray(self.kinetic)


def make_dynamics(atoms: ase.Atoms, md_cfg, logfile: Path):
    timestep = md_cfg.timestep_fs * units.fs
    if md_cfg.ensemble == "nve":
        return VelocityVerlet(atoms, timestep=timestep, logfile=str(logfile), loginterval=md_cfg.log_interval)
    if md_cfg.ensemble == "nvt":
        return Langevin(
            atoms,
            timestep=timestep,
            temperature_K=md_cfg.temperature_K,
            friction=md_cfg.friction_per_fs / units.fs,
            fixcm=False,  # ASE's fixcm=True samples a biased NVT distribution for small cells like these
            rng=np.random.default_rng(md_cfg.seed + 1),
            logfile=str(logfile),
            loginterval=md_cfg.log_interval,
        )
    raise ConfigError(f"md.ensemble={md_cfg.ensemble!r} is not allowed: one of ('nve', 'nvt')")


def run(atoms: ase.Atoms, calculator, md_cfg, outdir: Path) -> tuple[dict, Trace, str | None]:
    """Run the configured dynamics from ``atoms``; return metrics, the trace and a blow-up message (or None)."""
    outdir.mkdir(parents=True, exist_ok=True)
    atoms = atoms.copy()
    atoms.calc = calculator
    # Maxwell-Boltzmann momenta rescaled to exactly the configured temperature, as the hand workflow did
    thermalize_momenta(atoms, md_cfg.temperature_K, exact_temperature=True, rng=np.random.default_rng(md_cfg.seed))
    trajectory = outdir / "trajectory.xyz"
    trajectory.unlink(missing_ok=True)
    dynamics = make_dynamics(atoms, md_cfg, outdir / f"{md_cfg.ensemble}.log")
    trace = Trace()

    def observe() -> None:
        forces = atoms.get_forces()
        trace.time_fs.append(dynamics.get_time() / units.fs)
        trace.potential.append(atoms.get_potential_energy())
        trace.kinetic.append(atoms.get_kinetic_energy())
        trace.temperature.append(atoms.get_temperature())
        trace.max_force.append(float(np.linalg.norm(forces, axis=1).max()))
        frame = atoms.copy()
        frame.calc = None
        frame.info["time_fs"] = trace.time_fs[-1]
        ase.io.write(trajectory, frame, format="extxyz", append=True)
        if trace.temperature[-1] > md_cfg.max_temperature_K or trace.max_force[-1] > md_cfg.max_force_eV_per_A:
            raise MDBlowUp(
                f"MD stopped at t = {trace.time_fs[-1]:.1f} fs: temperature {trace.temperature[-1]:.0f} K "
                f"(bound md.max_temperature_K={md_cfg.max_temperature_K}), largest force "
                f"{trace.max_force[-1]:.1f} eV/A (bound md.max_force_eV_per_A={md_cfg.max_force_eV_per_A}). "
                f"The first {len(trace.time_fs)} frames are kept in {trajectory}."
            )

    dynamics.attach(observe, interval=md_cfg.log_interval)
    blow_up = None
    start = time.perf_counter()
    try:
        dynamics.run(md_cfg.steps)
    except MDBlowUp as exc:
        blow_up = str(exc)
    wall = time.perf_counter() - start
    steps_done = dynamics.nsteps
    write_text(
        outdir / "energies.csv",
        "time_fs,potential_eV,kinetic_eV,total_eV,temperature_K,max_force_eV_per_A\n"
        + "".join(
            f"{t:.3f},{p:.8f},{k:.8f},{p + k:.8f},{T:.3f},{f:.5f}\n"
            for t, p, k, T, f in zip(trace.time_fs, trace.potential, trace.kinetic, trace.temperature, trace.max_force)
        ),
    )
    return summarise(trace, len(atoms), steps_done, wall, md_cfg), trace, blow_up


def summarise(trace: Trace, n_atoms: int, steps_done: int, wall_s: float, md_cfg) -> dict[str, float]:
    """Energy drift (NVE quality), temperature statistics and cost per step."""
    time_ps = np.asarray(trace.time_fs) / 1000.0
    total = trace.total
    metrics = {
        "steps_completed": steps_done,
        "temperature_mean_K": float(np.mean(trace.temperature)),
        "temperature_std_K": float(np.std(trace.temperature)),
        "max_abs_energy_change_eV": float(np.max(np.abs(total - total[0]))),
        "wall_time_s": wall_s,
        "wall_time_per_step_s": wall_s / max(steps_done, 1),
        "ms_per_atom_per_step": 1000.0 * wall_s / max(steps_done, 1) / n_atoms,
    }
    if len(time_ps) > 1:
        # slope of a straight-line fit: the drift, robust to the step-to-step oscillation of E_tot
        metrics["energy_drift_eV_per_atom_per_ps"] = float(np.polyfit(time_ps, total / n_atoms, 1)[0])
    return metrics


def cost_comparison(ml_s_per_step: float, reference_s_per_step: float, training_cost_s: float) -> dict[str, float]:
    """Speed-up per step and the number of MD steps after which training the model paid off.

    Break-even: reference * n = training + ml * n, so n = training / (reference - ml).
    """
    saved = reference_s_per_step - ml_s_per_step
    return {
        "speedup_per_step": reference_s_per_step / ml_s_per_step,
        "break_even_steps": training_cost_s / saved if saved > 0 else float("inf"),
        "training_cost_s": training_cost_s,
    }


def main(cfg) -> dict:
    """``python -m hpo md``: MD with ``md.model_uri``, recorded in MLflow next to the model's lineage."""
    from hpo import config as hpo_config
    from hpo import plots
    from hpo.data import find_data_dir, read_frames
    from hpo.models.gap.gap_fit import MODEL_FILE, load
    from hpo.registry.resolve import resolve_model, version_tags
    from hpo.tracking import Tracker, provenance_tags

    md_cfg = cfg.md
    tracker = Tracker(cfg.tracking)
    outdir = hpo_config.output_path(cfg.experiments_dir) / "md" / f"{md_cfg.ensemble}-{time.strftime('%Y%m%d-%H%M%S')}"
    given = Path(str(md_cfg.model_uri)).expanduser()
    # a local XML of any name, or the gap.xml inside a promoted model
    model_file = given if given.is_file() else resolve_model(str(md_cfg.model_uri), tracker.tracking_uri, outdir / "model") / MODEL_FILE
    lineage = version_tags(str(md_cfg.model_uri), tracker.tracking_uri)
    validation = find_data_dir(cfg.dataset, [cfg.dataset.validation_file]) / cfg.dataset.validation_file
    frames = read_frames(validation, cfg.dataset.property_keys, need=()).frames
    if not 0 <= md_cfg.start_frame < len(frames):
        raise ConfigError(f"md.start_frame={md_cfg.start_frame} is not allowed: 0..{len(frames) - 1} ({validation.name})")

    run_id = tracker.start_run(
        f"md-{md_cfg.ensemble}",
        tags={"command": "md", "run_type": "md", "model_uri": md_cfg.model_uri, **{f"model.{k}": v for k, v in lineage.items() if not k.startswith("version.")}, **provenance_tags()},
    )
    tracker.log_config(run_id, cfg)
    metrics, trace, blow_up = run(frames[md_cfg.start_frame], load(model_file), md_cfg, outdir)
    training_cost = float(lineage.get("search_time_s", "nan"))
    if np.isfinite(training_cost):
        metrics.update(cost_comparison(metrics["wall_time_per_step_s"], md_cfg.reference_cost_s_per_step, training_cost))
    title = f"{md_cfg.ensemble.upper()} MD, GAP {md_cfg.model_uri}, start {validation.name}[{md_cfg.start_frame}]"
    figure = plots.md_plot(outdir / "md.png", trace.time_fs, trace.potential, trace.kinetic, trace.temperature, title)
    tracker.log(run_id, params={f"md.{k}": v for k, v in md_cfg.items()}, metrics=metrics, tags={"blow_up": blow_up or "none", "outdir": outdir})
    tracker.log_artifacts(run_id, [outdir / f"{md_cfg.ensemble}.log", outdir / "trajectory.xyz", outdir / "energies.csv", figure])
    tracker.end_run(run_id, "FAILED" if blow_up else "FINISHED")
    print(f"[hpo] {md_cfg.ensemble.upper()} MD in {outdir} (MLflow run {run_id})")
    for key, value in metrics.items():
        print(f"  {key:<34}{value:.6g}")
    if blow_up:
        raise MDBlowUp(blow_up)
    return {"outdir": outdir, "trajectory": outdir / "trajectory.xyz", **metrics}
