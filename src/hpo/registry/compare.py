"""Champions side by side: ``python -m hpo compare`` puts the registered models of several kinds (GAP, MACE, ...)
in one table, read from the registry (nothing is fitted or run again).

Each row is the version behind ``compare.alias`` of a model in ``compare.models`` (null: every registered model
with that alias): its test energy and force errors and test loss (``hpo.registry.evaluate``, measured once at
promotion), its MD verdict and cost per atom per step (the promotion's screening MD, ``hpo.registry.screen``), the
fit time of its trial and the wall time of its study. The rows are only comparable on the same data: the table
says whether their training, validation and test splits are the same files (sha256), and warns when not.

Written to ``<compare.dir>``: ``compare.md`` (the table), ``compare.csv`` and ``compare.png`` (test force error
against MD cost, stable and unstable marked), all also logged to one MLflow run named ``compare``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from hpo import config as hpo_config
from hpo.plots import plt, save_figure
from hpo.registry.resolve import PromoteError
from hpo.safe_files import write_text
from hpo.tracking import Tracker, provenance_tags


@dataclass(frozen=True)
class Column:
    """One column of the table: where its value lives on a version (``tag:``, a version tag; ``run:``, a metric
    of the promotion run, averaged over the screen's start frames for ``screen.start*.``; the first of several
    ``|``-separated sources that has one), the factor to its unit and the format."""

    header: str
    sources: str
    factor: float = 1.0
    fmt: str = "{:.4g}"


COLUMNS = (
    Column("test energy RMSE (meV/atom)", "tag:test_energy_rmse_per_atom", 1000.0, "{:.3g}"),
    Column("test force RMSE (eV/Å)", "tag:test_force_rmse", 1.0, "{:.3g}"),
    Column("test loss", "tag:test_loss", 1.0, "{:.4g}"),
    Column("MD stable", "tag:md_stable", fmt="{}"),
    # the screening MD's cost, else (versions promoted without it) the trial's own timing (model.cost_frames)
    Column("MD cost (ms per atom-step)", "run:screen.start*.ms_per_atom_per_step|tag:metric.md_ms_per_atom", 1.0, "{:.3g}"),
    Column("fit time of the trial (s)", "tag:metric.fit_time_s", 1.0, "{:.1f}"),
    Column("study wall time (s)", "tag:search_time_s", 1.0, "{:.0f}"),
    Column("trials", "tag:n_trials", fmt="{:.0f}"),
    Column("training frames", "tag:train_size", fmt="{:.0f}"),
)
SPLIT_TAGS = ("sha256.", "test_split_sha256")  # tags naming the data a model was trained, selected and tested on


@dataclass
class Row:
    name: str
    kind: str
    version: str
    study: str
    trial: str
    values: dict[str, object]  # header -> value in the column's unit, None when the version has none
    splits: dict[str, str]  # split tag -> sha256
    why_unstable: str


def compare(cfg) -> list[Row]:
    """``python -m hpo compare``: the table of ``compare.models`` (the versions behind ``compare.alias``), written,
    printed and logged; returns its rows."""
    tracker = Tracker(cfg.tracking)
    rows = [_row(tracker, name, version) for name, version in _versions(tracker, cfg.compare.models, str(cfg.compare.alias))]
    outdir = hpo_config.output_path(cfg.compare.dir)
    table = markdown(rows)
    files = [write_text(outdir / "compare.md", table), write_text(outdir / "compare.csv", _csv(rows)), cost_plot(rows, outdir / "compare.png")]
    with tracker.run("compare", tags={"command": "compare", "run_type": "compare", **provenance_tags()}) as run_id:
        tracker.log(run_id, tags={"compared": ", ".join(f"{r.name} v{r.version}" for r in rows)})
        tracker.log_artifacts(run_id, files)
    print(table, flush=True)
    print(f"[hpo] compared {len(rows)} models: {outdir} (MLflow run {run_id})", flush=True)
    return rows


def _versions(tracker: Tracker, names, alias: str) -> list[tuple[str, object]]:
    if names is None:
        names = [m.name for m in tracker.client.search_registered_models() if alias in m.aliases]
        if not names:
            raise PromoteError(f"no registered model has the alias {alias!r} at {tracker.tracking_uri}: promote models first (python -m hpo promote)")
    found = []
    for name in names:
        try:
            found.append((str(name), tracker.client.get_model_version_by_alias(str(name), alias)))
        except MlflowException:
            raise PromoteError(f"compare.models: {name!r} has no version with the alias {alias!r} at {tracker.tracking_uri}") from None
    return found


def _row(tracker: Tracker, name: str, version) -> Row:
    tags = version.tags
    metrics = tracker.client.get_run(version.run_id).data.metrics if version.run_id else {}
    values = {column.header: _value(column, tags, metrics) for column in COLUMNS}
    splits = {k: v for k, v in tags.items() if k.startswith(SPLIT_TAGS)}
    return Row(name, tags.get("param.kind", ""), str(version.version), tags.get("study", ""), tags.get("trial", ""), values, splits,
               tags.get("md_stability_reason", "") if tags.get("md_stable") == "false" else "")


def _value(column: Column, tags: dict, metrics: dict):
    for source in column.sources.split("|"):
        where, key = source.split(":", 1)
        if where == "run":
            head, tail = key.split("*")
            found = [v for k, v in metrics.items() if k.startswith(head) and k.endswith(tail) and math.isfinite(v)]
            if found:
                return sum(found) / len(found) * column.factor
        elif key in tags:
            try:
                return float(tags[key]) * column.factor
            except ValueError:  # a word: md_stable's true / false
                return tags[key]
    return None


def same_splits(rows: list[Row]) -> list[str]:
    """What differs between the rows' data: split tags whose sha256 is not the same in every row (or missing)."""
    keys = sorted({k for row in rows for k in row.splits})
    return [k for k in keys if len({row.splits.get(k) for row in rows}) > 1]


def _cell(column: Column, value) -> str:
    if value is None:
        return "n/a"
    return column.fmt.format(value) if isinstance(value, float) else str(value)


def markdown(rows: list[Row]) -> str:
    headers = ["model", "kind", "version", "study (trial)", *(c.header for c in COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        cells = [row.name, row.kind or "n/a", row.version, f"{row.study} ({row.trial})", *(_cell(c, row.values[c.header]) for c in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    differing = same_splits(rows)
    notes = ["", "Test errors: the test split, once at promotion. MD: the promotion's screening runs (promote.screen), cost "
             "averaged over its start frames. Fit time: the promoted trial's own fit."]
    if differing:
        notes.append(f"WARNING: the models were not trained and tested on the same data: {', '.join(differing)} differ.")
    else:
        notes.append("Same data: " + (", ".join(f"{k} {v[:12]}" for k, v in sorted(rows[0].splits.items())) if rows and rows[0].splits else "no split hashes recorded") + ".")
    notes += [f"{row.name} v{row.version} unstable: {row.why_unstable}" for row in rows if row.why_unstable]
    return "\n".join(lines + notes) + "\n"


def _csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["model", "kind", "version", "study", "trial", *(c.header for c in COLUMNS)])
    for row in rows:
        writer.writerow([row.name, row.kind, row.version, row.study, row.trial, *("" if row.values[c.header] is None else row.values[c.header] for c in COLUMNS)])
    return out.getvalue()


def cost_plot(rows: list[Row], path: Path) -> Path:
    """Test force error against MD cost, one point per model (open: unstable in its screening MD)."""
    force, cost = COLUMNS[1].header, COLUMNS[4].header
    fig, ax = plt.subplots(figsize=(5, 4))
    for row in rows:
        x, y = row.values[cost], row.values[force]
        if x is None or y is None:
            continue
        stable = row.values[COLUMNS[3].header] == "true"
        ax.scatter([x], [y], s=50, facecolors=None if stable else "none", edgecolors="C0" if stable else "C3")
        ax.annotate(f"{row.name} v{row.version}" + ("" if stable else " (unstable)"), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(0.3)  # room for the labels
    ax.set_xlabel(cost)
    ax.set_ylabel(force)
    return save_figure(fig, path, "Champions: test force error vs MD cost")
