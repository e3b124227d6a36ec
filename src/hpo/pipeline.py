"""``python -m hpo pipeline``: GAP study -> SA-GPR study -> promote both -> MD -> polarizability.

Each stage is one of the other commands, composed from the same overrides
plus the budgets in ``conf/pipeline/``. A stage whose result already exists
for the same config and data is reused: a study that already holds its
trials runs none, a promoted trial is not registered twice, and MD and
polarizability outputs are keyed by the model version and their settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf
from optuna.trial import TrialState

from hpo import md as hpo_md
from hpo import polarize as hpo_polarize
from hpo import spectrum as hpo_spectrum
from hpo.atomic import write_text
from hpo.cache import digest
from hpo.config import load_config, output_path
from hpo.disk import disk_report
from hpo.registry import promote as hpo_promote
from hpo.search import loop
from hpo.search.selection import count
from hpo.search.space import search_space
from hpo.search.storage import open_study


def stage_key(*parts) -> str:
    return digest(*parts)[:12]


def optimize_unless_done(cfg) -> None:
    study = open_study(cfg, search_space(cfg, quiet=True))
    done = count(study, TrialState.COMPLETE)
    if done >= cfg.study.n_trials:
        print(f"[hpo] pipeline: study {cfg.study.name!r} already holds {done} finished trials: reused", flush=True)
        return
    loop.run(cfg)


def cached_stage(marker: Path, compute) -> dict:
    """Run ``compute`` unless ``marker`` (its JSON summary) exists from an earlier run."""
    if marker.is_file():
        print(f"[hpo] pipeline: reusing {marker.parent}", flush=True)
        return json.loads(marker.read_text())
    result = compute()
    summary = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in result.items()
        if isinstance(v, (Path, str, int, float, bool, type(None)))  # arrays and the MD verdict object stay out
    }
    write_text(marker, json.dumps(summary, indent=2))
    return summary


def run(overrides: list[str]) -> dict:
    """Every stage of the workflow; ``overrides`` are the user's Hydra overrides."""
    base = load_config(overrides)
    budget = base.pipeline
    gap_overrides = [
        *overrides, "model=gap", f"study.n_trials={budget.gap_trials}", f"dataset.train_size={budget.gap_train_size}", *budget.gap_overrides
    ]
    sagpr_overrides = [
        *overrides,
        "model=sagpr",
        f"study.n_trials={budget.sagpr_trials}",
        f"dataset.train_size={budget.sagpr_train_size}",
        *budget.sagpr_overrides,
    ]
    gap_cfg, sagpr_cfg = load_config(gap_overrides), load_config(sagpr_overrides)

    optimize_unless_done(gap_cfg)
    optimize_unless_done(sagpr_cfg)
    gap_version = hpo_promote.promote(gap_cfg)
    sagpr_version = hpo_promote.promote(sagpr_cfg)

    root = output_path(base.experiments_dir) / "pipeline"
    md_settings = OmegaConf.to_container(base.md, resolve=True)
    md_dir = root / f"md-{stage_key(gap_version['name'], gap_version['version'], md_settings)}"

    md_result = cached_stage(
        md_dir / "md.json",
        lambda: hpo_md.main(load_config([*gap_overrides, f"md.model_uri=models:/{gap_version['name']}/{gap_version['version']}"])),
    )
    trajectory = md_result["trajectory"]
    if not md_result.get("md_stable", False):
        raise hpo_md.MDUnstable(
            f"the MD with GAP version {gap_version['version']} is not stable (md_stable=false): "
            f"{md_result.get('stability_reason') or 'no stability verdict recorded'}; first unstable step "
            f"{md_result.get('first_unstable_step')}. Its trajectory {trajectory} left the training distribution, so no "
            "polarizabilities are predicted from it. Promote a stable model (promote.screen) or change the MD settings."
        )
    polarize_dir = root / f"polarize-{stage_key(sagpr_version['name'], sagpr_version['version'], trajectory)}"
    polarize_result = cached_stage(
        polarize_dir / "polarize.json",
        lambda: hpo_polarize.main(
            load_config(
                [
                    *sagpr_overrides,
                    f"polarize.model_uri=models:/{sagpr_version['name']}/{sagpr_version['version']}",
                    f"polarize.trajectory={trajectory}",
                    f"polarize.reference_train_size={budget.sagpr_train_size}",
                ]
            )
        ),
    )
    spectrum_result = None
    if budget.spectrum and polarize_result["n_frames"] >= base.spectrum.min_frames:
        spectrum_result = cached_stage(
            root / f"spectrum-{stage_key(polarize_result['outdir'], OmegaConf.to_container(base.spectrum, resolve=True))}" / "spectrum.json",
            lambda: hpo_spectrum.main(
                load_config([*sagpr_overrides, f"spectrum.trajectory={Path(polarize_result['outdir']) / 'trajectory_polarizability.xyz'}"])
            ),
        )
    elif budget.spectrum:
        print(
            f"[hpo] pipeline: no Raman spectrum from {polarize_result['n_frames']} frames (spectrum.min_frames="
            f"{base.spectrum.min_frames}); run a longer MD for one, e.g. md.steps=4000 (2 ps at 0.5 fs)",
            flush=True,
        )
    summary = {
        "gap_version": gap_version["version"],
        "gap_val_energy_rmse": gap_version.get("objective"),
        "sagpr_version": sagpr_version["version"],
        "sagpr_val_rmse": sagpr_version.get("objective"),
        "md": md_result,
        "polarize": polarize_result,
        "spectrum": spectrum_result,
    }
    print(disk_report(gap_cfg, sagpr_cfg), flush=True)
    print(f"[hpo] pipeline done: GAP version {gap_version['version']}, SA-GPR version {sagpr_version['version']}", flush=True)
    return summary
