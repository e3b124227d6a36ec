"""Tests of hpo.models.gap.kind: its checks and preflight (time bound), both solvers fitting the same targets,
a gap_fit crash noticed while the evaluation descriptors are computed."""

from __future__ import annotations

import time

import pytest

from hpo.config import ConfigError, model_params
from hpo.data import load_datasets
from hpo.search.objective import score
from hpo.models import kind

from helpers import GAP_PARAMS, tiny_params, require_shared_water


def test_kernel_rows_over_the_time_bound_are_refused_naming_n_sparse():
    """The streamed solver's kernel rows are estimated before a fit (this machine's matrix-product rate): with
    fit_timeout_s between the descriptors' estimate and descriptors + kernel rows, preflight refuses the fit and
    names the largest n_sparse that fits; with room for both, it passes."""
    from ase.build import bulk

    from hpo.models.base import TimeBudgetExceeded
    from hpo.models.gap import kind as gap_kind

    frames = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))] * 400
    params = {**tiny_params(n_max=6, l_max=4, cutoff=4.5, atom_sigma=0.5, n_sparse=1000), "fit_forces": True, "descriptors": [],
              "solver": "numpy", "memory_budget_gb": 1000, "fit_timeout_s": 1.0}
    descriptors, kernels = gap_kind.descriptor_pass_seconds(params, frames), gap_kind.kernel_rows_seconds(params, frames)
    with pytest.raises(TimeBudgetExceeded) as refused:
        gap_kind.KIND.preflight({**params, "fit_timeout_s": descriptors + kernels / 2}, frames)
    assert refused.value.parameter == "n_sparse" and "at most n_sparse=" in str(refused.value)
    assert 0 < int(str(refused.value).rsplit("at most n_sparse=", 1)[1].split()[0]) < 1000
    gap_kind.KIND.preflight({**params, "fit_timeout_s": 2 * (descriptors + kernels)}, frames)


@pytest.mark.slow
def test_gap_fit_crash_is_noticed_at_once(tiny_cfg, tmp_path, monkeypatch):
    """gap_fit aborts (sparse_method=uniform refuses descriptors of more than 30 dimensions) while this
    process computes the evaluation descriptors beside it: the descriptor pass stops at the crash instead of
    running to its end, and the trial fails with gap_fit's last lines (how soon is printed, not asserted:
    timings belong to benchmarks)."""
    from hpo.config import model_params
    from hpo.data import load_datasets
    from hpo.models import kind
    from hpo.models.gap.gap_fit import GapFitError
    from hpo.search.scoring import fit_and_score

    cfg = tiny_cfg(
        f"dataset.data_dir={require_shared_water()}",
        "model.solver=gap_fit", "model.sparse_method=uniform", "model.n_max=8", "model.l_max=6", "model.cutoff=5.0", "model.n_sparse=100",
        "model.descriptor_cache_dir=null",
    )
    from hpo.models.gap import kind as gap_kind

    data = load_datasets(cfg)
    workdir = tmp_path / "crash"
    passes = []  # per descriptor and set: did the pass beside gap_fit run to its end (False: stopped)

    def recorded(*args, **kwargs):
        found = environments(*args, **kwargs)
        if kwargs.get("should_stop") is not None:
            passes.append(found is not None)
        return found

    environments = gap_kind.environments
    monkeypatch.setattr(gap_kind, "environments", recorded)
    started = time.perf_counter()
    with pytest.raises(GapFitError) as raised:
        fit_and_score(cfg, kind("gap"), model_params(cfg), data, workdir)
    ended = time.time()
    total_s = time.perf_counter() - started
    gap_fit_ended = max((workdir / name).stat().st_mtime for name in ("gap_fit.out", "gap_fit.err"))
    noticed_s = ended - gap_fit_ended
    assert raised.value.reason == "gap_fit_error"
    assert "Descriptor is too large" in str(raised.value) or "SYSTEM ABORT" in str(raised.value)
    assert "last lines of gap_fit output" in str(raised.value)
    assert passes and passes[-1] is False, passes  # the crash stopped the pass: it did not wait for every frame
    print(f"gap_fit crash: trial failed {noticed_s:.2f} s after gap_fit's last output, {total_s:.1f} s in all")


@pytest.mark.slow
def test_both_solvers_fit_the_same_targets(tiny_cfg, tmp_path):
    """model.fit_forces decides whether forces enter the fit, for both solvers: with every environment a
    sparse point (n_sparse above the count, so the selection method cannot differ) the two fit the same model
    with and without forces (before, gap_fit fitted the force column whatever the setting)."""
    for forces in ("false", "true"):
        runs = {}
        for solver in ("numpy", "gap_fit"):
            cfg = tiny_cfg(f"model.solver={solver}", f"model.fit_forces={forces}", "model.n_sparse=10000", "model.cost_frames=2")
            runs[solver] = score(cfg, model_params(cfg), load_datasets(cfg), tmp_path / f"{solver}-{forces}")
        for key in ("train_energy_rmse", "val_energy_rmse"):
            assert runs["numpy"].metrics[key] == pytest.approx(runs["gap_fit"].metrics[key], abs=1e-6)
        command = (tmp_path / f"gap_fit-{forces}" / "gap_fit.cmd").read_text()
        assert ("force_parameter_name=hpo_no_force_targets" in command) == (forces == "false")
        if forces == "true":
            assert runs["numpy"].metrics["val_force_rmse"] == pytest.approx(runs["gap_fit"].metrics["val_force_rmse"], abs=1e-5)
            assert runs["numpy"].metrics["train_force_rmse"] == pytest.approx(runs["gap_fit"].metrics["train_force_rmse"], abs=1e-5)
        else:
            assert "val_force_rmse" not in runs["numpy"].metrics and "val_force_rmse" not in runs["gap_fit"].metrics
        assert runs["gap_fit"].metrics["md_ms_per_atom"] > 0


def test_gap_kind_refuses_impossible_combinations():
    with pytest.raises(ConfigError, match="atom_sigma=6.0 is not allowed: smaller than the cutoff"):
        kind("gap").check({**GAP_PARAMS, "atom_sigma": 6.0})
    with pytest.raises(ConfigError, match="model.kind='krr' is not allowed"):
        kind("krr")
