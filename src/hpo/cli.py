"""``python -m hpo COMMAND [hydra overrides]``: every command reads the same composed config.

The first argument picks the command; everything after it is handed to Hydra,
so overrides, ``--multirun`` and ``--cfg job`` work as in any Hydra app.
"""

from __future__ import annotations

import difflib
import importlib
import os
import signal
import sys
import time
from typing import Callable

import hydra
from omegaconf import DictConfig

from hpo.errors import ConfigError, DataError
from hpo.paths import CONF_DIR
from hpo.redact import silence_run_urls

USAGE = """usage: python -m hpo COMMAND [key=value ...] [--multirun]

commands:
  optimize   run (or resume) the Optuna study of the config, every trial tracked in MLflow
  fit        fit the model once with the config's parameters and log it to MLflow
  promote    register a study's best trial in the MLflow model registry (alias champion)
  md         run NVE (md=nve) or NVT (md=nvt) dynamics with the champion GAP
  polarize   predict the polarizability of every frame of a trajectory with the champion SA-GPR
  pipeline   GAP study -> SA-GPR study -> promote both -> MD -> polarizability (budgets: conf/pipeline/)
  learning-curve   train/validation RMSE vs training-set size (learning_curve.sizes), CSV + PNG + slope
  sweep-param      train/validation RMSE vs one or two parameters (sweep.param, sweep.values)
  report     one self-contained HTML page for a study (study.name=...)
  spectrum   Raman spectra of a predicted polarizability trajectory (spectrum.trajectory=...)
  dashboard  optuna-dashboard on study.storage (http://127.0.0.1:8080 by default)
  data check       check the dataset's files (keys, units, NaN, duplicates, outliers, forces vs energies);
                   exit 1 on a failed check (also: data check "data.files=[a.xyz,b.xyz]")

examples:
  python -m hpo optimize dataset.train_size=100 study.n_trials=30
  python -m hpo optimize --multirun dataset.train_size=50,100
  python -m hpo fit model.default_sigma.energy=0.05
  python -m hpo optimize model=sagpr study.n_trials=30
  python -m hpo promote study.name=water-gap-50
  python -m hpo md md=nvt
  python -m hpo sweep-param sweep.param=default_sigma.energy "sweep.values=[0.001,0.01,0.1]"
  python -m hpo data check dataset=files dataset.train=train.xyz dataset.val=val.xyz
  python -m hpo optimize dataset=pool "dataset.files=[md1.xyz,md2.xyz]" dataset.units.energy=Hartree
"""


def fit(cfg: DictConfig) -> None:
    """One fit with the composed parameters, recorded as a single MLflow run."""
    from hpo import config as hpo_config
    from hpo.data import load_datasets
    from hpo.search.objective import score
    from hpo.tracking import Tracker, provenance_tags

    hpo_config.validate(cfg)
    data = load_datasets(cfg)
    hpo_config.check_data(cfg, data)
    model = hpo_config.model_params(cfg)
    workdir = hpo_config.output_path(cfg.experiments_dir) / "fit" / time.strftime("%Y%m%d-%H%M%S")
    tracker = Tracker(cfg.tracking)
    tags = {**provenance_tags(), **data.hashes, "command": "fit", "run_type": "fit"}
    with tracker.run(f"fit-{model['kind']}", tags=tags) as run_id:
        tracker.log_config(run_id, cfg)
        scored = score(cfg, model, data, workdir)
        tracker.log(run_id, params=scored.params, metrics=scored.metrics, tags=scored.tags)
        tracker.log_artifacts(run_id, scored.artifacts + scored.model_files)
    print(f"[hpo] fit in {workdir} (MLflow run {run_id})")
    for key in sorted(scored.metrics):
        print(f"  {key:<32}{scored.metrics[key]:.6g}")


def pipeline(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from hpo import pipeline as hpo_pipeline

    # the stages are composed anew (model=gap, model=sagpr) from the user's own overrides
    hpo_pipeline.run(list(HydraConfig.get().overrides.task))


# Command -> (module, function taking the composed config). Modules are imported only when their
# command runs: quippy, featomic and MLflow take seconds to import.
COMMANDS: dict[str, tuple[str, str]] = {
    "optimize": ("hpo.search.loop", "run"),
    "fit": ("hpo.cli", "fit"),
    "promote": ("hpo.registry.promote", "promote"),
    "md": ("hpo.md", "main"),
    "polarize": ("hpo.polarize", "main"),
    "pipeline": ("hpo.cli", "pipeline"),
    "learning-curve": ("hpo.analysis.learning_curve", "learning_curve"),
    "sweep-param": ("hpo.analysis.sweep", "sweep_param"),
    "report": ("hpo.analysis.report", "report"),
    "compare": ("hpo.registry.compare", "compare"),
    "spectrum": ("hpo.spectrum", "main"),
    "dashboard": ("hpo.dashboard", "dashboard"),
    "data check": ("hpo.data.check_command", "check_command"),
}
# Two-word commands: the first word and the words it may be followed by.
SUBCOMMANDS = {"data": ("check",)}


def task_of(command: str) -> Callable[[DictConfig], None]:
    module, function = COMMANDS[command]

    def task(cfg: DictConfig) -> None:
        getattr(importlib.import_module(module), function)(cfg)

    return task


def apply_threads(cfg: DictConfig) -> int:
    """This process's share of ``threads`` (divided among ``study.n_workers``) as OMP_NUM_THREADS and
    MKL_NUM_THREADS: torch (a MACE's evaluation, calculator and MD) and OpenMP libraries loaded later in the
    process read them when first loaded, as the fits' child processes are given them; returns the count."""
    share = max(1, int(cfg.threads) // max(1, int(cfg.study.get("n_workers", 1))))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(share)
    return share


def _friendly(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Known user errors become one paragraph and exit code 2, not a traceback."""

    def wrapped(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from hpo.config import check_added_keys
        from hpo.progress import quiet

        quiet(bool(cfg.get("verbose", False)))
        from hpo.md import MDBlowUp, MDUnstable
        from hpo.models.base import TrialFailure
        from hpo.polarize import PolarizeError
        from hpo.registry.resolve import PromoteError
        from hpo.search.storage import StudyError
        from hpo.spectrum import SpectrumError

        try:
            check_added_keys(cfg, list(HydraConfig.get().overrides.task))
            apply_threads(cfg)
            task(cfg)
        except (ConfigError, DataError, StudyError, PromoteError, PolarizeError, MDBlowUp, MDUnstable, SpectrumError) as exc:
            print(f"hpo: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except TrialFailure as exc:  # `hpo fit`: one fit, no study to record it in
            print(f"hpo: the fit failed ({exc.reason}): {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except (KeyboardInterrupt, RuntimeError) as exc:
            name = interrupt_signal(exc)
            if name is None:
                _raise_unless_disk_full(exc, cfg)
            print(f"hpo: {interrupted_message(name)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.Signals[name].value) from None
        except Exception as exc:
            _raise_unless_disk_full(exc, cfg)

    return wrapped


def _raise_unless_disk_full(exc: BaseException, cfg: DictConfig) -> None:
    """A full disk anywhere in a command (a study's trials handle their own) is one paragraph and exit code 2."""
    from hpo.disk import full_disk_text, no_space_left

    if not no_space_left(exc):
        raise exc
    print(f"hpo: {full_disk_text(exc, cfg.get('experiments_dir', '.'))}. Free space there (or set root= elsewhere) "
          "and run the same command again.", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def interrupt_signal(exc: BaseException) -> str | None:
    """The signal that stopped the command (SIGTERM as hpo's ``Interrupted``, Ctrl-C as KeyboardInterrupt
    or, inside quippy's Fortran, as f90wrap's RuntimeError); None for any other error."""
    from hpo.search.objective import as_interrupt

    exc = as_interrupt(exc)
    return getattr(exc, "signal_name", "SIGINT") if isinstance(exc, KeyboardInterrupt) else None


def interrupted_message(name: str) -> str:
    return (
        f"stopped by {name}. The command's MLflow runs were ended KILLED; in a study the trial that was running "
        "is recorded FAIL (reason interrupted) and the same command resumes the study where it stopped."
    )


# Config keys that were renamed, so an old command line is told the new name instead of Hydra's "not in struct".
RENAMED = {"model.force_metrics": "model.fit_forces", "dataset.force_metrics": "dataset.fit_forces",
           "model.refit_tolerance_eV": "model.refit_tolerance_eV_per_atom"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command = argv.pop(0)
    if command in SUBCOMMANDS:
        if not argv or argv[0] not in SUBCOMMANDS[command]:
            print(f"hpo: {command} needs one of: {', '.join(SUBCOMMANDS[command])} (e.g. python -m hpo {command} {SUBCOMMANDS[command][0]})", file=sys.stderr)
            raise SystemExit(2)
        command = f"{command} {argv.pop(0)}"
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]}?" if near else "."
        print(f"hpo: unknown command {command!r}{hint} Commands: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    for override in argv:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in RENAMED:
            print(f"hpo: {key} is now {RENAMED[key]} ({override!r} -> {override.replace(key, RENAMED[key], 1)!r})", file=sys.stderr)
            raise SystemExit(2)
    sys.argv = [f"hpo {command.replace(' ', '-')}", *argv]
    # MLflow's per-file download bars would flood the log of every command that loads a model
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    silence_run_urls()  # MLflow's own "View run ... at <tracking URI>" lines carry the URI's password
    task = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_friendly(task_of(command)))
    task()


if __name__ == "__main__":
    main()
