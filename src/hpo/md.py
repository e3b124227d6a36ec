"""Molecular dynamics with a promoted model of a kind that drives MD (``ModelKind.calculator``): NVE (velocity Verlet) or NVT (Langevin), with ASE.

Outputs go to one run directory: the ASE log (``nve.log`` / ``nvt.log``), the
trajectory as extended XYZ, ``energies.csv`` and a PNG of energies and
temperature against time. A blow-up guard stops the run when the temperature
or the largest force passes its bound, keeping what was written so far.

Stability is an observable of every run (``hpo.stability``): the logged frames
are judged against the nearest-neighbour distance ranges of the model's training
frames with the criteria of ``md.stability``; the verdict (``md_stable``, the
first unstable MD step and why), the per-pair distances (``nn_distances.csv``,
``distance_bands.png``) and the NVE energy drift are recorded. A run that blew
up is judged on the frames it kept. Bounds widen where the training data reach
further, the RDF of the run is compared with the training frames', and with a
model that keeps its posterior (every promoted GAP) each frame's predictive std
is written into the trajectory, logged as a metric history and judged against
the largest std on the validation frames (``md.stability``).
"""

from __future__ import annotations

import time
from dataclasses import replace, dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from hpo import config as hpo_config
from hpo import plots, stability
from hpo.safe_files import atomic_write, write_text
from hpo.config import ConfigError
from hpo.data import model_data
from hpo.models import md_kind
from hpo.progress import Bar
from hpo.registry.resolve import for_kind, resolve_model, version_tags
from hpo.tracking import Tracker, provenance_tags


class MDBlowUp(RuntimeError):
    """The dynamics left the physical range; the run stopped early. ``verdict``: the stability verdict of the frames kept."""

    def __init__(self, message: str, verdict: stability.Verdict | None = None):
        super().__init__(message)
        self.verdict = verdict


class MDUnstable(RuntimeError):
    """A later stage refuses a trajectory whose stability verdict is not stable."""


@dataclass
class Trace:
    """Per-step observables, appended by the observer."""

    time_fs: list[float] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    kinetic: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    max_force: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # MD step number of each logged frame (dynamics.nsteps)
    frames: list[ase.Atoms] = field(default_factory=list)  # the logged frames, without calculator

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
        trace.steps.append(int(dynamics.nsteps))
        frame = atoms.copy()
        frame.calc = None
        frame.info["time_fs"] = trace.time_fs[-1]
        frame.info["md_step"] = trace.steps[-1]
        trace.frames.append(frame)
        ase.io.write(trajectory, frame, format="extxyz", append=True)
        if trace.temperature[-1] > md_cfg.max_temperature_K or trace.max_force[-1] > md_cfg.max_force_eV_per_A:
            raise MDBlowUp(
                f"MD stopped at t = {trace.time_fs[-1]:.1f} fs: temperature {trace.temperature[-1]:.0f} K "
                f"(bound md.max_temperature_K={md_cfg.max_temperature_K}), largest force "
                f"{trace.max_force[-1]:.1f} eV/A (bound md.max_force_eV_per_A={md_cfg.max_force_eV_per_A}). "
                f"The first {len(trace.time_fs)} frames are kept in {trajectory}."
            )

    dynamics.attach(observe, interval=md_cfg.log_interval)
    bar = Bar(md_cfg.steps, f"[hpo] {md_cfg.ensemble.upper()} MD", "steps")  # a bar on a terminal, a line every 10 s in a log
    dynamics.attach(lambda: bar.set(dynamics.nsteps), interval=1)
    blow_up = None
    start = time.perf_counter()
    try:
        dynamics.run(md_cfg.steps)
    except MDBlowUp as exc:
        blow_up = str(exc)
    bar.close()
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
    """Temperature statistics, largest energy change and cost per step (the drift: :func:`judge_trace`)."""
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
    return metrics


def criteria_of(md_cfg) -> stability.StabilityCriteria:
    """The stability criteria of ``md.stability`` (sources in conf/md/nve.yaml)."""
    section = md_cfg.stability
    try:
        return stability.StabilityCriteria(
            max_departure_A=float(section.max_departure_A),
            max_h_distance_A=float(section.max_h_distance_A),
            min_temperature_K=float(section.min_temperature_K),
            max_temperature_K=float(section.max_temperature_K),
            max_extrapolating_fraction=None if section.max_extrapolating_fraction is None else float(section.max_extrapolating_fraction),
            rdf_max_mae=None if section.rdf_max_mae is None else float(section.rdf_max_mae),
            rdf_window_frames=int(section.rdf_window_frames),
            rdf_bin_A=float(section.rdf_bin_A),
            rdf_min_range_A=float(section.rdf_min_range_A),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"md.stability={dict(section)} is not allowed: {exc}") from None


@dataclass
class Stability:
    """The stability record of one trajectory: verdict, flat metrics and tags for MLflow, the files written."""

    verdict: stability.Verdict
    metrics: dict[str, float]
    tags: dict[str, str]
    files: list[Path]

    def describe(self) -> str:
        v = self.verdict
        if v.stable:
            return f"stable: every frame up to step {v.last_step} within the training distances"
        return f"UNSTABLE from step {v.first_unstable_step}: {v.reason}"


@dataclass
class Along:
    """The model's std along a trajectory, and the threshold beyond which a frame is extrapolating."""

    uncertainty: object  # hpo.models.base.Uncertainty
    threshold: float
    source: str


def uncertainty_threshold(model_kind, files: list[Path], validation, validation_name: str, md_cfg) -> tuple[float, str] | None:
    """``md.stability.uncertainty_factor`` x the model's largest std on the ``validation`` frames, and that
    sentence (None when the model keeps no posterior)."""
    reference = model_kind.predictive_std(files, validation)
    if reference is None:
        return None
    largest = float(np.max(reference.per_frame[reference.primary]))
    factor = float(md_cfg.stability.uncertainty_factor)
    return factor * largest, f"{factor:g} x the largest {reference.primary} on {validation_name}, {largest:.3g}"


def uncertainty_along(model_kind, files: list[Path], frames, threshold: tuple[float, str] | None) -> Along | None:
    """The model's std on ``frames`` (NaN on frames whose positions are not finite) against ``threshold``."""
    if threshold is None:
        return None
    finite = [i for i, atoms in enumerate(frames) if np.isfinite(atoms.positions).all()]
    found = model_kind.predictive_std(files, [frames[i] for i in finite])
    if found is None:
        return None
    for name, values in found.per_frame.items():
        full = np.full(len(frames), np.nan)
        full[finite] = values
        found.per_frame[name] = full
    if found.per_atom is not None:
        per_atom = [np.full(len(atoms), np.nan) for atoms in frames]
        for i, values in zip(finite, found.per_atom):
            per_atom[i] = values
        found.per_atom = per_atom
    return Along(found, threshold[0], threshold[1])


def write_uncertainty(trajectory: Path, frames, along: Along) -> None:
    """The trajectory again, each frame with its std (``info``) and, per atom, its local std (``arrays``)."""
    found = along.uncertainty
    for i, atoms in enumerate(frames):
        for name, values in found.per_frame.items():
            atoms.info[name] = float(values[i])
        atoms.info["extrapolating"] = bool(found.per_frame[found.primary][i] > along.threshold)  # NaN: False
        if found.per_atom is not None:
            atoms.arrays[found.per_atom_name] = np.asarray(found.per_atom[i], dtype=float)
    with atomic_write(trajectory) as tmp:
        ase.io.write(tmp, list(frames), format="extxyz")


def rdf_bound_from_validation(criteria: stability.StabilityCriteria, bounds: dict[str, str], reference: stability.RDF,
                              validation: list, val_name: str) -> tuple[stability.StabilityCriteria, dict[str, str]]:
    """The RDF bound widened to what real frames show: the largest departure (any pair) of one of ``validation``
    (frames of the start frame's composition) from ``reference``, when above ``rdf_max_mae``.

    Why: with cells of tens of atoms and tens of training frames, spread over temperatures, g(r) is noisy and
    averaged over states; ASE's EMT itself, run for 100 NVE steps from validation frames of EMT Cu/CuAl sets
    (32-atom cells, 40 training frames per composition; 64-atom cells of benchmarks/bench_kinds.py, 3), departed
    by 0.77-1.45 A from its training RDF on 7 start frames, above the literature's 1 A on 4. A single validation frame is noisier than a window of MD frames, so this
    bound passes an MD as close to the training data as the validation data are; a melting or collapsing cell
    still departs further, and the distance and uncertainty criteria still apply."""
    if not validation:
        return criteria, bounds
    departures = stability.windowed_rdf_mae(validation, reference, 1)
    floor = max(float(np.nanmax(values)) for values in departures.values())
    if not np.isfinite(floor) or floor <= criteria.rdf_max_mae:
        return criteria, bounds
    window = criteria.rdf_window_frames
    bounds = {**bounds, "rdf": (f"{floor:.3g} Å: the largest departure of one of {len(validation)} frames of {val_name} of that composition "
                                f"from the training RDF (configured {criteria.rdf_max_mae:g} Å; integral of |g_MD - g_train| dr over "
                                f"0-{reference.r_max:.2f} Å, windows of {window} frames)")}
    return replace(criteria, rdf_max_mae=floor), bounds


def judge_trace(
    trace: Trace, ranges: dict[str, tuple[float, float]], md_cfg, outdir: Path | None = None, title: str = "",
    training=None, train_name: str = "", along: Along | None = None, validation=None, val_name: str = "",
) -> Stability:
    """Judge the logged frames of ``trace`` against ``ranges`` (training nearest-neighbour ranges) with the
    criteria of ``md.stability``; with ``outdir`` write ``nn_distances.csv`` and ``distance_bands.png``.
    With ``training`` (frames of ``train_name``) the bounds widen where those frames reach further, and the RDF
    criterion compares with the RDF of those of the start frame's composition; with ``validation`` too (frames of
    ``val_name``), its bound widens to the largest departure of one validation frame of that composition (see
    :func:`rdf_bound_from_validation`); with ``along`` the uncertainty criterion applies."""
    criteria = criteria_of(md_cfg)
    bounds, reference = None, None
    if training is not None:
        criteria, bounds = stability.bounds_from_training(criteria, training, train_name)
        if criteria.rdf_max_mae is not None:
            # the reference RDF is that of the training frames of the start frame's composition: a Cu cell's
            # Cu-Cu RDF is not that of a CuAl cell, and isolated atoms have none
            start = trace.frames[0]
            alike = stability.of_composition(training, start)
            r_max = stability.usable_range([*alike, start]) if alike else 0.0
            if not alike:
                bounds["rdf"] = f"not judged: no frame of {train_name} has the start frame's composition {stability.composition(start)}"
            elif r_max >= max(criteria.rdf_min_range_A, 2 * criteria.rdf_bin_A):
                reference = stability.rdf(alike, r_max, criteria.rdf_bin_A)
                bounds["rdf_reference"] = f"{len(alike)} frames of {train_name} of the start frame's composition {stability.composition(start)}"
                if validation is not None:
                    criteria, bounds = rdf_bound_from_validation(criteria, bounds, reference, stability.of_composition(validation, start), val_name)
            else:
                bounds["rdf"] = (f"not judged: the cells' usable range {r_max:.2f} Å (half the smallest cell height) is below "
                                 f"md.stability.rdf_min_range_A={criteria.rdf_min_range_A:g} Å")
    if along is None:  # said, not silently left out: a kind without a predictive std (or a model without its posterior)
        bounds = {**(bounds or {}), "uncertainty": "not available: the model keeps no predictive std"}
    verdict = stability.judge(
        trace.frames, trace.temperature, trace.steps, ranges, criteria, bounds=bounds, reference_rdf=reference,
        uncertainty=None if along is None else along.uncertainty.per_frame[along.uncertainty.primary],
        uncertainty_threshold=None if along is None else along.threshold, uncertainty_source="" if along is None else along.source,
    )
    metrics = dict(verdict.metrics)
    for name, (low, high) in ranges.items():
        metrics[f"train_nn_min_{name}"], metrics[f"train_nn_max_{name}"] = low, high
    n_atoms = len(trace.frames[0])
    if md_cfg.ensemble == "nve" and len(trace.time_fs) > 1:
        # the total energy of NVE is conserved: its drift measures the integration and the model's smoothness
        metrics.update(stability.energy_drift(trace.time_fs, trace.total, trace.kinetic, n_atoms))
    tags = {
        "md_stable": str(verdict.stable).lower(),
        "md_first_unstable_step": "none" if verdict.stable else str(verdict.first_unstable_step),
        "md_stability_reason": verdict.reason or "none",
        "md_stability_criteria": ", ".join(f"{k}={v}" for k, v in vars(criteria).items()),
        "md_stability_bounds": "; ".join(f"{k}: {v}" for k, v in verdict.bounds.items()) or "none",
    }
    files: list[Path] = []
    if outdir is not None:
        names = sorted(verdict.distances)
        write_text(
            outdir / "nn_distances.csv",
            "step,time_fs," + ",".join(f"nn_min_{n}_A,nn_max_{n}_A" for n in names) + "\n"
            + "".join(
                f"{step},{t:.3f}," + ",".join(f"{verdict.distances[n][i, 0]:.5f},{verdict.distances[n][i, 1]:.5f}" for n in names) + "\n"
                for i, (step, t) in enumerate(zip(trace.steps, trace.time_fs))
            ),
        )
        files.append(outdir / "nn_distances.csv")
        unstable_time = None
        if not verdict.stable:
            unstable_time = trace.time_fs[trace.steps.index(verdict.first_unstable_step)]
        files.append(
            stability.distance_bands_plot(
                outdir / "distance_bands.png", trace.time_fs, verdict.distances, ranges, criteria,
                title or f"{md_cfg.ensemble.upper()} MD: {'stable' if verdict.stable else 'unstable'}",
                first_unstable_time_fs=unstable_time,
            )
        )
    return Stability(verdict, metrics, tags, files)


def cost_comparison(
    ml_s_per_step: float, reference_s_per_step: float, search_time_s: float, n_reference_frames: int, reference_s_per_frame: float
) -> dict[str, float]:
    """Speed-up per step and the number of MD steps after which the model paid off.

    The model's cost is the hyperparameter search (measured) plus the reference calculations of the
    frames the study learned from and was selected on (``n_reference_frames`` x
    ``reference_s_per_frame``, an assumption). Break-even: reference * n = cost + ml * n, so
    n = cost / (reference - ml).
    """
    data_cost = n_reference_frames * reference_s_per_frame
    training_cost = search_time_s + data_cost
    saved = reference_s_per_step - ml_s_per_step
    return {
        "speedup_per_step": reference_s_per_step / ml_s_per_step,
        "break_even_steps": training_cost / saved if saved > 0 else float("inf"),
        "training_cost_s": training_cost,
        "search_time_s": search_time_s,
        "reference_data_cost_s": data_cost,
        "reference_frames": float(n_reference_frames),
    }


def main(cfg) -> dict:
    """``python -m hpo md``: MD with ``md.model_uri``, recorded in MLflow next to the model's lineage.

    Returns the metrics, the output paths and the stability verdict (``verdict``, ``md_stable``).
    """
    md_cfg = cfg.md
    criteria_of(md_cfg)  # a wrong md.stability stops before any work
    tracker = Tracker(cfg.tracking)
    outdir = hpo_config.output_path(cfg.experiments_dir) / "md" / f"{md_cfg.ensemble}-{time.strftime('%Y%m%d-%H%M%S')}"
    model_kind = md_kind(cfg.model.kind)
    uri = for_kind(md_cfg.model_uri, model_kind.name)
    lineage = version_tags(uri, tracker.tracking_uri)
    model_kind = md_kind(lineage.get("param.kind") or model_kind.name)  # a registered model says what it is
    given = Path(uri).expanduser()
    files = model_kind.files_in(given if given.exists() else resolve_model(uri, tracker.tracking_uri, outdir / "model"))
    data = model_data(cfg, lineage=lineage)  # the frames the model was selected on and trained on
    validation, frames, train_name, training = data.val.path, data.val.frames, data.train.path.name, data.train.frames
    if not 0 <= md_cfg.start_frame < len(frames):
        raise ConfigError(f"md.start_frame={md_cfg.start_frame} is not allowed: 0..{len(frames) - 1} ({validation.name})")
    ranges = stability.training_ranges(training)

    tags = {
        "command": "md", "run_type": "md", "model_uri": uri, "stability_reference": train_name,
        **{f"model.{k}": v for k, v in lineage.items() if not k.startswith("version.")}, **provenance_tags(),
    }
    with tracker.run(f"md-{md_cfg.ensemble}", tags=tags) as run_id:
        tracker.log_config(run_id, cfg)
        metrics, trace, blow_up = run(frames[md_cfg.start_frame], model_kind.calculator(files), md_cfg, outdir)
        title = f"{md_cfg.ensemble.upper()} MD, {model_kind.display_name} {uri}, start {validation.name}[{md_cfg.start_frame}]"
        threshold = uncertainty_threshold(model_kind, files, frames, validation.name, md_cfg)
        along = uncertainty_along(model_kind, files, trace.frames, threshold)
        judged = judge_trace(trace, ranges, md_cfg, outdir, f"{title}\nnearest-neighbour distances vs {train_name} ({len(training)} frames)",
                             training=training, train_name=train_name, along=along, validation=frames, val_name=validation.name)
        metrics.update(judged.metrics)
        if along is not None:
            write_uncertainty(outdir / "trajectory.xyz", trace.frames, along)
            tracker.log_history(run_id, along.uncertainty.per_frame, trace.steps)
            metrics["uncertainty_threshold"] = along.threshold
            for name, values in along.uncertainty.per_frame.items():
                metrics[f"{name}_max"] = float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")
        cost, assumptions = cost_lines(cfg, lineage, metrics, len(training) + len(frames))
        metrics.update(cost)
        figure = plots.md_plot(outdir / "md.png", trace.time_fs, trace.potential, trace.kinetic, trace.temperature, title)
        tracker.log(
            run_id,
            params={f"md.{k}": v for k, v in md_cfg.items() if k != "stability"} | {f"md.stability.{k}": v for k, v in md_cfg.stability.items()},
            metrics=metrics,
            tags={"blow_up": blow_up or "none", "outdir": outdir, **judged.tags, "cost_assumptions": assumptions},
        )
        tracker.log_artifacts(run_id, [outdir / f"{md_cfg.ensemble}.log", outdir / "trajectory.xyz", outdir / "energies.csv", figure, *judged.files])
        print(f"[hpo] {md_cfg.ensemble.upper()} MD in {outdir} (MLflow run {run_id})")
        for key, value in metrics.items():
            print(f"  {key:<34}{value:.6g}")
        print(f"[hpo] cost comparison: {assumptions}")
        print(f"[hpo] MD stability ({train_name} ranges, md.stability): {judged.describe()}", flush=True)
        print(f"[hpo] bounds: {judged.tags['md_stability_bounds']}", flush=True)
        if blow_up:
            raise MDBlowUp(f"{blow_up} Stability of the frames kept: {judged.describe()}", judged.verdict)
    if not judged.verdict.stable:
        print("[hpo] warning: the trajectory left the training distribution; do not use it for analysis", flush=True)
    return {
        "outdir": outdir,
        "trajectory": outdir / "trajectory.xyz",
        **metrics,
        "md_stable": judged.verdict.stable,
        "first_unstable_step": judged.verdict.first_unstable_step,
        "stability_reason": judged.verdict.reason,
        "verdict": judged.verdict,
    }


def cost_lines(cfg, lineage: dict, metrics: dict, n_reference_frames: int) -> tuple[dict[str, float], str]:
    """The break-even metrics, and a sentence saying which of their inputs are measured and which assumed."""
    md_cfg = cfg.md
    search = float(lineage.get("search_time_s", "nan"))
    known_search = np.isfinite(search)
    cost = cost_comparison(
        metrics["wall_time_per_step_s"], float(md_cfg.reference_cost_s_per_step), search if known_search else 0.0,
        n_reference_frames, float(md_cfg.reference_cost_s_per_frame),
    )
    sentence = (
        f"ASSUMED md.reference_cost_s_per_step={md_cfg.reference_cost_s_per_step} s (one ab initio MD step) and "
        f"md.reference_cost_s_per_frame={md_cfg.reference_cost_s_per_frame} s x {n_reference_frames} reference frames "
        f"(training + validation); MEASURED: ML MD {metrics['wall_time_per_step_s']:.3g} s/step, "
        + (f"search time {search:.0f} s (study lineage)" if known_search else "search time UNKNOWN (no study lineage): not counted")
    )
    return cost, sentence
