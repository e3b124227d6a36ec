"""Many fits of one model under one MLflow parent run: the shared machinery of learning curves and sweeps.

1. plan a list of ``Point``s (model config + training/validation data + the CSV columns that place it);
2. fit and evaluate each with ``search.objective.score`` (through the model kind, so GAP and SA-GPR
   both work), one nested MLflow run per point;
3. write one CSV row per point (``write_csv``) for the caller's figure.

A point whose fit fails is recorded (nested run FAILED, CSV ``state=FAIL`` with the reason) and the
others go on, as in a study.
"""

from __future__ import annotations

import csv
import io
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from hpo import config as hpo_config
from hpo.safe_files import write_text
from hpo.data import Datasets
from hpo.errors import ConfigError
from hpo.models.base import failure_reason, with_values
from hpo.search.objective import classify, score
from hpo.search.study_record import config_for_study
from hpo.search.selection import best_trial
from hpo.search.storage import StudyError, load_study
from hpo.tracking import Tracker, provenance_tags

TIMESTAMP = "%Y%m%d-%H%M%S"  # as the fit command's working directories


@dataclass(frozen=True)
class MetricSpec:
    """One curve to draw: a metric of ``objective.score`` without its ``train_``/``val_`` prefix."""

    name: str
    label: str
    unit: str

    @property
    def train_key(self) -> str:
        return f"train_{self.name}"

    @property
    def val_key(self) -> str:
        return f"val_{self.name}"

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({self.unit})"


def metric_specs(section: DictConfig) -> list[MetricSpec]:
    """The ``metrics`` list of a config section (learning_curve, sweep, report): the model's, conf/figures/<model>.yaml."""
    if not section.get("metrics"):
        raise ConfigError("metrics is empty for this model; add entries (name, label, unit) to conf/figures/<model>.yaml")
    return [MetricSpec(str(m.name), str(m.label), str(m.unit)) for m in section.metrics]


def reported_metrics(specs: list[MetricSpec], rows: list[dict], outdir: Path) -> list[MetricSpec]:
    """The specs the model actually reported (SA-GPR has no force metric, GAP no ``val_rmse``).

    Raises when no point could be fitted or none reported a configured metric: there is nothing to draw.
    """
    fitted = [row for row in rows if row["state"] == "COMPLETE"]
    if not fitted:
        failures = sorted({row["failure"] for row in rows})
        raise RuntimeError(f"every fit failed ({', '.join(failures)}); the reasons are in {outdir}/*/failure.txt and in MLflow")
    present = [s for s in specs if any(_finite(row.get(s.val_key)) for row in fitted)]
    if not present:
        reported = sorted(k for k in fitted[0] if k.startswith("val_"))
        raise ConfigError(f"metrics {[s.name for s in specs]} is not allowed: the model reports {reported} (drop the val_ prefix)")
    for spec in specs:
        if spec not in present:
            print(f"[hpo] note: no point reported {spec.val_key}; its panel is left out", flush=True)
    return present


def param_unit(section: DictConfig, param: str) -> str:
    """The unit of a model parameter from ``param_units`` ('' for a pure number)."""
    units = section.get("param_units") or {}
    return str(units.get(param, ""))


def param_axis_label(section: DictConfig, param: str) -> str:
    """An axis label with the parameter's unit, or "(pure number)" so every axis says what it counts."""
    unit = param_unit(section, param)
    return f"{param} ({unit})" if unit else f"{param} (pure number)"


def run_dir(section: DictConfig) -> Path:
    """``<section.dir>/<section.name or a timestamp>``: where one command's outputs go."""
    name = section.name or time.strftime(TIMESTAMP)
    return hpo_config.output_path(section.dir) / str(name)


def config_and_model(cfg: DictConfig, section: str) -> tuple[DictConfig, dict, str]:
    """The checked config of a curve or sweep command (composed for the model kind of ``<section>.from_study``,
    when given), the model config to hold fixed, and where its parameters came from."""
    from_study = cfg[section].from_study
    if from_study:  # the study's own model kind (hpo.search.study_record)
        cfg = config_for_study(cfg, str(from_study), keys=("model_kind",))
    hpo_config.validate(cfg)
    model, source = fixed_model(cfg, from_study)
    return cfg, model, source


def fixed_model(cfg: DictConfig, from_study: str | None) -> tuple[dict, str]:
    """The model config to hold fixed, and a phrase saying where its parameters came from.

    With ``from_study`` the best trial's parameters (dotted names, as sampled) replace the model defaults;
    parameters the study did not search keep their ``conf/model/`` value.
    """
    model = hpo_config.model_params(cfg)
    if not from_study:
        return model, "model defaults"
    study = load_study(cfg.study, str(from_study))
    try:
        best = best_trial(study)
    except ValueError:
        raise StudyError(f"study {from_study!r} has no finished trial to take parameters from") from None
    try:
        model = with_values(model, best.params)
    except (KeyError, TypeError):
        raise ConfigError(
            f"from_study={from_study!r}: its parameters {sorted(best.params)} do not fit model {model['kind']!r}"
        ) from None
    hpo_config.check_model(model)
    return model, f"best trial {best.number} of study {from_study}"


@dataclass
class Point:
    """One fit of a curve: its folder/run name, the CSV columns that place it, its model and data."""

    name: str
    coords: dict[str, Any]
    model: dict
    data: Datasets


def parent_tags(cfg: DictConfig, command: str, points: list[Point]) -> dict:
    """Tags of a command's parent run: provenance and the sha256 of every file it reads."""
    hashes = {}
    for point in points:
        hashes.update(point.data.hashes)
    return {**provenance_tags(), **hashes, "command": command, "run_type": command, "model_kind": cfg.model.kind, "threads": cfg.threads}


def run_points(cfg: DictConfig, tracker: Tracker, parent_run_id: str, points: list[Point], outdir: Path) -> list[dict]:
    """Fit every point in ``outdir/<point.name>`` as a nested run; one row (coords, state, metrics) per point."""
    rows = []
    for index, point in enumerate(points, start=1):
        workdir = outdir / point.name
        n_train = len(point.data.train)
        row: dict[str, Any] = {**point.coords, "n_train": n_train, "state": "COMPLETE", "failure": ""}
        tags = {**point.coords, "n_train": n_train, "state": "RUNNING", "run_type": "point"}
        try:
            with tracker.run(point.name, tags=tags, parent_run_id=parent_run_id) as run_id:
                row["mlflow_run_id"] = run_id
                try:
                    scored = score(cfg, point.model, point.data, workdir)
                except Exception as exc:
                    reason = failure_reason(classify(exc))
                    write_text(workdir / "failure.txt", "".join(traceback.format_exception(exc)))
                    tracker.log(run_id, tags={"state": "FAIL", "failure": reason, "failure_message": str(exc)[-5000:]})
                    tracker.log_artifacts(run_id, [workdir / "failure.txt"])
                    row.update(state="FAIL", failure=reason)
                    print(f"[hpo] {point.name} ({index}/{len(points)}): FAILED ({reason}): {str(exc)[:300]}", flush=True)
                    raise
                # Model size shows what a more flexible model costs on disk and in memory at prediction time.
                model_bytes = sum(size_on_disk(p) for p in scored.model_files)
                found = {**scored.metrics, "model_bytes": model_bytes, "n_train": n_train}
                tracker.log(run_id, params=scored.params, metrics=found, tags={**scored.tags, "state": "COMPLETE"})
                tracker.log_artifacts(run_id, scored.artifacts)
                row.update(found)
                shown = ", ".join(f"{k}={v:.4g}" for k, v in scored.metrics.items() if k.endswith("_rmse"))
                print(f"[hpo] {point.name} ({index}/{len(points)}): {shown}", flush=True)
        except Exception:  # a failed point is a result (its run ended FAILED): fit the others
            pass
        row["workdir"] = str(workdir)
        rows.append(row)
    return rows


def size_on_disk(path: Path) -> int:
    """Bytes of a model file, or of every file in a model folder (an SA-GPR model is a folder)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def write_csv(path: Path, rows: list[dict]) -> Path:
    """One row per point; columns in first-seen order, so the placing columns come first."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def column(rows: list[dict], key: str) -> np.ndarray:
    """A metric over the rows, NaN where a point failed or lacks it."""
    return np.array([float(row[key]) if _finite(row.get(key)) else np.nan for row in rows])
