"""The data checks of a composed config: the command ``hpo data check`` and ``optimize``'s pre-fit checks.

Both run the pure checks of ``hpo.data.checks`` on the frames a config names and print
``hpo.data.report``'s table; the command also draws the distributions and records one MLflow run. The
checks see the frames converted to eV and Angstrom as read, isolated atoms included: the splits of
``dataset=files``, the files of ``dataset=pool``, the workshop files of ``dataset=water``, or the files of
``data.files=[...]``. Loading data for fitting is ``hpo.data.datasets``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

from hpo.safe_files import atomic_write
from hpo.config import model_params, output_path
from hpo.data import checks as dc
from hpo.data.locate import Workshop, layout_of
from hpo.data.read import Source, detect_keys, read_file, read_source, sha256sum
from hpo.data.report import distributions_plot, render_table, statistics
from hpo.data.split import outside
from hpo.errors import DataError
from hpo.models import kind
from hpo.tracking import Tracker, provenance_tags


# --------------------------------------------------------------------------- checks


def check_source(cfg, include_test: bool = True) -> Source:
    """The frames the checks see: ``data.files`` when given, else every split of the dataset config.

    Workshop layout: its training file and validation file (and, with ``include_test``, the frames of
    its test file that are not in the training file), keys from ``dataset.property_keys``.
    """
    files = (cfg.get("data") or {}).get("files")
    dataset = cfg.dataset
    layout = layout_of(dataset)
    workshop = isinstance(layout, Workshop)
    settings = {"keys": None, "units": None} if workshop else dataset
    if files:
        return read_source({Path(str(p)).name: p for p in files}, settings)
    if not workshop:
        return read_source(layout.files(include_test), dataset)
    # the workshop layout: keys as configured, eV and Angstrom, the test file without the training frames
    paths = layout.files(include_test)
    frames = {name: read_file(path) for name, path in paths.items()}
    train, _, *test = frames
    if test and dataset.get("test_excludes_train"):
        frames[test[0]] = [frames[test[0]][j] for j in outside(frames[train], frames[test[0]])]
    property_keys = dataset.property_keys
    explicit = {"energy": property_keys.get("energy"), "forces": property_keys.get("force")}
    keys, report = detect_keys([a for f in frames.values() for a in f], explicit)
    print(f"[hpo] data keys: {report}", flush=True)
    return Source(frames=frames, paths=paths, keys=keys, report=report)


def run_checks(cfg, include_test: bool = True, fit_targets: tuple[str, ...] | None = None) -> tuple[Source, list[dc.Check], str]:
    """Checks of the dataset (or ``data.files``): the source, the checks and the printed table.

    ``fit_targets``: what the coming fit learns from; without "force", a failed force check only warns
    (bad forces cannot spoil an energy-only fit, and the user who turned them off must not be stopped).
    """
    source = check_source(cfg, include_test)
    checks = dc.run_checks(source.frames, source.keys)
    if fit_targets is not None and "force" not in fit_targets:
        checks = [_forces_unused(check) for check in checks]
    stats = {label: statistics(frames, source.keys) for label, frames in source.frames.items()}
    return source, checks, render_table(checks, stats)


def verdict_tags(checks: list[dc.Check]) -> dict[str, str]:
    return {f"check.{check.name}": check.verdict for check in checks}


def _forces_unused(check: dc.Check) -> dc.Check:
    if check.verdict != "fail" or check.name not in dc.FORCE_CHECKS:
        return check
    return replace(check, verdict="warn", message=check.message + " (forces do not enter this fit: model.fit_forces=false)")


def failure_message(checks: list[dc.Check]) -> str:
    failed = [check for check in checks if check.verdict == "fail"]
    remedy = ""
    if any(check.name in dc.FORCE_CHECKS for check in failed):
        remedy = " To fit energies only: model.fit_forces=false; to read another force column: dataset.keys.forces=KEY."
    return "data check failed: " + "; ".join(f"{check.name}: {check.message}" for check in failed) + (
        f" (python -m hpo data check shows every check).{remedy}"
    )


def preflight(cfg) -> dict[str, str]:
    """What ``optimize`` runs before any fit: the checks of the training and validation data, printed;
    DataError on a fail. Returns the verdicts as tags (``check.<name>``) for the study's parent run."""
    _, checks, table = run_checks(cfg, include_test=False, fit_targets=kind(cfg.model.kind).fit_targets(model_params(cfg)))
    print(table, flush=True)
    if dc.exit_code(checks):
        raise DataError(failure_message(checks))
    return verdict_tags(checks)


def _tag_safe(name: str) -> str:
    """MLflow tag keys allow letters, digits, _ - . / and spaces only."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def check_command(cfg) -> None:
    """``python -m hpo data check``: table, PNG of the distributions, one MLflow run; exit 1 on a fail."""
    source, checks, table = run_checks(cfg, include_test=True)
    print(table, flush=True)
    name = cfg.dataset.get("name", "data")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = output_path(cfg.experiments_dir) / "data_check"
    everything = [atoms for frames in source.frames.values() for atoms in frames]
    title = f"{name}: " + ", ".join(f"{label} ({len(frames)})" for label, frames in source.frames.items())
    plot = distributions_plot(directory / f"{name}-{stamp}.png", everything, source.keys, title)
    report = directory / f"{name}-{stamp}.txt"
    with atomic_write(report) as tmp:
        Path(tmp).write_text(table + "\n")
    tracker = Tracker(cfg.tracking)
    tags = {
        **provenance_tags(),
        **verdict_tags(checks),
        **{f"sha256.{_tag_safe(path.name)}": sha256sum(path) for path in source.paths.values()},
        "run_type": "data_check",
        "command": "data check",
        "data_keys": source.report,
    }
    with tracker.run(f"data-check-{name}", tags=tags) as run_id:
        details = {check.name: {"verdict": check.verdict, "message": check.message, "details": check.details} for check in checks}
        tracker.client.log_text(run_id, json.dumps(details, indent=1, default=str), "data_check.json")
        tracker.log_artifacts(run_id, [plot, report])
    print(f"[hpo] data check: {plot} (MLflow run {run_id})", flush=True)
    code = dc.exit_code(checks)
    if code:
        raise SystemExit(code)
