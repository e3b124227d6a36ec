"""The registered model on the test split, once per promotion and through its kind (``hpo.search.scoring``):
test errors beside the hand-tuned default trial's, and the calibration of its predictive std."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hpo import calibration
from hpo import config as hpo_config
from hpo.cache import frame_digests
from hpo.data import layout_of, load_test_set
from hpo.models.base import FitContext, ModelKind, with_values
from hpo.registry.pick import model_files
from hpo.search import scoring
from hpo.search.loop import metric_unit
from hpo.search.selection import default_trial, primary
from hpo.tracking import Tracker


def calibrate(cfg, trial, files, data, test, model_kind: ModelKind, outdir: Path, context: FitContext) -> tuple[dict[str, float], dict[str, str]]:
    """The registered model's predictive std against its errors (``hpo.calibration``): the scale fitted on the
    validation split, stored in the model (every std it reports is multiplied by it), and the z-scores and
    coverage on validation and test before and after it; the calibration plot's path in the tags."""
    model = with_values(hpo_config.model_params(cfg), trial.params)
    splits = {"val": data.val, **({"test": test} if test is not None else {})}
    pairs = {name: scoring.calibration_pairs(model_kind, model, files, split, context) for name, split in splits.items()}
    if any(found is None for found in pairs.values()):
        return {}, {}
    quantity = pairs["val"][2]
    plot = outdir / f"calibration_{quantity}.png"
    scale, found = calibration.calibrate(quantity, {name: (e, s) for name, (e, s, _) in pairs.items()}, plot,
                                         f"{model_kind.display_name} {quantity} std, trial {trial.number}")
    model_kind.set_std_scale(files, scale)
    return found, {"std_scale": f"{scale:.6g}", "calibration_plot": str(plot)}


def test_errors_of(cfg, study, trial, files, data, model_kind: ModelKind, context: FitContext, outdir: Path | None = None,
                   tracker: Tracker | None = None, run_id: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The promoted model's test errors (and the hand-tuned default trial's, ``default_test_*``), with tags
    describing the split, and with ``outdir`` the calibration of its std (``calibrate``). The test set is read
    here, once per promotion, and by nothing else."""
    test = load_test_set(cfg, data)
    calibrated, calibration_tags = calibrate(cfg, trial, files, data, test, model_kind, outdir, context) if outdir is not None else ({}, {})
    if test is not None and tracker is not None:
        tracker.log_datasets(run_id, {"test": test})
    if test is None:
        why = layout_of(cfg.dataset).no_test_reason()
        print(f"[hpo] no test split ({why}): the registered model has no test error", flush=True)
        return calibrated, {"test_split": "none", **calibration_tags}
    model = with_values(hpo_config.model_params(cfg), trial.params)
    found = scoring.test_errors(model_kind, model, files, test, data.val, context)
    split = hashlib.sha256("".join(frame_digests(test.frames)).encode()).hexdigest()
    source = cfg.dataset.get("test_file") or test.path
    tags = {"test_split": "frames of " + str(source) + (" not in " + data.train.path.name if cfg.dataset.get("test_excludes_train") else ""),
            "test_size": str(len(test)), "test_split_sha256": split}
    default = default_trial(study)
    if default is not None:
        if default.number == trial.number:
            found.update({f"default_{k}": v for k, v in found.items()})
        else:
            default_files, _ = model_files(cfg, study, default, data)
            default_model = with_values(hpo_config.model_params(cfg), default.params)
            found.update({f"default_{k}": v for k, v in scoring.test_errors(model_kind, default_model, default_files, test, data.val, context).items()})
        tags["default_trial"] = str(default.number)
    return {**found, **calibrated}, {**tags, **calibration_tags}


def print_test_summary(cfg, trial, found: dict[str, float]) -> None:
    metric = str(cfg.study.metric)
    name = "test_" + metric.removeprefix("val_")
    # the metric's unit from the figures config; a weighted loss of several targets has none
    unit = metric_unit(cfg) or "unitless"
    if name not in found:
        print(f"[hpo] validation {primary(trial):.5g}, test: none (no test split) ({unit})", flush=True)
        return
    line = f"[hpo] validation {primary(trial):.5g}, test {found[name]:.5g} ({unit}; {metric} / {name})"
    if f"default_{name}" in found:
        line += f"; hand-tuned default trial: test {found['default_' + name]:.5g}"
    print(line, flush=True)
