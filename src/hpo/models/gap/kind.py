"""GAP, the model kind: a SOAP-GAP of energies and forces, as ``gap_fit`` fits it.

``model.solver`` chooses how a trial fits:

- ``numpy`` (default): hpo chooses the sparse points (``sparse_gp.select_sparse``) and solves gap_fit's
  sparse GP itself, streamed frame by frame (``solver``), within 1e-6 eV and 1e-5 eV/A of gap_fit
  (asserted by tests/unit/models/gap/test_solver.py): a trial that changes only sigmas, delta, jitter or n_sparse
  reuses the training set's factors and costs a solve.
  Promotion refits the chosen model with gap_fit on the same sparse points (``production_model``).
- ``gap_fit``: gap_fit fits each trial (``gap_fit.GAP``) while this process computes the evaluation
  descriptors on the core gap_fit leaves free; energies then come from numpy (``sparse_gap``), or,
  for forces and non-dot-product kernels, from quippy's calculator.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hpo import progress
from hpo.cache import Cache, digest, digest_array, frame_digests
from hpo.data import subset_frames
from hpo.models.base import ConfigError, FitContext, Fitted, MemoryBudgetExceeded, ModelKind, TimeBudgetExceeded, TrialFailure, Uncertainty
from hpo.models.predictions import EnergyPredictions, energy_loss
from hpo.models.rules import allowed, describe
from hpo.models.gap import gap_fit, solver, sparse_gap
from hpo.models.gap.descriptors import Environments, calculate_frame, descriptor_key, descriptor_value, environments, quippy_version
from hpo.models.sparse_gp import SPARSE_METHODS, select_sparse

# Allowed values of the model config (conf/model/gap.yaml), one table for config, trials and fit.
# gap_fit exits 0 on some impossible values (delta < 0, zeta = 0), so every trial is checked too.
PARAMETERS = {
    "cutoff": "positive",
    "atom_sigma": "positive",
    "delta": "positive",
    "zeta": "count",
    "n_max": "count",
    "l_max": "non_negative_int",
    "n_sparse": "count_or_auto",
    "default_sigma.energy": "positive",
    "default_sigma.force": "positive_or_auto",
    "covariance_type": ("dot_product", "gaussian"),
    "sparse_method": ("cur_points", "random", "uniform", "none"),
    "fit_timeout_s": "positive",
    "memory_budget_gb": "positive",
    "fit_forces": "bool",
    "force_fraction": "fraction",
    "solver": ("numpy", "gap_fit"),
    "sparse_selection": SPARSE_METHODS,
    "refit_tolerance_eV_per_atom": "positive",
    "cost_frames": "non_negative_int",
    "descriptor_cache_max_gb": "positive",
}
# What an entry of model.descriptors may set (the rest it takes from the model's own SOAP), with its rule.
DESCRIPTOR_PARAMETERS = {
    "descriptor": ("soap",),  # hpo's solver and evaluation implement the dot-product kernel of SOAP-like vectors
    **{key: PARAMETERS.get(key, "positive") for key in gap_fit.DESCRIPTOR_KEYS},
    "n_sparse": "count",
    "covariance_type": ("dot_product",),
}

# The descriptor pass is timed on one frame at this cutoff (A) at most before a fit and scaled by the atoms
# and by the neighbours at the real cutoff (a centre's SOAP and its gradients cost in proportion to its
# neighbours): a cutoff of 100 A is refused in a second instead of running for hours.
PROBE_CUTOFF = 4.0
# Training sets with more atoms than this show a progress line while their kernel rows are computed.
LONG_FIT_ATOMS = 20000
# n_sparse=auto: this fraction of the most frequent species' environments, within these bounds and half
# the memory budget: on the 100 x 256-atom EMT Cu study of issue 22 this gave 2000, and the search's best was 1506.
AUTO_SPARSE_FRACTION = 0.1
AUTO_SPARSE_RANGE = (100, 2000)
# default_sigma.force=auto: this fraction of the spread of the training force components, at least the
# floor (issue 22's water-like settings: 0.05 eV/A for forces of 2.2 eV/A RMS, about 2 %).
AUTO_FORCE_SIGMA_FRACTION = 0.03
AUTO_FORCE_SIGMA_FLOOR = 0.005


class GapKind(ModelKind):
    name = "gap"
    display_name = "GAP"
    targets = ("energy", "force")
    parameters = PARAMETERS
    trial_metrics = (
        "train_energy_rmse", "val_energy_rmse", "energy_rmse_ratio", "val_force_rmse", "val_loss", "fit_time_s", "eval_time_s", "md_ms_per_atom",
    )
    pyfunc_code = Path(__file__).with_name("pyfunc.py")
    drives_md = True
    records_loss = True
    cache_keys = ("descriptor_cache_dir", "descriptor_cache_max_gb")
    capped_params = ("n_sparse",)

    def pyfunc_outputs(self):
        from mlflow.types.schema import Array, ColSpec, Schema

        return Schema([ColSpec("double", "energy"), ColSpec(Array(Array("double")), "forces")])

    def check_combination(self, params: dict, prefix: str) -> None:
        extras = params.get("descriptors") or []
        if not isinstance(extras, (list, tuple)) or not all(hasattr(extra, "items") for extra in extras):
            raise ConfigError(f"{prefix}.descriptors={extras!r} is not allowed: a list of mappings of descriptor keys")
        for i, extra in enumerate(extras):
            for key, value in extra.items():
                if key not in DESCRIPTOR_PARAMETERS:
                    raise ConfigError(f"{prefix}.descriptors.{i}.{key} is not a descriptor key: one of {', '.join(DESCRIPTOR_PARAMETERS)}")
                if not allowed(DESCRIPTOR_PARAMETERS[key], value):
                    raise ConfigError(f"{prefix}.descriptors.{i}.{key}={value!r} is not allowed: {describe(DESCRIPTOR_PARAMETERS[key])}")
        for i, setting in enumerate(gap_fit.descriptor_settings(params)):
            where = prefix if i == 0 else f"{prefix}.descriptors.{i - 1}"
            if setting["atom_sigma"] >= setting["cutoff"]:
                raise ConfigError(f"{where}.atom_sigma={setting['atom_sigma']!r} is not allowed: smaller than the cutoff ({setting['cutoff']})")

    def data_defaults(self, params: dict, data) -> dict[str, tuple[object, str]]:
        """``n_sparse=auto``: a tenth of the most frequent species' environments (``AUTO_SPARSE_*``), no more
        than half ``model.memory_budget_gb`` holds; ``default_sigma.force=auto``: 3% of the training forces' spread."""
        frames = data.train.frames
        out: dict[str, tuple[object, str]] = {}
        if params["n_sparse"] == "auto":
            species, count = max(gap_fit.environments_per_species(frames).items(), key=lambda item: item[1])
            low, high = AUTO_SPARSE_RANGE
            wanted = int(min(max(round(AUTO_SPARSE_FRACTION * count), low), high, count))
            half = params["memory_budget_gb"] * 1e9 / 2
            probe = {**params, "default_sigma": {**params["default_sigma"], "force": 1.0}}
            fitting = wanted
            if params["solver"] == "numpy" and numpy_memory_bytes({**probe, "n_sparse": wanted}, frames) > half:
                fitting = int(_largest(lambda n: numpy_memory_bytes({**probe, "n_sparse": int(n)}, frames) <= half, 1, wanted, integer=True))
            why = f"a tenth of the {count} {species} environments, within {low}-{high}"
            if fitting < wanted:
                why += f", cut to fit half of model.memory_budget_gb={params['memory_budget_gb']}"
            out["n_sparse"] = (fitting, why)
        if params["default_sigma"]["force"] == "auto":
            if data.train.forces:
                spread = float(np.std(np.concatenate([np.ravel(f) for f in data.train.forces])))
                value = float(f"{max(AUTO_FORCE_SIGMA_FRACTION * spread, AUTO_FORCE_SIGMA_FLOOR):.2g}")
                out["default_sigma.force"] = (value, f"{AUTO_FORCE_SIGMA_FRACTION:.0%} of the training forces' spread, {spread:.3g} eV/Å")
            else:
                out["default_sigma.force"] = (1.0, "no forces in the data: unused")
        return out

    def preflight(self, params: dict, frames: list) -> None:
        """The fit's peak memory and the time of its descriptor pass, estimated before it starts.

        Memory against ``model.memory_budget_gb``: hpo's streamed solver (``numpy_memory_bytes``: flat in the
        number of frames) or gap_fit (its descriptor gradients grow with the cutoff cubed and the frames, its
        covariances with n_sparse); gap_fit itself dies only after minutes of work (or takes the machine down)
        with "Error allocating ... bytes". Time against ``model.fit_timeout_s`` (``descriptor_pass_seconds``).
        Over either: ``MemoryBudgetExceeded`` / ``TimeBudgetExceeded`` naming the parameter and the largest
        value of it that fits."""
        self._check_memory(params, frames)
        self._check_descriptor_time(params, frames)
        self._check_kernel_time(params, frames)

    def _check_memory(self, params: dict, frames: list) -> None:
        budget = params["memory_budget_gb"] * 1e9
        if params["solver"] == "numpy":
            estimate = numpy_memory_bytes(params, frames)
            if estimate <= budget:
                return
            at_one_point = numpy_memory_bytes({**params, "n_sparse": 1}, frames)
            if at_one_point > budget:  # one frame's descriptor gradients alone: the cutoff is the lever
                raise _over_budget("cutoff", MemoryBudgetExceeded(
                    f"cutoff={params['cutoff']!r} Å: about {gap_fit.neighbours_per_atom(params['cutoff'], frames):.3g} neighbours per atom "
                    f"make one frame's descriptor gradients need about {at_one_point / 1e9:.3g} GB, over "
                    f"model.memory_budget_gb={params['memory_budget_gb']}; at most cutoff="
                    f"{_largest(lambda c: numpy_memory_bytes({**params, 'cutoff': c, 'n_sparse': 1}, frames) <= budget, 0.0, float(params['cutoff'])):.3g} Å fits",
                    estimate,
                ))
            largest = int(_largest(lambda n: numpy_memory_bytes({**params, "n_sparse": int(n)}, frames) <= budget, 1, int(params["n_sparse"]), integer=True))
            raise _over_budget("n_sparse", MemoryBudgetExceeded(
                f"hpo's solver would need about {estimate / 1e9:.3g} GB (n_sparse={'+'.join(map(str, sparse_counts(params, frames)))} per species, "
                f"{'energies and forces' if params['fit_forces'] else 'energies'}, {len(frames)} frames), over "
                f"model.memory_budget_gb={params['memory_budget_gb']}; at most n_sparse={largest} fits",
                estimate,
            ))
        with_forces = bool(params["fit_forces"])
        descriptors = gap_fit.descriptor_memory_bytes(params, frames)
        if with_forces and descriptors > budget:
            raise _over_budget("cutoff", MemoryBudgetExceeded(
                f"cutoff={params['cutoff']!r} Å: about {gap_fit.neighbours_per_atom(params['cutoff'], frames):.3g} neighbours per atom "
                f"(the density of the training cells) make gap_fit's descriptors and their gradients need about "
                f"{descriptors / 1e9:.3g} GB, over model.memory_budget_gb={params['memory_budget_gb']}; "
                f"at most cutoff={gap_fit.largest_cutoff(params, frames, budget):.3g} Å fits "
                f"(n_max={params['n_max']}, l_max={params['l_max']}, {len(frames)} frames)",
                descriptors,
            ))
        n_sparse = sparse_counts(params, frames)
        estimate = gap_fit.covariance_memory_bytes(n_sparse, frames, with_forces)
        if estimate > budget:
            raise _over_budget("n_sparse", MemoryBudgetExceeded(
                f"gap_fit would need about {estimate / 1e9:.1f} GB for its covariance matrices "
                f"(n_sparse={'+'.join(map(str, n_sparse))} per species, {len(frames)} frames), over model.memory_budget_gb={params['memory_budget_gb']}",
                estimate,
            ))

    def _check_descriptor_time(self, params: dict, frames: list) -> None:
        """The training set's descriptor pass (both solvers compute it: hpo's for its solve, gap_fit its own)
        must fit in ``model.fit_timeout_s``; over it: ``TimeBudgetExceeded`` naming the largest cutoff that fits."""
        bound = float(params["fit_timeout_s"])
        estimate = descriptor_pass_seconds(params, frames)
        if estimate <= bound:
            return
        at = lambda cutoff: descriptor_pass_seconds({**params, "cutoff": cutoff}, frames)
        largest = _largest(lambda c: at(c) <= bound, 0.0, float(params["cutoff"]))
        raise _over_budget("cutoff", TimeBudgetExceeded(
            f"cutoff={params['cutoff']!r} Å: the descriptors of the {len(frames)} training frames"
            f"{' with their gradients' if params['fit_forces'] else ''} would take about {estimate:.3g} s "
            f"(timed on one frame, scaled by atoms and neighbours), over model.fit_timeout_s={params['fit_timeout_s']}; "
            f"at most cutoff={largest:.3g} Å fits", estimate,
        ))

    def _check_kernel_time(self, params: dict, frames: list) -> None:
        """hpo's solver: its kernel rows (with forces the bulk of a fit: pairs x 3 x d x M multiply-adds) must fit
        in what ``model.fit_timeout_s`` leaves after the descriptors; over it: ``TimeBudgetExceeded`` naming the
        largest n_sparse that fits. (gap_fit's own solve is bounded while it runs: killed at the timeout.)"""
        if params["solver"] != "numpy":
            return
        bound = float(params["fit_timeout_s"]) - descriptor_pass_seconds(params, frames)
        estimate = kernel_rows_seconds(params, frames)
        if estimate <= bound:
            return
        largest = int(_largest(lambda n: kernel_rows_seconds({**params, "n_sparse": int(n)}, frames) <= bound, 1, int(params["n_sparse"]), integer=True))
        raise _over_budget("n_sparse", TimeBudgetExceeded(
            f"n_sparse={params['n_sparse']!r}: the kernel rows of the {len(frames)} training frames"
            f"{' with their forces' if params['fit_forces'] else ''} would take about {estimate:.3g} s (this machine's "
            f"matrix-product rate), over what model.fit_timeout_s={params['fit_timeout_s']} leaves after the descriptors; "
            f"at most n_sparse={largest} fits", estimate,
        ))

    def fit_targets(self, params: dict) -> tuple[str, ...]:
        return self.targets if params.get("fit_forces") else ("energy",)

    def inactive_parameters(self, params: dict) -> dict[str, str]:
        if params.get("fit_forces"):
            return {}
        # energies only (the workshop default: its force column does not follow the geometry)
        return {"default_sigma.force": "model.fit_forces=false: no force targets enter the fit"}

    def effective_params(self, params: dict, data) -> dict:
        """``auto`` resolved and every n_sparse capped at the environments per species, as gap_fit does (so the
        record says what was fitted, and subsets of these frames keep the same descriptor strings)."""
        params = capped_n_sparse(self.resolve_auto(params, data), data.train.frames)
        self.check_trial(params)
        return params

    def fit(self, train, params: dict, workdir: Path, context: FitContext, upcoming=()) -> Fitted:
        """hpo's numpy solve or gap_fit (``model.solver``); the estimate the memory budget was held to is
        recorded: this process's (numpy) or gap_fit's own (its child process)."""
        cache = Cache(params["descriptor_cache_dir"])
        fit = fit_with_numpy if params["solver"] == "numpy" else fit_with_gap_fit
        fitted = fit(train, params, workdir, context, cache, upcoming)
        estimate = numpy_memory_bytes(params, train.frames) if params["solver"] == "numpy" else gap_fit_memory_bytes(params, train.frames)
        fitted.metrics["memory_estimate_gb"] = estimate / 1e9
        fitted.tags["solver"] = params["solver"]
        return fitted

    def evaluate(self, fitted: Fitted, frames) -> EnergyPredictions:
        return fitted.state.predict(frames)

    def reference(self, split, params: dict, context: FitContext) -> EnergyPredictions:
        return EnergyPredictions.of(split)

    def loss_metrics(self, found, val, params, weights, prefixes=("train", "val")) -> dict[str, float]:
        return energy_loss(weights, found, val, bool(params["fit_forces"]), prefixes)

    def cost_metrics(self, fitted: Fitted, frames) -> dict[str, float]:
        count = fitted.params["cost_frames"]
        return {"md_ms_per_atom": md_cost_ms_per_atom(fitted.model_files[0], frames[:count])} if count else {}

    def failure_artifacts(self, workdir: Path) -> list[Path]:
        return [workdir / "gap_fit.err", workdir / "gap_fit.out"]

    def lineage_tags(self, workdir: Path) -> dict[str, str]:
        command_file = workdir / "gap_fit.cmd"
        return {"gap_fit_command": command_file.read_text().strip()} if command_file.is_file() else {}

    def files_in(self, path: Path) -> list[Path]:
        """A local XML of any name, or the gap.xml inside a promoted model's folder."""
        return [path] if path.is_file() else [path / gap_fit.MODEL_FILE]

    def holds(self, path: Path) -> bool:
        return path.suffix == ".xml" if path.is_file() else (path / gap_fit.MODEL_FILE).is_file()

    def predict(self, files: list[Path], frames, params: dict, with_std: bool = False) -> EnergyPredictions:
        """Energies by hpo's numpy evaluation of the XML where it can, with the posterior std for ``with_std``
        (energies only); forces (``model.fit_forces``) and other kernels by quippy's calculator."""
        xml = _xml(files)
        n_atoms = np.array([len(a) for a in frames])
        try:
            if params.get("fit_forces") and not with_std:
                raise sparse_gap.UnsupportedModel("forces need quippy's calculator")
            model = sparse_gap.SparseGap.read(xml)
            if with_std and model.posterior is not None:
                energies, std = model.predict(frames, Cache(params["descriptor_cache_dir"]), return_std=True)
                return EnergyPredictions(energies, n_atoms, None, std)
            return EnergyPredictions(model.predict(frames), n_atoms)
        except sparse_gap.UnsupportedModel:
            energies, forces = gap_fit.predict(gap_fit.load(xml), frames)
            return EnergyPredictions(energies, n_atoms, forces if params.get("fit_forces") and not with_std else None)

    def load(self, files: list[Path]) -> sparse_gap.SparseGap:
        return sparse_gap.SparseGap.read(_xml(files))

    def calculator(self, files: list[Path]):
        """quippy's ``Potential`` (parsing the XML costs seconds: load once per model)."""
        return gap_fit.load(_xml(files))

    def bundle(self, files: list[Path], folder: Path) -> None:
        """The XML and its companions written next to it (sparseX files, the posterior), not the gzipped copy."""
        for path in files:
            for companion in sorted(path.parent.glob(path.name + "*")):
                if companion.is_file() and companion.suffix != ".gz":
                    shutil.copy(companion, folder / companion.name)

    def attach_posterior(self, params: dict, data, files: list[Path], context: FitContext) -> list[Path]:
        """The sparse GP's posterior (``posterior.Posterior``) written beside the XML as ``gap.xml.posterior.npz``,
        recomputed from the model's own sparse points and the training frames' descriptors (and force rows when
        forces were fitted): the same for a model of gap_fit's or of hpo's solver, since both solve the same
        problem. (quippy's ``local_gap_variance`` of a gap_fit model fitted with ``export_covariance=T`` is not
        this variance: README, "Uncertainty".) Models quippy alone evaluates keep none."""
        xml = _xml(files)
        params = self.resolve_auto(copy.deepcopy(params), data)
        try:
            model = sparse_gap.SparseGap.read(xml)
        except sparse_gap.UnsupportedModel:
            return files
        with_forces = bool(params["fit_forces"]) and bool(data.train.forces)
        cache = Cache(params["descriptor_cache_dir"])
        if with_forces and not _gradients_fit_in_cache(params, data.train.frames):
            cache = Cache(None)
        posterior = solver.posterior_of_model(
            model, data.train.frames, solver.Hyper.from_params(params, {}), data.train.forces if with_forces else None, cache,
            force_atoms(params, data.train.frames, context.seed) if with_forces else None,
        )
        posterior.save(sparse_gap.posterior_file(xml))
        return files

    def predictive_std(self, files: list[Path], frames) -> Uncertainty | None:
        """Per frame: the std of the total energy per atom (eV/atom, what thresholds use: comparable across cell
        sizes), of the total energy (eV) and the largest of its atoms' local energies (eV); per atom the latter."""
        xml = _xml(files)
        if not sparse_gap.posterior_file(xml).is_file():
            return None
        posterior = solver.Posterior.load(sparse_gap.posterior_file(xml))
        frame_std, atom_std = posterior.std(list(frames))
        n_atoms = np.array([len(a) for a in frames], dtype=float)
        return Uncertainty(
            per_frame={"energy_std_eV_per_atom": frame_std / n_atoms, "energy_std_eV": frame_std,
                       "local_energy_std_max_eV": np.array([a.max() if len(a) else 0.0 for a in atom_std])},
            primary="energy_std_eV_per_atom", per_atom=atom_std, per_atom_name="local_energy_std_eV",
        )

    def set_std_scale(self, files: list[Path], scale: float) -> None:
        path = sparse_gap.posterior_file(_xml(files))
        if path.is_file():  # the scale was fitted to the std as reported, i.e. with any earlier scale in
            posterior = solver.Posterior.load(path)
            dataclasses.replace(posterior, std_scale=posterior.std_scale * float(scale)).save(path)

    def production_model(self, params: dict, data, trial_files: list[Path], workdir: Path, context: FitContext) -> tuple[list[Path], dict[str, float]]:
        """The model to register. A trial solved with numpy is refitted by gap_fit on the same sparse points, and
        both must predict the same validation energies (``model.refit_tolerance_eV_per_atom``). When gap_fit's refit
        would pass ``model.memory_budget_gb`` (its descriptor gradients grow with the frames), hpo's own model
        is registered (gap_fit's XML layout, loaded by quippy) after the same check on the largest training
        subset gap_fit can fit: figure ``production_gap_fit_refit`` says which (1 refit, 0 hpo's own)."""
        if params["solver"] != "numpy":
            return trial_files, {}
        params = capped_n_sparse(params, data.train.frames)
        budget = params["memory_budget_gb"] * 1e9
        estimate = gap_fit_memory_bytes(params, data.train.frames)
        if estimate > budget:
            return [trial_files[0]], {"production_gap_fit_refit": 0.0, "refit_estimate_gb": estimate / 1e9,
                                      **self._check_on_subset(params, data, workdir, budget, context)}
        n_descriptors = len(gap_fit.expected_descriptors(params, data.train.frames))
        indices = tuple(gap_fit.read_sparse_index_file(trial_files[0].parent / name) for name in gap_fit.sparse_file_names(n_descriptors))
        refit = gap_fit.GAP(
            params, context.e0, context.keys, context.threads, context.seed,
            sparse=gap_fit.SparsePoints(data.train.frames, indices), energy_only=not params["fit_forces"],
            force_atoms=force_atoms(params, data.train.frames, context.seed) if params["fit_forces"] else None,
        ).fit(data.train.path, workdir)
        difference, per_atom = _energy_difference(trial_files[0], refit.model_file_, data.val.frames, Cache(params["descriptor_cache_dir"]))
        _refuse_mismatch(difference, per_atom, params, workdir)
        return [refit.model_file_], {"production_gap_fit_refit": 1.0, "refit_max_energy_difference_eV": difference,
                                     "refit_max_energy_difference_eV_per_atom": per_atom, "refit_fit_time_s": refit.fit_time_s_}

    def _check_on_subset(self, params: dict, data, workdir: Path, budget: float, context: FitContext) -> dict[str, float]:
        """hpo's solve against gap_fit's on the largest seeded subset of the training frames whose gap_fit fit
        fits ``budget``, on the same sparse points: the check that stands in for the refit."""
        order = np.random.default_rng(context.seed).permutation(len(data.train))
        fits = lambda k: gap_fit_memory_bytes(params, [data.train.frames[i] for i in order[: int(k)]]) <= budget
        size = int(_largest(fits, 1, len(order), integer=True))
        if not fits(size):
            raise TrialFailure("refit_mismatch", f"gap_fit cannot fit even one training frame within model.memory_budget_gb={params['memory_budget_gb']}: nothing checks hpo's model")
        subset = subset_frames(data.train, np.sort(order[:size]), workdir / "check_subset.xyz")
        forces = subset.forces if params["fit_forces"] and subset.forces else None
        kept = force_atoms(params, subset.frames, context.seed) if forces is not None else None
        model, sparse = solver.fit_frames(params, subset.frames, subset.energies, context.e0_values, forces=forces,
                                          sparse_method=params["sparse_selection"], seed=context.seed, threads=context.threads, force_atoms=kept)
        own_file = solver.write_xml(model, workdir / "check_hpo.xml")
        descriptors = gap_fit.expected_descriptors(params, subset.frames)
        refit = gap_fit.GAP(
            params, context.e0, context.keys, context.threads, context.seed,
            sparse=gap_fit.SparsePoints(subset.frames, tuple(sparse[d] for d in descriptors)), energy_only=forces is None, force_atoms=kept,
        ).fit(subset.path, workdir / "check_gap_fit")
        difference, per_atom = _energy_difference(own_file, refit.model_file_, data.val.frames, Cache(params["descriptor_cache_dir"]))
        _refuse_mismatch(difference, per_atom, params, workdir / "check_gap_fit")
        return {"check_frames": float(size), "check_max_energy_difference_eV": difference, "check_max_energy_difference_eV_per_atom": per_atom}


_PROBES: dict[str, float] = {}  # seconds per centre and neighbour, by descriptor and probe frame: one timing per process


def descriptor_pass_seconds(params: dict, frames) -> float:
    """Seconds quippy takes for the descriptors (with gradients when forces are fitted) of ``frames``: the
    largest frame is timed once per process at min(cutoff, ``PROBE_CUTOFF``), per centre and neighbour, and
    that rate is multiplied by the centres and their neighbours at the real cutoff (density of the frames)."""
    probe = max(frames, key=len)
    gradients = bool(params["fit_forces"])
    centres = sum(len(a) for a in frames)
    total = 0.0
    for setting in gap_fit.descriptor_settings(params):
        cutoff = float(setting["cutoff"])
        timed_cutoff = min(cutoff, PROBE_CUTOFF)
        timed = {**params, **setting, "cutoff": timed_cutoff, "atom_sigma": min(float(setting["atom_sigma"]), timed_cutoff / 2),
                 "cutoff_transition_width": min(float(setting["cutoff_transition_width"]), timed_cutoff / 2), "descriptors": []}
        strings = gap_fit.expected_descriptors(timed, [probe])
        key = digest("descriptor-probe", [descriptor_key(d) for d in strings], gradients, frame_digests([probe]))
        if key not in _PROBES:
            _PROBES[key] = _frame_seconds(strings, probe, gradients) / (len(probe) * (gap_fit.neighbours_per_atom(timed_cutoff, [probe]) + 1.0))
        total += _PROBES[key] * centres * (gap_fit.neighbours_per_atom(cutoff, frames) + 1.0)
    return total


_GEMM_SECONDS: list[float] = []  # seconds per multiply-add of numpy's matrix product here, measured once per process


def gemm_seconds_per_multiply_add() -> float:
    """This machine's matrix-product speed, as the kernel rows use it (a chunk of gradient pairs against the
    sparse points): best of 3 products of (6144 x 253) by (253 x 512), in its current thread setting."""
    if not _GEMM_SECONDS:
        rng = np.random.default_rng(0)
        a, b = rng.random((6144, 253)), rng.random((253, 512))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        _GEMM_SECONDS.append(best / (a.shape[0] * a.shape[1] * b.shape[1]))
    return _GEMM_SECONDS[0]


def kernel_rows_seconds(params: dict, frames) -> float:
    """Seconds of hpo's kernel rows for ``frames`` (``kernels.energy_rows``/``force_rows``): per descriptor setting,
    environments (with forces: gradient pairs x 3) x dimensions x its sparse points, plus the TSQR of the force
    rows, at the measured product rate: a lower bound (the rows' scatter and the pair bookkeeping are left out;
    50 frames of 256-atom Cu, n_max 8, 2000 points: 66.8 s estimated in one run under load (the rate varies with it),
    for the 82 s of kernel_time_s that bench_gap_scale.py measured)."""
    species = len({int(z) for atoms in frames for z in atoms.numbers})
    centres = sum(len(a) for a in frames)
    total = 0.0
    for setting, count in zip(gap_fit.descriptor_settings(params), sparse_counts(params, frames)):
        dimensions = gap_fit.soap_dimensions(int(setting["n_max"]), int(setting["l_max"]), species)
        rows = centres * (3 * (gap_fit.neighbours_per_atom(float(setting["cutoff"]), frames) + 1.0) if params["fit_forces"] else 1.0)
        total += rows * dimensions * count * species
    if params["fit_forces"]:  # the force rows folded into R: a QR of (M + 2M) x M rows per 2M rows, ~1.5 M^2 per row
        total += 3 * centres * 1.5 * (species * sum(sparse_counts(params, frames))) ** 2
    return total * gemm_seconds_per_multiply_add()


def _frame_seconds(descriptors: list[str], atoms, gradients: bool, repeats: int = 3) -> float:
    """Seconds of quippy's descriptors of one frame, best of ``repeats`` after a first call (which sets up
    quippy's buffers: on a 12-atom frame it costs more than the descriptors themselves)."""
    from quippy.descriptors import Descriptor  # imported late: loading the Fortran library is slow

    total = 0.0
    for descriptor in descriptors:
        calculator = Descriptor(descriptor)
        calculate_frame(calculator, descriptor, atoms, gradients)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            calculate_frame(calculator, descriptor, atoms, gradients)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def capped_n_sparse(params: dict, frames) -> dict:
    """``params`` with the n_sparse of every descriptor capped at the environments per species, as gap_fit does
    (so the record says what was fitted, and subsets of these frames keep the same descriptor strings)."""
    params = copy.deepcopy(params)
    params["n_sparse"] = gap_fit.effective_n_sparse(params["n_sparse"], frames)
    for extra in params.get("descriptors") or []:
        if "n_sparse" in extra:
            extra["n_sparse"] = gap_fit.effective_n_sparse(extra["n_sparse"], frames)
    return params


def sparse_counts(params: dict, frames) -> list[int]:
    """n_sparse per species of each descriptor setting, as fitted."""
    return [gap_fit.effective_n_sparse(s["n_sparse"], frames) for s in gap_fit.descriptor_settings(params)]


def gap_fit_memory_bytes(params: dict, frames) -> int:
    """gap_fit's own estimate for a fit of ``frames``: descriptors (with gradients when forces are fitted) and covariances."""
    return gap_fit.descriptor_memory_bytes(params, frames) + gap_fit.covariance_memory_bytes(
        sparse_counts(params, frames), frames, bool(params["fit_forces"]))


def _energy_difference(model_file: Path, other_file: Path, frames, cache: Cache) -> tuple[float, float]:
    """Largest difference of two GAP files' energies on ``frames``: per cell (eV) and per atom (eV/atom)."""
    first, second = (sparse_gap.SparseGap.read(f) for f in (model_file, other_file))
    difference = np.abs(first.predict(frames, cache) - second.predict(frames, cache))
    return float(np.max(difference)), float(np.max(difference / np.array([len(a) for a in frames])))


def _refuse_mismatch(difference: float, per_atom: float, params: dict, workdir: Path) -> None:
    """Round-off of the two solves grows with the atoms summed per cell (and with the conditioning: a 256-atom Cu
    cell at sigma_E 6e-4 eV, delta 7.8 differed by 4.7e-6 eV per cell, 1.8e-8 eV/atom): the bound is per atom."""
    if per_atom > params["refit_tolerance_eV_per_atom"]:
        raise TrialFailure(
            "refit_mismatch",
            f"gap_fit's refit predicts validation energies up to {difference:.3g} eV ({per_atom:.3g} eV/atom) away from "
            f"hpo's solve (model.refit_tolerance_eV_per_atom={params['refit_tolerance_eV_per_atom']}); see {workdir}/gap_fit.out",
        )


def _xml(files: list[Path]) -> Path:
    return next(p for p in files if p.suffix == ".xml")


@dataclass
class NumpyFit:
    """What evaluating a fit of hpo's solver reuses: the training factors, the solution and its settings."""

    params: dict
    factors: solver.Factors
    solution: solver.Solution
    hyper: solver.Hyper
    with_forces: bool
    cache: Cache

    def predict(self, frames) -> EnergyPredictions:
        energies, forces = validation_predictions(self.params, frames, self.factors, self.solution, self.hyper, self.with_forces, self.cache)
        std = self.solution.posterior.std(frames, self.cache)[0]
        return EnergyPredictions(energies, np.array([len(a) for a in frames]), forces if self.with_forces else None, std)


@dataclass
class GapFitFit:
    """What evaluating a fit of gap_fit reuses: its model file, loaded once, and the descriptors of the frame
    sets computed while gap_fit ran (by ``id`` of their frame list)."""

    params: dict
    model_file: Path
    with_quippy: bool
    cache: Cache
    found_envs: dict = dataclasses.field(default_factory=dict)
    loaded: list = dataclasses.field(default_factory=list)

    def predict(self, frames) -> EnergyPredictions:
        n_atoms = np.array([len(a) for a in frames])
        if self.with_quippy:  # quippy's calculator: descriptor gradients give forces
            if not self.loaded:
                self.loaded.append(gap_fit.load(self.model_file))
            energies, forces = gap_fit.predict(self.loaded[0], frames)
            return EnergyPredictions(energies, n_atoms, forces if self.params["fit_forces"] else None)
        if not self.loaded:
            self.loaded.append(sparse_gap.SparseGap.read(self.model_file))
        model = self.loaded[0]
        envs = {d: self.found_envs.get((id(frames), descriptor_key(d))) or environments(d, frames, self.cache) for d in model.descriptors}
        return EnergyPredictions(model.energies(frames, envs), n_atoms)


def fit_with_gap_fit(train, params: dict, workdir: Path, context: FitContext, cache: Cache, upcoming=()) -> Fitted:
    """gap_fit fits (choosing its own sparse points) while this process computes the descriptors of the training
    frames and of the ``upcoming`` sets on the core gap_fit leaves free; energies then come from numpy, forces
    (and other kernels) from quippy."""
    with_quippy = params["fit_forces"] or params["covariance_type"] != "dot_product"
    state = GapFitFit(params, workdir / gap_fit.MODEL_FILE, with_quippy, cache)
    sets = [train.frames, *(split.frames for split in upcoming)]

    def compute_descriptors(gap_fit_failed: Callable[[], bool]) -> None:
        if with_quippy:
            return
        for descriptor in gap_fit.expected_descriptors(params, train.frames):
            for frames in sets:
                found = environments(descriptor, frames, cache, should_stop=gap_fit_failed)
                if found is None:
                    return
                state.found_envs[id(frames), descriptor_key(descriptor)] = found

    start = time.perf_counter()
    # forces enter gap_fit's fit exactly when they enter the numpy solver's: model.fit_forces
    energy_only = not params["fit_forces"]
    fitted = gap_fit.GAP(params, context.e0, context.keys, context.threads, context.seed, energy_only=energy_only,
                         force_atoms=None if energy_only else force_atoms(params, train.frames, context.seed)).fit(
        train.path, workdir, while_fitting=compute_descriptors
    )
    fit_wall = time.perf_counter() - start
    state.model_file = fitted.model_file_
    return Fitted(
        model_files=[fitted.model_file_],
        params=params,
        # descriptor_wait_s: how long the trial waited for descriptors after gap_fit had finished.
        metrics={"fit_time_s": fitted.fit_time_s_, "descriptor_wait_s": fit_wall - fitted.fit_time_s_},
        tags={"gap_fit_command": fitted.command_line},
        artifacts=[workdir / "gap_fit.cmd", workdir / "gap_fit.out", workdir / "gap_fit.err"],
        state=state,
        cache=cache,
    )


def fit_with_numpy(train, params: dict, workdir: Path, context: FitContext, cache: Cache, upcoming=()) -> Fitted:
    """hpo's own sparse GP, streamed frame by frame (``solver``): sparse points by ``model.sparse_selection``
    (kept in index files for the gap_fit refit at promotion), the training set's factors from the cache when
    a trial with the same descriptor, zeta and at least as many sparse points made them, then the solve;
    the training energies come out of the solve (and the training force RMSE out of the factor)."""
    with_forces = bool(params["fit_forces"]) and bool(train.forces)
    frames = train.frames
    descriptors = gap_fit.expected_descriptors(params, frames)
    start = time.perf_counter()
    found = {d: environments(d, frames, cache) for d in descriptors}  # vectors only: what the selection needs
    orders = {d: sparse_order(d, frames, found[d], params, context.seed, cache) for d in descriptors}
    descriptor_time = time.perf_counter() - start
    start = time.perf_counter()
    sparse = solver.SparseSet.of(found, orders)
    gradient_cache = cache if _gradients_fit_in_cache(params, frames) else Cache(None)
    factors, reused = training_factors(params, train, sparse, found, with_forces, context.seed, cache, gradient_cache,
                                       force_atoms(params, frames, context.seed) if with_forces else None)
    hyper = solver.Hyper.from_params(params, context.e0_values)
    solution = solver.solve(factors, frames, train.energies, hyper, with_posterior=True)
    fit_time = time.perf_counter() - start
    indices = sparse.indices(sparse.requested)
    points = gap_fit.SparsePoints(frames, tuple(indices[d] for d in descriptors))
    points.write(workdir)
    model_file = solver.write_xml(solution.model, workdir / gap_fit.MODEL_FILE)
    found_metrics = {"fit_time_s": fit_time, "descriptor_time_s": descriptor_time,
                     "factors_reused": float(reused), "kernel_time_s": factors.times.get("kernels_s", 0.0)}
    if solution.train_force_rmse is not None:
        found_metrics["train_force_rmse"] = solution.train_force_rmse
    return Fitted(
        model_files=[model_file],
        params=params,
        metrics=found_metrics,
        artifacts=[workdir / name for name in points.files],
        train_predictions=EnergyPredictions(solution.train_energies, train.n_atoms),
        state=NumpyFit(params, factors, solution, hyper, with_forces, cache),
        cache=cache,
    )


def validation_predictions(params: dict, frames, factors: solver.Factors, solution: solver.Solution, hyper: solver.Hyper,
                           with_forces: bool, cache: Cache) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies and forces of the validation frames. With forces, their kernel rows against the factors'
    sparse points are cached while they take at most a quarter of the budget and half the cache, so a
    trial that changes only GP settings predicts by two matrix products instead of a descriptor pass
    (quippy's gradients of a 256-atom Cu cell at n_max 8: 0.7 s, measured); else predicted in blocks."""
    rows_bytes = 8 * (len(frames) + 3 * sum(len(a) for a in frames)) * factors.sparse.size
    budget = min(params["memory_budget_gb"] * 1e9 / 4, params["descriptor_cache_max_gb"] * 1e9 / 2)
    if not with_forces or not params["descriptor_cache_dir"] or rows_bytes > budget:
        found_cache = cache if _gradients_fit_in_cache(params, frames) else Cache(None)
        return solver.predict(solution.model, frames, found_cache, with_forces)
    key = digest("gap-evaluation-rows", factors.key, frame_digests(frames))
    hit = cache.get("gap_evaluation_rows", key)
    if hit is not None and hit["energy_rows"].shape[1] == factors.sparse.size:  # rows of these columns (not of smaller factors of that key)
        rows = solver.EvaluationRows(hit["energy_rows"], hit.get("force_rows"))
    else:
        rows = solver.EvaluationRows.of(factors.sparse, frames, True, Cache(None))
        cache.put("gap_evaluation_rows", key, rows.arrays())
    return rows.predict(solution, hyper, frames)


def _gradients_fit_in_cache(params: dict, frames) -> bool:
    """Descriptor gradients are worth caching (a zeta change reuses them) while a set's take at most a
    quarter of the cache; beyond, recomputing beats evicting everything else (192-atom water: ~240 MB a frame)."""
    if not params["descriptor_cache_dir"]:
        return False
    gradients = gap_fit.descriptor_memory_bytes({**params, "fit_forces": True}, frames)
    return gradients <= params["descriptor_cache_max_gb"] * 1e9 / 4


def factors_key(params: dict, train, sparse: solver.SparseSet, with_forces: bool, seed: int) -> str:
    """What a training set's factors depend on: descriptors, quippy, frames, zetas, the sparse order, forces."""
    method = params["sparse_selection"]
    return digest(
        "gap-factors", [descriptor_key(d) for d in sparse.descriptors], quippy_version(), frame_digests(train.frames),
        list(sparse.zetas), method, seed, list(sparse.requested) if method == "random" else None,
        [digest_array(f) for f in train.forces] if with_forces else None,
        float(params["force_fraction"]) if with_forces else None,
    )


def force_atoms(params: dict, frames, seed: int):
    """The atoms whose forces enter the fit (``model.force_fraction`` of each frame, seeded), None for all:
    the same selection for hpo's solver, gap_fit's fits and refits (its force mask) and the factors' key."""
    return solver.force_selection(frames, float(params["force_fraction"]), seed)


def training_factors(params: dict, train, sparse: solver.SparseSet, found, with_forces: bool, seed: int, cache: Cache,
                     gradient_cache: Cache, kept=None):
    """The training set's ``solver.Factors`` for this descriptor, zeta and sparse order: from the cache when an
    entry holds at least these sparse points (FPS/CUR orders are greedy: a smaller set is its prefix), else
    built frame by frame (with a progress line on long sets) and cached. Returns (factors, reused)."""
    key = factors_key(params, train, sparse, with_forces, seed)
    needed = sparse.counts(sparse.requested)
    hit = cache.get("gap_factors", key)
    if hit is not None:
        orders = tuple(hit[f"order_{i}"] for i in range(len(sparse.descriptors)))
        if all(len(o) >= n for o, n in zip(orders, needed)) and all(np.array_equal(o[: len(mine)], mine[: len(o)]) for o, mine in zip(orders, sparse.orders)):
            stored = solver.SparseSet.of(found, dict(zip(sparse.descriptors, orders)))
            return dataclasses.replace(solver.Factors.from_arrays(stored, hit), key=key), True
    bar = progress.Bar(len(train.frames), "[hpo] kernel rows", unit="frames") if len(train.frames) * max(len(a) for a in train.frames) > LONG_FIT_ATOMS else None
    factors = solver.build_factors(sparse, train.frames, train.forces if with_forces else None, gradient_cache,
                                   progress=bar.set if bar else None, found=found, force_atoms=kept)
    if bar:
        bar.close()
    cache.put("gap_factors", key, {**factors.arrays(), **{f"order_{i}": o for i, o in enumerate(sparse.orders)}})
    return dataclasses.replace(factors, key=key), False


def numpy_memory_bytes(params: dict, frames) -> int:
    """Peak memory of a fit by hpo's streamed solver with these parameters (``solver.memory_bytes``)."""
    species = len({int(z) for atoms in frames for z in atoms.numbers})
    settings = gap_fit.descriptor_settings(params)
    return solver.memory_bytes(
        species * sum(sparse_counts(params, frames)), frames,
        [gap_fit.soap_dimensions(int(s["n_max"]), int(s["l_max"]), species) for s in settings],
        [gap_fit.neighbours_per_atom(float(s["cutoff"]), frames) + 1.0 for s in settings], bool(params["fit_forces"]),
    )


def _largest(fits: Callable[[float], bool], low: float, high: float, integer: bool = False) -> float:
    """The largest value in [low, high] for which ``fits`` holds (monotone: true below some value); ``low`` if none."""
    for _ in range(60):
        if high - low <= (1 if integer else 1e-3 * max(high, 1e-9)):
            break
        middle = (low + high) // 2 if integer else (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _over_budget(parameter: str, exc: MemoryBudgetExceeded) -> MemoryBudgetExceeded:
    """Note which model parameter drives the estimate (config errors name it)."""
    exc.parameter = parameter
    return exc


def sparse_order(descriptor: str, frames, found: Environments, params: dict, seed: int, cache: Cache):
    """``select_sparse`` of these environments, cached: FPS and CUR orderings are greedy, so a trial
    asking for fewer points than a cached ordering takes its prefix (the same points a fresh selection
    would pick) and one asking for more extends the cache. (FPS over 1600 environments costs ~2 s.)"""
    method, wanted = params["sparse_selection"], int(descriptor_value(descriptor, "n_sparse"))
    if method == "random":  # a seeded draw: cheap, and its prefixes are not draws of fewer points
        return select_sparse(found.vectors, wanted, method, seed)
    key = digest("gap-sparse-order", descriptor_key(descriptor), frame_digests(frames), method, seed)
    hit = cache.get("gap_sparse_order", key)
    if hit is not None and (len(hit["order"]) >= wanted or len(hit["order"]) == len(found.vectors)):
        return hit["order"][:wanted]
    order = select_sparse(found.vectors, wanted, method, seed)
    cache.put("gap_sparse_order", key, {"order": order})
    return order


def md_cost_ms_per_atom(model_file: Path, frames) -> float:
    """Milliseconds per atom of one MD step (energies and forces with quippy's calculator), XML parsing excluded."""
    potential = gap_fit.load(model_file)
    gap_fit.predict(potential, frames[:1])  # the first call sets up quippy's buffers
    start = time.perf_counter()
    gap_fit.predict(potential, frames)
    return (time.perf_counter() - start) * 1e3 / sum(len(atoms) for atoms in frames)


KIND = GapKind()
