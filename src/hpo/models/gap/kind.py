"""GAP, the model kind: a SOAP-GAP of energies and forces fitted by ``gap_fit``.

One trial: gap_fit fits the model (``gap_fit.GAP``) while this process computes the descriptors of
the training and validation frames on the core gap_fit leaves free (cached by content); after the fit
the energies come from numpy on those descriptors (``sparse_gap``), or, for forces and non-dot-product
kernels, from quippy's calculator.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

from hpo import metrics, plots
from hpo.atomic import write_text
from hpo.cache import Cache
from hpo.models.base import ConfigError, MemoryBudgetExceeded, ModelKind, Scored, TrialFailure
from hpo.models.gap import gap_fit, sparse_gap
from hpo.tracking import flatten

# Allowed values of the model config (conf/model/gap.yaml), one table for config, trials and fit.
# gap_fit exits 0 on some impossible values (delta < 0, zeta = 0), so every trial is checked too.
PARAMETERS = {
    "cutoff": "positive",
    "atom_sigma": "positive",
    "delta": "positive",
    "zeta": "count",
    "n_max": "count",
    "l_max": "non_negative_int",
    "n_sparse": "count",
    "default_sigma.energy": "positive",
    "default_sigma.force": "positive",
    "covariance_type": ("dot_product", "gaussian"),
    "sparse_method": ("cur_points", "random", "uniform", "none"),
    "fit_timeout_s": "positive",
    "memory_budget_gb": "positive",
    "force_metrics": "bool",
    "cost_frames": "non_negative_int",
    "descriptor_cache_max_gb": "positive",
}


class GapKind(ModelKind):
    name = "gap"
    display_name = "GAP"
    targets = ("energy", "force")
    parameters = PARAMETERS
    trial_metrics = ("train_energy_rmse", "val_energy_rmse", "energy_rmse_ratio", "fit_time_s", "eval_time_s", "md_ms_per_atom")
    pyfunc_code = Path(__file__).with_name("pyfunc.py")

    def check_combination(self, params: dict, prefix: str) -> None:
        if params["atom_sigma"] >= params["cutoff"]:
            raise ConfigError(f"{prefix}.atom_sigma={params['atom_sigma']!r} is not allowed: smaller than the cutoff ({params['cutoff']})")

    def preflight(self, params: dict, frames: list) -> None:
        """gap_fit's memory for descriptors (grows with the cutoff) and covariances (grows with n_sparse)
        against ``model.memory_budget_gb``: gap_fit itself dies only after minutes of work (or takes the
        machine down) with "Error allocating ... bytes"."""
        budget = params["memory_budget_gb"] * 1e9
        descriptors = gap_fit.descriptor_memory_bytes(params, frames)
        if descriptors > budget:
            raise _over_budget("cutoff", MemoryBudgetExceeded(
                f"cutoff={params['cutoff']!r} Å: about {gap_fit.neighbours_per_atom(params['cutoff'], frames):.3g} neighbours per atom "
                f"(the density of the training cells) make gap_fit's descriptors and their gradients need about "
                f"{descriptors / 1e9:.3g} GB, over model.memory_budget_gb={params['memory_budget_gb']}; "
                f"at most cutoff={gap_fit.largest_cutoff(params, frames, budget):.3g} Å fits "
                f"(n_max={params['n_max']}, l_max={params['l_max']}, {len(frames)} frames)",
                descriptors,
            ))
        n_sparse = gap_fit.effective_n_sparse(params["n_sparse"], frames)
        estimate = gap_fit.covariance_memory_bytes(n_sparse, frames)
        if estimate > params["memory_budget_gb"] * 1e9:
            raise _over_budget("n_sparse", MemoryBudgetExceeded(
                f"gap_fit would need about {estimate / 1e9:.1f} GB for its covariance matrices "
                f"(n_sparse={n_sparse}, {len(frames)} frames), over model.memory_budget_gb={params['memory_budget_gb']}",
                estimate,
            ))

    def score(self, cfg, params: dict, data, workdir: Path) -> Scored:
        """Fit with gap_fit, evaluate train and validation energies (and forces), write CSVs and a parity plot."""
        params = copy.deepcopy(params)
        requested = params["n_sparse"]
        params["n_sparse"] = gap_fit.effective_n_sparse(requested, data.train.frames)
        self.check_trial(params)
        self.preflight(params, data.train.frames)
        sets = {"train": data.train, "val": data.val}
        cache = Cache(params["descriptor_cache_dir"])
        found_envs: dict[tuple[str, str], sparse_gap.Environments] = {}
        # sparse_gap evaluates energies of dot-product kernels; forces and other kernels go through quippy.
        with_quippy = params["force_metrics"] or params["covariance_type"] != "dot_product"

        def compute_descriptors(gap_fit_failed: Callable[[], bool]) -> None:
            if with_quippy:
                return
            for descriptor in gap_fit.expected_descriptors(params, data.train.frames):
                for name, frames in sets.items():
                    found = sparse_gap.environments(descriptor, frames.frames, cache, should_stop=gap_fit_failed)
                    if found is None:
                        return
                    found_envs[name, sparse_gap.descriptor_key(descriptor)] = found

        start = time.perf_counter()
        fitted = gap_fit.GAP(params, dict(cfg.dataset.e0), cfg.dataset.property_keys, cfg.threads, cfg.study.seed).fit(
            data.train.path, workdir, while_fitting=compute_descriptors
        )
        fit_wall = time.perf_counter() - start
        start = time.perf_counter()
        found, predicted = {}, {}
        if with_quippy:
            potential = gap_fit.load(fitted.model_file_)  # quippy's calculator: descriptor gradients give forces
            for name, frames in sets.items():
                predicted[name], forces = gap_fit.predict(potential, frames.frames)
                forces = forces if params["force_metrics"] else None
                found.update(metrics.energy_force_metrics(name, frames.energies, predicted[name], frames.n_atoms, frames.forces, forces))
        else:
            model = sparse_gap.SparseGap.read(fitted.model_file_)
            for name, frames in sets.items():
                envs = {
                    d: found_envs.get((name, sparse_gap.descriptor_key(d))) or sparse_gap.environments(d, frames.frames, cache)
                    for d in model.descriptors
                }
                predicted[name] = model.energies(frames.frames, envs)
                found.update(metrics.energy_force_metrics(name, frames.energies, predicted[name], frames.n_atoms))
        for name, frames in sets.items():
            write_text(
                workdir / f"{'validation' if name == 'val' else 'train'}_errors.csv",
                "true_energy_eV,predicted_energy_eV\n"
                + "".join(f"{t:.10f},{p:.10f}\n" for t, p in zip(frames.energies, predicted[name])),
            )
        if params["cost_frames"]:
            found["md_ms_per_atom"] = md_cost_ms_per_atom(fitted.model_file_, data.val.frames[: params["cost_frames"]])
        eval_time = time.perf_counter() - start

        nan = [k for k, v in found.items() if not math.isfinite(v)]
        if nan:
            raise TrialFailure("nan_metric", f"non-finite metrics {nan} (the fit diverged)")
        tags = {"gap_fit_command": fitted.command_line}
        for quantity in ("energy", "force"):
            if f"val_{quantity}_rmse" in found:
                gap_, ratio, flag = metrics.overfitting(found[f"train_{quantity}_rmse"], found[f"val_{quantity}_rmse"], cfg.overfit_ratio)
                found[f"{quantity}_rmse_gap"], found[f"{quantity}_rmse_ratio"] = gap_, ratio
                tags["overfit" if quantity == "energy" else "overfit_force"] = str(flag).lower()
        # descriptor_wait_s: how long the trial waited for descriptors after gap_fit had finished.
        found.update(fit_time_s=fitted.fit_time_s_, descriptor_wait_s=fit_wall - fitted.fit_time_s_, eval_time_s=eval_time)

        title = f"GAP, {data.train.path.name} ({len(data.train)}) / {data.val.path.name} ({len(data.val)})"
        parity = plots.parity_plot(
            workdir / "parity_energy.png",
            {"train": (data.train.energies, predicted["train"]), "validation": (data.val.energies, predicted["val"])},
            "energy",
            "eV",
            title,
        )
        if params["descriptor_cache_dir"]:
            cache.trim(int(params["descriptor_cache_max_gb"] * 1e9))
        return Scored(
            metrics=found,
            params={**flatten(params), "n_sparse_requested": requested, "threads": cfg.threads},
            tags=tags,
            artifacts=[workdir / "gap_fit.cmd", workdir / "gap_fit.out", workdir / "gap_fit.err", workdir / "train_errors.csv", workdir / "validation_errors.csv", parity],
            model_files=[fitted.model_file_],
        )


def _over_budget(parameter: str, exc: MemoryBudgetExceeded) -> MemoryBudgetExceeded:
    """Note which model parameter drives the estimate (config errors name it)."""
    exc.parameter = parameter
    return exc


def md_cost_ms_per_atom(model_file: Path, frames) -> float:
    """Milliseconds per atom of one MD step (energies and forces with quippy's calculator), XML parsing excluded."""
    potential = gap_fit.load(model_file)
    gap_fit.predict(potential, frames[:1])  # the first call sets up quippy's buffers
    start = time.perf_counter()
    gap_fit.predict(potential, frames)
    return (time.perf_counter() - start) * 1e3 / sum(len(atoms) for atoms in frames)


KIND = GapKind()
