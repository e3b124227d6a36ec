"""``python -m hpo pipeline``: GAP study -> SA-GPR study -> promote both -> MD -> polarizability.

The two model kinds come from the registry (``hpo.models``): the first that drives MD (GAP) and the first
that learns the polarizability (SA-GPR); the budgets are ``pipeline.gap_*`` and ``pipeline.sagpr_*``.

Each stage is one of the other commands, composed from the same overrides
plus the budgets in ``conf/pipeline/``. A stage whose result already exists
for the same config and data is reused: a study that already holds its
trials runs none, a promoted trial is not registered twice, and MD and
polarizability outputs are keyed by the model version and their settings.
On own data (``dataset=files|pool``) the stages use the data set's own training set, and the SA-GPR
stages run only when the frames carry polarizabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf
from optuna.trial import TrialState

from hpo import md as hpo_md
from hpo import polarize as hpo_polarize
from hpo import spectrum as hpo_spectrum
from hpo.safe_files import write_text
from hpo.cache import digest
from hpo.config import load_config, output_path
from hpo.data import has_polarizability, layout_of
from hpo.disk import disk_report
from hpo.models import kind_for_target, md_kind
from hpo.registry import promote as hpo_promote
from hpo.search import loop
from hpo.search.selection import count
from hpo.search.storage import StudyError, load_study


def stage_key(*parts) -> str:
    return digest(*parts)[:12]


def optimize_unless_done(cfg) -> None:
    try:
        done = count(load_study(cfg.study), TrialState.COMPLETE)
    except StudyError:  # no such study yet (or no storage: optimize says so)
        done = 0
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


def with_polarizability(cfg) -> bool:
    """Whether the data carry polarizabilities for the SA-GPR stages: always for the workshop set; for own
    data, a detected (or ``dataset.keys.polarizability``) key."""
    return has_polarizability(cfg.dataset)


def run(overrides: list[str]) -> dict:
    """Every stage of the workflow; ``overrides`` are the user's Hydra overrides.

    Own data (``dataset=files|pool``) keep their own training set (``pipeline.*_train_size`` are the
    workshop set's), and without polarizabilities the pipeline stops after the GAP's MD.
    """
    base = load_config(overrides)
    budget = base.pipeline
    own = not layout_of(base.dataset).fixed_train_files  # own data keep their training set's size
    potential, tensor = md_kind(), kind_for_target("polarizability")
    gap_overrides = [
        *overrides, f"model={potential.name}", f"study.n_trials={budget.gap_trials}",
        *([] if own else [f"dataset.train_size={budget.gap_train_size}"]), *budget.gap_overrides,
    ]
    sagpr_overrides = [
        *overrides, f"model={tensor.name}", f"study.n_trials={budget.sagpr_trials}",
        *([] if own else [f"dataset.train_size={budget.sagpr_train_size}"]), *budget.sagpr_overrides,
    ]
    gap_cfg = load_config(gap_overrides)
    sagpr_cfg = load_config(sagpr_overrides) if with_polarizability(base) else None
    if sagpr_cfg is None:
        print("[hpo] pipeline: no polarizability in the data (set dataset.keys.polarizability if it is there): "
              f"{potential.display_name} study, promotion and MD only", flush=True)

    optimize_unless_done(gap_cfg)
    if sagpr_cfg is not None:
        optimize_unless_done(sagpr_cfg)
    gap_version = hpo_promote.promote(gap_cfg)
    sagpr_version = hpo_promote.promote(sagpr_cfg) if sagpr_cfg is not None else None

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
            f"the MD with {potential.display_name} version {gap_version['version']} is not stable (md_stable=false): "
            f"{md_result.get('stability_reason') or 'no stability verdict recorded'}; first unstable step "
            f"{md_result.get('first_unstable_step')}. Its trajectory {trajectory} left the training distribution, so no "
            "polarizabilities are predicted from it. Promote a stable model (promote.screen) or change the MD settings."
        )
    polarize_result = spectrum_result = None
    if sagpr_version is not None:
        polarize_result, spectrum_result = polarizability_stages(base, sagpr_overrides, sagpr_version, trajectory, root, own)
    summary = {
        "gap_version": gap_version["version"],
        "gap_val_energy_rmse": gap_version.get("objective"),
        "sagpr_version": sagpr_version["version"] if sagpr_version else None,
        "sagpr_val_rmse": sagpr_version.get("objective") if sagpr_version else None,
        "md": md_result,
        "polarize": polarize_result,
        "spectrum": spectrum_result,
    }
    print(disk_report(*[c for c in (gap_cfg, sagpr_cfg) if c is not None]), flush=True)
    models = f"{potential.display_name} version {gap_version['version']}" + (f", {tensor.display_name} version {sagpr_version['version']}" if sagpr_version else "")
    print(f"[hpo] pipeline done: {models}", flush=True)
    return summary


def polarizability_stages(base, sagpr_overrides: list[str], sagpr_version: dict, trajectory, root: Path, own: bool):
    """Polarizability of every MD frame with the SA-GPR champion, then (long enough MD) the Raman spectrum."""
    budget = base.pipeline
    polarize_dir = root / f"polarize-{stage_key(sagpr_version['name'], sagpr_version['version'], trajectory)}"
    reference = [] if own else [f"polarize.reference_train_size={budget.sagpr_train_size}"]
    polarize_result = cached_stage(
        polarize_dir / "polarize.json",
        lambda: hpo_polarize.main(
            load_config(
                [
                    *sagpr_overrides,
                    f"polarize.model_uri=models:/{sagpr_version['name']}/{sagpr_version['version']}",
                    f"polarize.trajectory={trajectory}",
                    *reference,
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
    return polarize_result, spectrum_result
