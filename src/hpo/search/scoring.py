"""What every fit goes through, whatever its kind: the kind fits and predicts (``ModelKind.fit``/``evaluate``),
this module compares with the data (error metrics, loss, overfitting tags), writes the CSVs, the parity plot
and the calibration of the std, trims the kind's cache and builds the ``Scored`` record; and a stored model's
test errors and calibration pairs, the same way.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

from hpo import calibration
from hpo.safe_files import write_text
from hpo.cache import Cache
from hpo.data import Datasets
from hpo.metrics import overfitting
from hpo.models.base import FitContext, ModelKind, Predictions, Scored, TrialFailure, get_dotted
from hpo.tracking import flatten


def context_of(cfg, data: Datasets, model_kind: ModelKind) -> FitContext:
    """The fit's context from the run's config and the data it fits: their keys, and for kinds that learn
    energies the isolated-atom energies (the data of other kinds need none)."""
    loss = cfg.study.get("loss")
    energies = "energy" in model_kind.targets
    return FitContext(
        threads=int(cfg.threads), seed=int(cfg.study.seed), keys=data.fit_keys(cfg.dataset),
        e0=data.fit_e0(cfg.dataset) if energies else None, e0_values=data.solver_e0(cfg.dataset) if energies else {},
        loss=None if loss is None else dict(loss), val=data.val,
    )


def fit_and_score(cfg, model_kind: ModelKind, params: dict, data: Datasets, workdir: Path,
                  report: Callable[[int, dict[str, float]], None] | None = None) -> Scored:
    """Fit ``params`` on the training frames, evaluate both sets, write ``train_errors.csv``,
    ``validation_errors.csv``, ``parity_<quantity>.png`` (and the std's calibration plot when the model keeps
    a posterior); raise ``TrialFailure`` with a reason when no metric can be had. ``report``: handed to the
    fit (``FitContext.report``) for kinds whose fidelity is a step of their own."""
    context = dataclasses.replace(context_of(cfg, data, model_kind), report=report)
    requested = model_kind.resolve_auto(params, data)
    params = model_kind.effective_params(requested, data)
    model_kind.preflight(params, data.train.frames)
    workdir.mkdir(parents=True, exist_ok=True)
    fitted = model_kind.fit(data.train, params, workdir, context, upcoming=(data.val,))
    start = time.perf_counter()
    predicted = {"train": fitted.train_predictions or model_kind.evaluate(fitted, data.train.frames),
                 "val": model_kind.evaluate(fitted, data.val.frames)}
    eval_time = time.perf_counter() - start
    truth = {"train": model_kind.reference(data.train, params, context), "val": model_kind.reference(data.val, params, context)}
    found = dict(fitted.metrics)
    for name in ("train", "val"):
        found.update(predicted[name].errors(name, truth[name]))
    found["eval_time_s"] = eval_time
    found.update(model_kind.cost_metrics(fitted, data.val.frames))
    found.update(model_kind.loss_metrics(found, truth["val"], params, context.loss))
    nan = [k for k, v in found.items() if not math.isfinite(v)]
    if nan:
        raise TrialFailure("nan_metric", f"non-finite metrics {nan} (the fit diverged)")
    tags = dict(fitted.tags)
    for stem, tag in type(predicted["val"]).overfit_stems:
        if f"val_{stem}" in found and f"train_{stem}" in found:
            found[f"{stem}_gap"], found[f"{stem}_ratio"], flag = overfitting(found[f"train_{stem}"], found[f"val_{stem}"], cfg.overfit_ratio)
            tags[tag] = str(flag).lower()

    files = [workdir / "train_errors.csv", workdir / "validation_errors.csv"]
    for path, name in zip(files, ("train", "val")):
        write_text(path, predicted[name].table(truth[name]))
    quantity = predicted["val"].quantity
    title = (f"{model_kind.display_name} {quantity}, {data.train.path.name} ({len(data.train)}) / "
             f"{data.val.path.name} ({len(data.val)})")
    files.append(type(predicted["val"]).parity_plot(
        workdir / f"parity_{quantity}.png", {"train": (truth["train"], predicted["train"]), "validation": (truth["val"], predicted["val"])}, title))
    pairs = predicted["val"].calibration_pairs(truth["val"])
    if pairs is not None:  # calibration of the posterior std on the validation split (hpo.calibration)
        plot = workdir / f"calibration_{quantity}.png"
        _, calibrated = calibration.calibrate(quantity, {"val": pairs}, plot, f"{model_kind.display_name} {quantity} std, {data.val.path.name}")
        found.update(calibrated)
        files.append(plot)
    if model_kind.cache_keys and params[model_kind.cache_keys[0]]:
        directory, bound_gb = model_kind.cache_keys
        Cache(params[directory]).trim(int(params[bound_gb] * 1e9))
    if fitted.cache is not None:
        found.update({f"cache_{k}": float(v) for k, v in fitted.cache.stats.items()})
    return Scored(
        metrics=found,
        params={**flatten(params), **{f"{name}_requested": get_dotted(requested, name) for name in model_kind.capped_params},
                "threads": context.threads, **fitted.chosen},
        tags=tags,
        artifacts=[*fitted.artifacts, *files],
        model_files=fitted.model_files,
    )


def test_errors(model_kind: ModelKind, params: dict, files: list[Path], test, val, context: FitContext) -> dict[str, float]:
    """``test_*`` errors of a stored model (its ``files``) on the ``test`` frames, and ``test_loss`` (kinds that
    record a loss) with the scales of the study's val_loss, from the validation frames ``val``."""
    found = model_kind.predict(files, test.frames, params).errors("test", model_kind.reference(test, params, context))
    loss = model_kind.loss_metrics(found, model_kind.reference(val, params, context), params, context.loss, ("test",))
    return {**found, **({"test_loss": loss["test_loss"]} if "test_loss" in loss else {})}


def calibration_pairs(model_kind: ModelKind, params: dict, files: list[Path], split, context: FitContext):
    """(errors, predictive std) of a stored model on a split's frames, flat arrays in the same unit, and the
    quantity's name; None when the model keeps no posterior."""
    predicted: Predictions = model_kind.predict(files, split.frames, params, with_std=True)
    pairs = predicted.calibration_pairs(model_kind.reference(split, params, context))
    return None if pairs is None else (*pairs, predicted.quantity)
