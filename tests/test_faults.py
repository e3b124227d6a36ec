"""Issue 15, the fault suite: every bad input is refused before any fit, in one paragraph, and leaves
nothing behind (no Optuna study, no MLflow run, no trial directory); passwords never leave the config.

Most cases call ``hpo.search.loop.run`` (what ``python -m hpo optimize`` runs) and fail in well under a
second; a few go through the command line to check exit code 2 and a clean stderr.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from optuna.trial import TrialState

from hpo.config import ConfigError, load_config, model_params, output_overrides
from hpo.data import DataError, read_frames
from hpo.search import loop
from hpo.search.storage import StudyError, load_study, make_storage

from helpers import runs_of

PLANTED = "PLANTED-s3cr3t"


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny data set, free to be damaged."""
    target = tmp_path / "data"
    shutil.copytree(tiny_data, target)
    return target


def rewrite(path: Path, change) -> None:
    frames = ase.io.read(path, ":")
    change(frames)
    ase.io.write(path, frames, format="extxyz")


def set_position(frame, atom, axis, value):
    def change(frames):
        frames[frame].positions[atom, axis] = value

    return change


def set_energy(frame, value):
    def change(frames):
        frames[frame].calc.results["energy"] = value

    return change


def set_force(frame, atom, axis, value):
    def change(frames):
        frames[frame].arrays["force"][atom, axis] = value

    return change


def drop_energy(frame):
    def change(frames):
        del frames[frame].calc.results["energy"]

    return change


def set_cell(frame, value):
    def change(frames):
        cell = frames[frame].cell.array.copy()
        cell[2, 2] = value
        frames[frame].set_cell(cell)

    return change


def carbon_in(frame):
    def change(frames):
        frames[frame].numbers[0] = 6

    return change


def text_edit(edit):
    def apply(path: Path):
        path.write_text(edit(path.read_text()))

    return apply


def narrow_forces(text: str) -> str:
    """Frame 0's force column declared and written with 2 components: a well-formed file, a wrong shape."""
    lines = text.splitlines()
    n = int(lines[0])
    lines[1] = lines[1].replace("force:R:3", "force:R:2", 1)
    lines[2 : 2 + n] = [" ".join(line.split()[:-1]) for line in lines[2 : 2 + n]]
    return "\n".join(lines) + "\n"


def duplicate_training_frame(data: Path) -> None:
    train = ase.io.read(data / "gap_input_50.xyz", ":")
    validation = ase.io.read(data / "gap_validate.xyz", ":")
    ase.io.write(data / "gap_validate.xyz", validation + [train[2]], format="extxyz")


TRAIN, VAL = "gap_input_50.xyz", "gap_validate.xyz"

# (id, file damage: (file name, change of its frames | change of the file) or None, overrides, error, message)
DATA_FAULTS = [
    ("nan-position", (VAL, set_position(1, 2, 0, np.nan)), [], DataError,
     "gap_validate.xyz, frame 1: non-finite positions (atom 2): nan; every value must be a finite number"),
    ("nan-energy", (TRAIN, set_energy(3, np.nan)), [], DataError,
     "gap_input_50.xyz, frame 3: non-finite energy: nan"),
    ("inf-force", (TRAIN, set_force(0, 5, 1, np.inf)), [], DataError,
     "gap_input_50.xyz, frame 0: non-finite forces (atom 5): inf"),
    ("nan-cell", (TRAIN, set_cell(4, np.nan)), [], DataError,
     "gap_input_50.xyz, frame 4: non-finite cell: nan"),
    ("missing-energy", (TRAIN, drop_energy(1)), [], DataError,
     "gap_input_50.xyz, frame 1: energy key 'energy' is missing (dataset.property_keys.energy)"),
    ("wrong-energy-key", None, ["dataset.property_keys.energy=free_energy"], DataError,
     "gap_input_50.xyz, frame 0: energy key 'free_energy' is missing"),
    ("wrong-force-shape", (TRAIN, text_edit(narrow_forces)), [], DataError,
     r"gap_input_50.xyz, frame 0: force column 'force' has shape (12, 2), expected (12, 3)"),
    ("species-not-in-training", (VAL, carbon_in(0)), ["+dataset.e0.C=-1027.0"], DataError,
     "gap_validate.xyz, frame 0: species ['C'] of the validation set are not in the training set "
     "(gap_input_50.xyz has ['H', 'O'])"),
    ("species-without-e0", (VAL, carbon_in(0)), [], DataError,
     "gap_validate.xyz, frame 0: species ['C'] have no e0 in the dataset config (dataset.e0)"),
    ("train-frame-in-validation", "duplicate", [], DataError,
     "1 frame(s) of the training set (gap_input_50.xyz) are also in the validation set (gap_validate.xyz); "
     "frame indices training<->validation: 2<->6. Splits must be disjoint."),
    ("empty-file", (VAL, text_edit(lambda text: "")), [], DataError, "gap_validate.xyz holds no frames"),
    ("malformed-extxyz", (VAL, text_edit(lambda text: "12\nnot an extxyz comment\nO 0 0\n")), [], DataError,
     "gap_validate.xyz is not a readable extended XYZ file"),
    ("binary-file", (TRAIN, "binary"), [], DataError,
     "gap_input_50.xyz is not a readable extended XYZ file: 'utf-8' codec can't decode"),
    ("missing-file", (VAL, "delete"), [], DataError, "lacks gap_validate.xyz"),
]

CONFIG_FAULTS = [
    ("missing-data-dir", ["dataset.data_dir=/nonexistent/water"], DataError,
     "dataset.data_dir='/nonexistent/water' is not a directory"),
    ("delta-negative", ["model.delta=-1"], ConfigError, "model.delta=-1 is not allowed: a positive number"),
    ("zeta-zero", ["model.zeta=0"], ConfigError, "model.zeta=0 is not allowed: an integer >= 1"),
    ("atom-sigma-over-cutoff", ["model.atom_sigma=3.5"], ConfigError,
     "model.atom_sigma=3.5 is not allowed: smaller than the cutoff (3.0)"),
    ("sagpr-l-max-0", ["model=sagpr", "search=sagpr_small", "model.l_max=0"], ConfigError,
     "model.l_max=0 is not allowed: an integer >= 1"),
    ("unknown-sampler", ["study.sampler=annealing"], ConfigError,
     "study.sampler='annealing' is not allowed: one of ('tpe', 'random', 'grid')"),
    ("search-bounds-reversed", ["search.space.cutoff.low=7.0"], ConfigError,
     "search.space.cutoff.low=7.0 is not allowed: low <= high (high=4.0)"),
    ("search-bound-not-a-number", ["search.space.n_sparse.high=many"], ConfigError,
     "search.space.n_sparse.high='many' is not allowed: a number"),
    ("search-bound-outside-model-range", ["search.space.n_max.low=0"], ConfigError,
     "search.space.n_max.low=0 is not allowed: a value model.n_max may take: an integer >= 1"),
    ("n-trials-0", ["study.n_trials=0"], ConfigError, "study.n_trials=0 is not allowed: an integer >= 1"),
    ("storage-dir-missing", ["study.storage=sqlite:////nonexistent/dir/optuna.db"], ConfigError,
     "study.storage='sqlite:////nonexistent/dir/optuna.db' is not allowed: a database in an existing directory"),
    ("cutoff-too-large-for-memory", ["model.solver=gap_fit", "model.fit_forces=true", "model.cutoff=100.0"], ConfigError,
     "model.cutoff=100.0 is not allowed for this data: cutoff=100.0 Å: about 3.92e+05 neighbours per atom"),
    ("descriptor-pass-over-time", ["model.cutoff=60.0"], ConfigError,  # energies only: no memory bound, 5e4 neighbours
     "model.cutoff=60.0 is not allowed for this data: cutoff=60.0 Å: the descriptors of the 10 training frames would take about"),
    ("search-space-over-memory", ["model.solver=gap_fit", "model.fit_forces=true", "search.space.cutoff.low=30.0", "search.space.cutoff.high=40.0", "model.memory_budget_gb=1"], ConfigError,
     "search.space.cutoff.low=30.0 is not allowed for this data: even the cheapest point of the search space is over budget: "
     "cutoff=30.0 Å: about 1.06e+04 neighbours per atom"),
]


# Should a fault slip through, the test fails after one short fit instead of running a study.
SAFETY = ["study.n_trials=1", "model.fit_timeout_s=60"]


def with_safety(overrides: list[str]) -> list[str]:
    keys = {o.split("=", 1)[0] for o in overrides}
    sagpr = "model=sagpr" in overrides
    return [o for o in SAFETY if o.split("=", 1)[0] not in keys and not (sagpr and "fit_timeout" in o)] + list(overrides)


def assert_nothing_left(root: Path) -> None:
    """No study database, no MLflow store, no trial directory under the test's output tree."""
    assert not (root / "experiments").exists(), sorted(p.name for p in (root / "experiments").rglob("*"))
    assert not (root / "mlruns").exists()


def damage(data: Path, spec) -> None:
    if spec is None:
        return
    if spec == "duplicate":
        duplicate_training_frame(data)
        return
    name, change = spec
    path = data / name
    if change == "delete":
        path.unlink()
    elif change == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif change.__name__ == "apply":
        change(path)
    else:
        rewrite(path, change)


@pytest.mark.parametrize("case, spec, overrides, error, message", DATA_FAULTS, ids=[c[0] for c in DATA_FAULTS])
def test_bad_data_is_refused_before_any_fit(tiny_cfg, data_copy, tmp_path, case, spec, overrides, error, message):
    damage(data_copy, spec)
    cfg = tiny_cfg(*with_safety([f"dataset.data_dir={data_copy}", *overrides]))
    with pytest.raises(error) as raised:
        loop.run(cfg)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)  # one paragraph
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("case, overrides, error, message", CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_bad_config_is_refused_before_any_fit(tiny_cfg, tiny_data, tmp_path, case, overrides, error, message):
    if "model=sagpr" in overrides:  # the tiny GAP overrides do not apply
        cfg = load_config([f"dataset.data_dir={tiny_data}", *output_overrides(tmp_path), *with_safety(overrides)])
    else:
        cfg = tiny_cfg(*with_safety(overrides))
    with pytest.raises(error) as raised:
        loop.run(cfg)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert_nothing_left(tmp_path)


def test_unreadable_file(tmp_path):
    """A path that exists but cannot be read as a file (root reads any mode, so a directory stands in)."""
    (tmp_path / "gap_validate.xyz").mkdir()
    keys = load_config().dataset.property_keys
    with pytest.raises(DataError, match=r"data file .*gap_validate.xyz is not a readable file"):
        read_frames(tmp_path / "gap_validate.xyz", keys)


def test_cutoff_bound_is_sane_for_the_real_data(tiny_data):
    """The bound refuses the cutoff that killed gap_fit (100 Å: "Error allocating 58318997256 bytes") and
    lets the search space of conf/search/gap.yaml through on the largest training set."""
    from hpo.models.gap import gap_fit

    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    defaults = {"n_max": 4, "l_max": 6, "fit_forces": True}  # gap_fit fitting forces: gradients kept
    assert gap_fit.descriptor_memory_bytes({**defaults, "cutoff": 100.0}, frames) > 58318997256
    assert 15 < gap_fit.largest_cutoff({**defaults, "cutoff": 5.0}, frames, 16e9) < 40
    frames_400 = frames * 40  # the density and atoms of 400 water frames
    assert gap_fit.descriptor_memory_bytes({**defaults, "n_max": 8, "l_max": 8, "cutoff": 6.0}, frames_400) < 16e9


def test_numpy_solver_without_forces_has_no_gradient_bound(tiny_data):
    """hpo's numpy solver keeps no descriptor gradients unless force metrics are asked for."""
    from hpo.models.gap import gap_fit

    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    numpy_energy = {"n_max": 4, "l_max": 6, "cutoff": 100.0, "solver": "numpy", "fit_forces": False}
    assert gap_fit.descriptor_memory_bytes(numpy_energy, frames) < 1e7
    assert gap_fit.descriptor_memory_bytes({**numpy_energy, "fit_forces": True}, frames) > 1e10


def test_descriptor_estimate_matches_gap_fit(tiny_data, tmp_path):
    """The estimate is within 1.5x (above) of the descriptor arrays gap_fit lists for a real fit."""
    import re

    from hpo.models.gap import gap_fit

    cfg = load_config([f"dataset.data_dir={tiny_data}", "model.solver=gap_fit", "model.fit_forces=true", "model.n_max=2", "model.l_max=2", "model.n_sparse=20", "model.cutoff=3.0"])
    params = model_params(cfg)
    fitted = gap_fit.GAP(params, dict(cfg.dataset.e0), cfg.dataset.property_keys).fit(tiny_data / "gap_input_50.xyz", tmp_path)
    printed = (tmp_path / "gap_fit.out").read_text()
    arrays = re.findall(r"^Descriptor \d+ :: x(?:Prime)? +(\d+) +(\d+) +memory", printed, re.M)
    assert len(arrays) == 4
    actual = sum(8 * int(rows) * int(cols) for rows, cols in arrays)
    frames = ase.io.read(tiny_data / "gap_input_50.xyz", ":")
    estimate = gap_fit.descriptor_memory_bytes(params, frames)
    assert actual <= estimate <= 1.5 * actual
    assert fitted.model_file_.is_file()


def hpo_command(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("fit", ["model=sagpr", "model.l_max=0"], "hpo: model.l_max=0 is not allowed: an integer >= 1"),
        ("optimize", ["model.solver=gap_fit", "model.fit_forces=true", "model.cutoff=100.0"], "hpo: model.cutoff=100.0 is not allowed for this data"),
        ("optimize", ["study.storage=sqlite:////nonexistent/dir/optuna.db"], "is not allowed: a database in an existing directory"),
        ("fit", ["model.force_metrics=true"], "hpo: model.force_metrics is now model.fit_forces"),
    ],
    ids=["fit-sagpr-l_max-0", "optimize-cutoff-100", "optimize-storage-dir-missing", "fit-renamed-key"],
)
def test_cli_exits_2_before_any_fit(tiny_overrides, tiny_data, tmp_path, command, extra, message):
    base = [f"dataset.data_dir={tiny_data}", *output_overrides(tmp_path)] if "model=sagpr" in extra else tiny_overrides
    done = hpo_command(command, *base, *extra, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_left(tmp_path)


def test_cli_bad_data_exits_2(tiny_overrides, data_copy, tmp_path):
    rewrite(data_copy / VAL, set_position(1, 2, 0, np.nan))
    done = hpo_command("optimize", *tiny_overrides, f"dataset.data_dir={data_copy}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "hpo: gap_validate.xyz, frame 1: non-finite positions (atom 2): nan; every value must be a finite number"
    assert_nothing_left(tmp_path)


# --- secrets -----------------------------------------------------------------------------------------


def test_password_in_storage_url_never_printed(tiny_overrides, tmp_path):
    url = f"postgresql://alice:{PLANTED}@127.0.0.1:1/db"
    done = hpo_command("optimize", *tiny_overrides, f"study.storage={url}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "study.storage='postgresql://alice:***@127.0.0.1:1/db' cannot be opened" in done.stderr
    assert "Traceback" not in done.stderr
    assert PLANTED not in done.stdout + done.stderr
    assert not (tmp_path / "mlruns").exists()


def test_password_in_tracking_uri_never_printed(tiny_overrides, tmp_path, monkeypatch):
    url = f"postgresql://alice:{PLANTED}@127.0.0.1:1/db"
    # one connection attempt, not MLflow's minutes of retries: the timeout would end a retrying run
    done = hpo_command("optimize", *tiny_overrides, f"tracking.tracking_uri={url}", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tracking.tracking_uri='postgresql://alice:***@127.0.0.1:1/db' cannot be opened" in done.stderr
    assert PLANTED not in done.stdout + done.stderr
    assert_nothing_left(tmp_path)  # the study was not created either


def test_missing_driver_names_what_to_install():
    with pytest.raises(StudyError) as raised:
        make_storage(f"postgresql+pg8000://alice:{PLANTED}@127.0.0.1:1/db", 30, 90)
    message = str(raised.value)
    assert "needs a database driver that is not installed (pg8000): pip install pg8000" in message
    assert "pip install 'hpo[postgres]'" in message
    assert PLANTED not in message and "alice:***@" in message


@pytest.mark.parametrize("url", ["postgresql://alice@127.0.0.1:1/db", "postgresql+psycopg2://alice@127.0.0.1:1/db"])
def test_missing_postgres_driver_asks_for_the_extra(monkeypatch, url):
    """Neither psycopg (plain postgresql:// on SQLAlchemy 2.1) nor psycopg2 importable."""
    import builtins

    real_import = builtins.__import__
    hidden = ("psycopg", "psycopg2", "psycopg_binary")

    def without_drivers(name, *args, **kwargs):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_drivers)
    for module in [m for m in sys.modules if m.split(".")[0] in hidden]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(StudyError, match=r"not installed \(psycopg2?\): pip install 'hpo\[postgres\]'"):
        make_storage(url, 30, 90)


def test_planted_password_found_nowhere_after_a_study(tiny_overrides, tmp_path):
    """A URL with a password in a config value hpo logs (the download URL, unused: the data are local)
    appears in no output, no database byte and no artifact; the config.yaml artifact shows it redacted."""
    done = hpo_command(
        "optimize", *tiny_overrides, "study.n_trials=1", f"dataset.download_url='https://alice:{PLANTED}@example.invalid/{{file}}'",
        cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert PLANTED not in done.stdout + done.stderr
    assert "View run" not in done.stdout
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "optuna.db" for p in files)
    leaks = [str(p) for p in files if PLANTED.encode() in p.read_bytes()]
    assert not leaks
    configs = [p for p in files if p.name == "config.yaml"]
    assert configs and "https://alice:***@example.invalid/{file}" in configs[0].read_text()


def test_mlflow_run_urls_silenced(monkeypatch):
    """MLflow prints "View run ... at: <tracking URI>" (credentials included) when a server run ends;
    hpo sets MLflow's switch that turns it off."""
    from hpo.redact import silence_run_urls
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    silence_run_urls()
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True


# The model's cutoff (3 Å) and the space's low end fit in 1.3 MB; almost every sampled cutoff does not.
OVER_BUDGET_SPACE = ["model.solver=gap_fit", "model.fit_forces=true", "study.enqueue_default=false", "~search.space", "+search.space={cutoff:{type:float,low:3.0,high:30.0}}",
                     "model.memory_budget_gb=0.0013"]


def test_nothing_running_after_a_refused_study(tiny_cfg, tmp_path):
    """A study refused after the stores exist (every trial over the memory budget) leaves no run RUNNING."""
    cfg = tiny_cfg(*OVER_BUDGET_SPACE, "study.n_trials=1", "study.max_refused_trials=2")
    with pytest.raises(StudyError, match="2 trials were refused before any fit"):
        loop.run(cfg)
    parents, children = runs_of(cfg)
    assert len(parents) == 1 and len(children) == 2
    assert not [r for r in parents + children if r.info.status == "RUNNING"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MB tmpfs made by the test (root may mount; CI runs as root), unmounted afterwards."""
    mount = tmp_path / "scratch"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_the_study_cleanly_and_it_resumes(tiny_cfg, tiny_overrides, small_filesystem, tmp_path):
    """experiments/ (trials, caches and the study's SQLite database) on a 16 MB file system filled to its last
    64 kB: the command stops with one paragraph "no space left on ..." and exit code 2, no traceback; the
    database passes SQLite's integrity check and no MLflow run is left RUNNING; with space again the same
    command closes the trial the full disk left open (its process is gone) and finishes the study."""
    import sqlite3

    from helpers import assert_intact

    where = f"experiments_dir={small_filesystem}"
    loop.run(tiny_cfg("study.n_trials=1", where))  # the database and one finished trial exist
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_filesystem).free - 64_000))
    command = [sys.executable, "-m", "hpo", "optimize", *tiny_overrides, where, "study.n_trials=2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "hpo: " in done.stderr and "no space left on the file system of" in done.stderr
    assert "Traceback" not in done.stderr.split("hpo: ")[-1]
    with sqlite3.connect(small_filesystem / "optuna.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cfg = tiny_cfg("study.n_trials=2", where)
    parents, children = runs_of(cfg)
    assert all(run.info.status != "RUNNING" for run in parents + children)
    before = len(load_study(cfg.study).trials)
    filler.unlink()
    loop.run(cfg)
    study = assert_intact(cfg, 2)
    assert len(study.trials) == 3  # the trial the full disk stopped is kept, FAIL
    print(f"full disk: {done.stderr.split('hpo: ')[-1].strip()} | trials before {before}, after {len(study.trials)} "
          f"({len(study.get_trials(states=(TrialState.COMPLETE,)))} complete); runs RUNNING afterwards: 0")
