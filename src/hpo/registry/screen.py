"""The stability gate of a promotion (model kinds that drive MD): a short MD of each candidate with the kind's
own calculator (``ModelKind.calculator``), judged like every ``md`` run; the first stable candidate in rank
order is the one registered."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from hpo import config as hpo_config
from hpo import md as hpo_md
from hpo import plots, stability
from hpo.cache import digest
from hpo.models import kind
from hpo.models.base import FitContext, ModelKind, with_values
from hpo.registry.pick import model_files
from hpo.registry.resolve import PromoteError
from hpo.search.selection import primary
from hpo.tracking import Tracker



def screen_settings(cfg) -> dict | None:
    """``promote.screen`` (checked by ``hpo.config.validate``), or None when screening is off (k = 0, or a model
    kind without MD)."""
    screen = cfg.promote.get("screen")
    if screen is None or screen.k == 0 or not kind(cfg.model.kind).drives_md:
        return None
    return {"k": screen.k, "steps": screen.steps, "start_frames": list(screen.start_frames), "ensemble": str(screen.ensemble),
            "friction_per_fs": screen.get("friction_per_fs")}


def screen_md_config(cfg, screen: dict):
    """``cfg.md`` with the screen's steps and ensemble (the thermostat friction of ``promote.screen`` for NVT)."""
    md_cfg = OmegaConf.to_container(cfg.md, resolve=True)
    md_cfg.update(steps=screen["steps"], ensemble=screen["ensemble"])
    if screen["ensemble"] == "nvt" and md_cfg.get("friction_per_fs") is None:
        if screen["friction_per_fs"] is None:
            raise hpo_config.ConfigError("promote.screen.ensemble=nvt needs promote.screen.friction_per_fs (md.friction_per_fs is null)")
        md_cfg["friction_per_fs"] = screen["friction_per_fs"]
    return OmegaConf.create(md_cfg)


def screen_key(cfg, study, candidates, screen: dict | None) -> str:
    """What a screened promotion depends on: a repeated promote with the same key reuses its version."""
    if not screen:
        return "none"
    md_settings = OmegaConf.to_container(cfg.md, resolve=True)
    return digest("promote-screen", study.study_name, [t.number for t in candidates], screen, md_settings)[:16]


@dataclass
class Screened:
    """Outcome of the gate: tags and metrics of the chosen candidate's screen, its figures."""

    tags: dict[str, str]
    metrics: dict[str, float]
    figures: list[Path] = field(default_factory=list)


def screen_trial(cfg, trial, files: list[Path], data, screen: dict, ranges, tracker: Tracker, parent: str, outdir: Path,
                 model_kind: ModelKind, context: FitContext):
    """Short MD of one candidate from each screen start frame, in one nested MLflow run, judged with the
    bounds of ``md.stability`` widened by the training data, their RDF and the candidate's own uncertainty
    (its posterior written beside its model first).

    Returns (stable, why, metrics, figures): ``why`` names the first unstable start frame's verdict.
    """
    md_cfg = screen_md_config(cfg, screen)
    files = model_kind.attach_posterior(with_values(hpo_config.model_params(cfg), trial.params), data, files, context)
    threshold = hpo_md.uncertainty_threshold(model_kind, files, data.val.frames, data.val.path.name, md_cfg)
    tags = {"command": "promote", "run_type": "md_screen", "trial": trial.number, "study": cfg.study.name}
    stable, why, metrics, figures, tags_out = True, "", {}, [], {}
    calculator = model_kind.calculator(files)  # loading a model may cost seconds: once per candidate
    with tracker.run(f"screen-trial{trial.number}", tags=tags, parent_run_id=parent) as run_id:
        for start in screen["start_frames"]:
            where = outdir / f"trial{trial.number}" / f"start{start}"
            found, trace, blow_up = hpo_md.run(data.val.frames[start], calculator, md_cfg, where)
            title = f"screen: trial {trial.number}, {md_cfg.ensemble.upper()} from {data.val.path.name}[{start}]"
            along = hpo_md.uncertainty_along(model_kind, files, trace.frames, threshold)
            judged = hpo_md.judge_trace(trace, ranges, md_cfg, where, title, training=data.train.frames,
                                        train_name=data.train.path.name, along=along, validation=data.val.frames,
                                        val_name=data.val.path.name)
            plot = plots.md_plot(where / "md.png", trace.time_fs, trace.potential, trace.kinetic, trace.temperature, title)
            tracker.log(run_id, metrics={f"start{start}.{k}": v for k, v in {**found, **judged.metrics}.items()},
                        tags={f"start{start}.{k}": v for k, v in {**judged.tags, "blow_up": blow_up or "none"}.items()})
            tracker.log_artifacts(run_id, [where / "trajectory.xyz", where / "energies.csv", plot, *judged.files], f"start{start}")
            figures += [f for f in judged.files if f.suffix == ".png"] + [plot]
            for key, value in {**found, **judged.metrics}.items():  # found: MD costs, wall time per atom-step
                metrics[f"start{start}.{key}"] = value
            if not judged.verdict.stable and stable:
                stable, why = False, f"start frame {start}: {judged.verdict.reason}"
                tags_out["md_first_unstable_step"] = str(judged.verdict.first_unstable_step)
        tags_out.update(md_stable=str(stable).lower(), md_stability_reason=why or "none")
        tracker.log(run_id, metrics={"md_stable": 1.0 if stable else 0.0}, tags=tags_out)
    print(f"[hpo] screen trial {trial.number} ({cfg.study.metric}={primary(trial):.5g}): "
          f"{'stable' if stable else 'UNSTABLE, ' + why} (MLflow run {run_id})", flush=True)
    return stable, why, metrics, figures


def screen_candidates(cfg, study, candidates, data, screen: dict, tracker: Tracker, parent: str, outdir: Path,
                      model_kind: ModelKind, context: FitContext):
    """The gate: screen every candidate, then register the stable one ranked first (candidates come ranked: by the
    validation metric, or by cost within ``promote.within``); ``promote.trial``: that one, stable or not."""
    if max(screen["start_frames"]) >= len(data.val):
        raise hpo_config.ConfigError(
            f"promote.screen.start_frames={screen['start_frames']} is not allowed: indices 0..{len(data.val) - 1} of {data.val.path.name}"
        )
    ranges = stability.training_ranges(data.train.frames)
    print(f"[hpo] screening {len(candidates)} candidate(s) of study {study.study_name!r} with {screen['steps']} "
          f"{screen['ensemble'].upper()} steps from validation frames {screen['start_frames']} (promote.screen)", flush=True)
    results = []
    for trial in candidates:
        files, workdir = model_files(cfg, study, trial, data)
        stable, why, metrics, figures = screen_trial(cfg, trial, files, data, screen, ranges, tracker, parent, outdir, model_kind, context)
        results.append((trial, files, workdir, stable, why, metrics, figures))
    summary = "; ".join(f"trial {t.number}: {'stable' if ok else why}" for t, _, _, ok, why, _, _ in results)
    ranking = [t.number for t, _, _, ok, _, _, _ in results if ok]  # candidates come ranked: so are these
    for trial, files, workdir, stable, why, metrics, figures in results:
        tags = {"md_stable": str(stable).lower(), "md_stability_reason": why or "none", "screened": summary[:4900],
                "screen_settings": str(screen), "screen_stable_ranked": ", ".join(map(str, ranking)) or "none"}
        if stable:
            if len(ranking) > 1:
                print(f"[hpo] stable candidates, best first: trials {ranking}; registering trial {trial.number}", flush=True)
            return trial, files, workdir, Screened(tags, metrics, figures)
        if cfg.promote.trial is not None:
            print(f"[hpo] warning: promote.trial={trial.number} is not stable in MD ({why}); registering it as asked, "
                  "tagged md_stable=false", flush=True)
            return trial, files, workdir, Screened(tags, metrics, figures)
    rejected = [(t.number, why) for t, _, _, _, why, _, _ in results]
    lines = "\n".join(f"  trial {n}: {why}" for n, why in rejected)
    raise PromoteError(
        f"no stable candidate among the {len(candidates)} best trials of study {study.study_name!r} "
        f"(promote.screen: {screen['steps']} {screen['ensemble'].upper()} steps from validation frames {screen['start_frames']}):\n{lines}\n"
        "Nothing registered. Screen more candidates (promote.screen.k), run more trials, or register one anyway with promote.trial=N."
    )
