"""How soon hpo notices the end of a fit: the timings the liveness tests print but do not assert.

1. A gap_fit crash (``model.sparse_method=uniform`` aborts on descriptors of more than 30 dimensions) while
   this process computes the evaluation descriptors beside it: seconds from gap_fit's last output to the
   trial's failure (tests/unit/models/gap/test_kind.py::test_gap_fit_crash_is_noticed_at_once asserts that
   the descriptor pass is stopped by the crash).
2. ``python -m hpo optimize`` sent SIGTERM while a trial's gap_fit runs: seconds from the signal to the
   command's exit (tests/e2e/test_optimize.py::test_sigterm_mid_trial_fails_the_trial_and_ends_every_run
   asserts what it leaves behind).

The water data are found as by hpo ($HPO_DATA_DIR, else ../shared/data/water from the working directory).

    python benchmarks/bench_liveness.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState

from hpo.config import load_config, model_params, output_overrides
from hpo.data import load_datasets
from hpo.models import kind
from hpo.models.gap.gap_fit import GapFitError
from hpo.search.storage import StudyError, load_study

CRASH = ["model.solver=gap_fit", "model.sparse_method=uniform", "model.n_max=8", "model.l_max=6", "model.cutoff=5.0",
         "model.n_sparse=100", "model.descriptor_cache_dir=null"]
TINY = ["model.n_max=2", "model.l_max=2", "model.n_sparse=20", "model.cutoff=3.0", "search=gap_small",
        "study.n_trials=3", "model.solver=gap_fit", "model.fit_forces=true"]


def crash_noticed_s(root: Path) -> float:
    cfg = load_config([*output_overrides(root), *CRASH])
    workdir = root / "crash"
    try:
        kind("gap").score(cfg, model_params(cfg), load_datasets(cfg), workdir)
    except GapFitError:
        ended = time.time()
    else:
        raise SystemExit("gap_fit did not crash: the benchmark's premise is gone")
    return ended - max((workdir / name).stat().st_mtime for name in ("gap_fit.out", "gap_fit.err"))


def gap_fit_running(cfg) -> bool:
    try:
        study = load_study(cfg.study)
    except StudyError:
        return False
    return any((Path(t.user_attrs.get("workdir", "/nonexistent")) / "gap_fit.cmd").is_file()
               for t in study.get_trials(states=(TrialState.RUNNING,)))


def sigterm_exit_s(root: Path) -> float:
    overrides = [*output_overrides(root), *TINY]
    cfg = load_config(overrides)
    with open(root / "optimize.out", "w") as out, open(root / "optimize.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "hpo", "optimize", *overrides], stdout=out, stderr=err, start_new_session=True)
        while not gap_fit_running(cfg):
            if process.poll() is not None:
                raise SystemExit(f"optimize ended before a gap_fit ran: {(root / 'optimize.err').read_text()[-2000:]}")
            time.sleep(0.2)
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait()
    return time.perf_counter() - sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {' '.join(sys.argv)} on {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    crash, term = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            crash.append(crash_noticed_s(Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            term.append(sigterm_exit_s(Path(tmp)))
    print("gap_fit crash noticed after its last output (s): " + ", ".join(f"{s:.2f}" for s in crash))
    print("optimize exit after SIGTERM mid-trial (s):       " + ", ".join(f"{s:.1f}" for s in term))


if __name__ == "__main__":
    main()
