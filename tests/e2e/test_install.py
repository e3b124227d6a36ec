"""hpo as a chemist gets it: ``pip install <checkout>`` (not editable) into a new virtual environment, then
``hpo data check`` and a 2-trial study from an empty folder. Every output lies under that folder (or under
HPO_ROOT when it is set), and nothing is written into the source tree or the installed package.

The install is hpo's own files (the dependencies are the test environment's, seen through a .pth line; .ci/run's
own install resolves them from pyproject.toml); it runs in CI like every other test."""

from __future__ import annotations

from types import SimpleNamespace
import os
import shutil
from site import getsitepackages
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import ase
import ase.io
import optuna
import pytest

from helpers import TINY_GAP

# slow (pyproject.toml markers): runs an hpo command end to end (a subprocess, or a whole study, promotion or pipeline)
pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[2]
# What a run of the test suite itself writes into the checkout (its venv, caches of the interpreter and
# of pytest), and the git-ignored output placeholders of a developer's own runs.
NOT_SOURCE = {".venv", ".git", "__pycache__", ".pytest_cache", "build", "experiments", "mlruns"}
# The user's own config folder (--config-dir): a search space of two parameters the package does not ship,
# and a study config that extends the shipped one (the README's pattern) with a budget of 2 trials.
USER_SEARCH = """space:
  n_sparse: {type: int, low: 10, high: 20}
  default_sigma.energy: {type: float, low: 0.001, high: 0.1, log: true}
"""
USER_STUDY = """defaults:
  - default
  - _self_
n_trials: 2
"""


def files_under(root: Path, skip: set[str] = frozenset()) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (relative path -> size, mtime), leaving out directories named in ``skip``."""
    found = {}
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip and not d.endswith(".egg-info")]
        for name in names:
            path = Path(directory) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def run(command: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_installed_hpo_writes_only_under_its_root(tiny_data, tmp_path):
    # a copy of the tracked sources: pip builds in the source folder (build/, *.egg-info), and the checkout
    # must not change at all
    source = tmp_path / "source"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE, "*.egg-info"))
    venv = tmp_path / "venv"
    start = time.perf_counter()
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=dict(os.environ), timeout=300)
    # hpo's own files only (--no-deps), its dependencies seen through a .pth line to this interpreter's: resolving
    # and installing them from pyproject.toml is what .ci/run's own install does on every run (about 50 s more here)
    new_site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        cwd=tmp_path, env=dict(os.environ), timeout=120).stdout.strip())
    (new_site / "test_dependencies.pth").write_text("\n".join(getsitepackages()) + "\n")
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", source], cwd=tmp_path,
        env=dict(os.environ), timeout=1800)
    install_s = time.perf_counter() - start
    site = Path(run([venv / "bin" / "python", "-c", "import hpo, pathlib; print(pathlib.Path(hpo.__file__).parent)"],
                    cwd=tmp_path, env=dict(os.environ), timeout=120).stdout.strip())
    assert site.is_relative_to(venv) and (site / "conf" / "config.yaml").is_file(), f"hpo imported from {site}, not the new venv's copy with its conf/"

    user_conf = tmp_path / "my_conf"
    (user_conf / "search").mkdir(parents=True)
    (user_conf / "search" / "mine.yaml").write_text(USER_SEARCH)
    (user_conf / "study").mkdir()
    (user_conf / "study" / "two.yaml").write_text(USER_STUDY)
    watched = {"checkout": (CHECKOUT, NOT_SOURCE), "source copy": (source, set()), "installed venv": (venv, set()), "user config": (user_conf, set())}
    before = {name: files_under(root, skip) for name, (root, skip) in watched.items()}

    work = tmp_path / "work"  # the empty folder a chemist runs hpo in
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HPO_ROOT", "HPO_DATA_DIR", "PYTHONPATH")}
    data = f"dataset.data_dir={tiny_data}"
    start = time.perf_counter()
    run([venv / "bin" / "hpo", "data", "check", data], cwd=work, env=env, timeout=600)
    tiny = [o for o in TINY_GAP if not o.startswith("search=")]
    study_run = run([venv / "bin" / "python", "-m", "hpo", "optimize", "--config-dir", user_conf, data, *tiny,
                     "search=mine", "study=two"], cwd=work, env=env, timeout=900)
    commands_s = time.perf_counter() - start

    # HPO_ROOT sends everything elsewhere: the working directory stays empty
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    elsewhere.mkdir()
    run([venv / "bin" / "hpo", "data", "check", data], cwd=elsewhere, env=dict(env, HPO_ROOT=str(root)), timeout=600)

    written = sorted(files_under(work))
    print(f"\n[install] pip install (non-editable) into a new venv: {install_s:.0f} s; data check + 2-trial study: {commands_s:.0f} s")
    print(f"[install] {len(written)} files written under the empty folder:\n  " + "\n  ".join(
        f for f in written if "/artifacts/" not in f and "gap_descriptor_cache/" not in f))
    print(f"  (+ {sum('/artifacts/' in f for f in written)} MLflow artifact files, {sum('gap_descriptor_cache/' in f for f in written)} descriptor cache files)")

    for name, (where, skip) in watched.items():
        after = files_under(where, skip)
        changed = sorted(k for k in after.keys() | before[name].keys() if after.get(k) != before[name].get(k))
        assert not changed, f"hpo wrote into the {name} ({where}): {changed[:10]}"
    assert os.listdir(elsewhere) == [], f"with HPO_ROOT set, hpo wrote into the working directory: {os.listdir(elsewhere)}"
    for folder in (work, root):
        assert (folder / "mlruns" / "mlflow.db").is_file(), f"no MLflow store under {folder}"
        assert list((folder / "experiments" / "data_check").glob("*.png")), f"no data-check plot under {folder}"
        assert {p.name for p in folder.iterdir()} == {"experiments", "mlruns"}, sorted(p.name for p in folder.iterdir())
    assert (work / "experiments" / "optuna.db").is_file()
    assert (work / "experiments" / "water-gap-50" / "trial_0001").is_dir() and list((work / "mlruns" / "artifacts").rglob("*.csv"))
    assert "study 'water-gap-50'" in study_run.stdout, study_run.stdout[-2000:]

    # the study ran in that folder, with the user's search space and budget from --config-dir
    study = optuna.load_study(study_name="water-gap-50", storage=f"sqlite:///{work / 'experiments' / 'optuna.db'}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2 and all(set(t.params) == {"n_sparse", "default_sigma.energy"} for t in finished), [t.params for t in finished]
    with sqlite3.connect(work / "mlruns" / "mlflow.db") as db:
        locations = [row[0] for row in db.execute("select artifact_location from experiments where name != 'Default'")]
    assert locations and all(loc == (work / "mlruns" / "artifacts").as_uri() or loc.startswith((work / "mlruns").as_uri()) for loc in locations), locations


def test_outputs_follow_root_and_typed_paths_the_working_directory(tmp_path, monkeypatch):
    """In-process, the same rules: outputs under root (the working directory, HPO_ROOT or root=), as absolute
    paths and URLs; a relative data path is read from the working directory; the workshop data fallback is
    looked up relative to the working directory as well."""
    from hpo.config import load_config
    from hpo.data import DataError, read_file
    from hpo.data import find_data_dir
    from hpo.paths import SOURCE_CHECKOUT

    monkeypatch.delenv("HPO_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config([])
    assert cfg.experiments_dir == str(tmp_path / "experiments")
    assert cfg.study.storage == f"sqlite:///{tmp_path}/experiments/optuna.db"
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert cfg.tracking.artifact_location == str(tmp_path / "mlruns" / "artifacts")
    assert cfg.model.descriptor_cache_dir == str(tmp_path / "experiments" / "gap_descriptor_cache")
    assert load_config(["root=runs"]).tracking.tracking_uri == f"sqlite:///{tmp_path}/runs/mlruns/mlflow.db"
    monkeypatch.setenv("HPO_ROOT", str(tmp_path / "elsewhere"))
    assert load_config([]).study.storage == f"sqlite:///{tmp_path}/elsewhere/experiments/optuna.db"

    (tmp_path / "mine").mkdir()
    ase.io.write(tmp_path / "mine" / "train.xyz", [ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])] * 3, format="extxyz")
    assert len(read_file("mine/train.xyz")) == 3  # dataset.train=mine/train.xyz, typed in tmp_path
    monkeypatch.chdir(tmp_path / "mine")
    with pytest.raises(DataError, match=f"{tmp_path}/mine/mine/train.xyz does not exist"):
        read_file("mine/train.xyz")
    assert SOURCE_CHECKOUT == CHECKOUT  # the test suite runs from an editable install of this checkout
    # the workshop data fallback is relative to the working directory too, never to where hpo is installed
    (tmp_path / "shared" / "data" / "water").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "mine")
    monkeypatch.delenv("HPO_DATA_DIR", raising=False)
    for name in ("a.xyz", "b.xyz"):
        (tmp_path / "shared" / "data" / "water" / name).write_text("")
    dataset = SimpleNamespace(data_dir=None, fallback_dirs=["../shared/data/water"])
    assert find_data_dir(dataset, ["a.xyz", "b.xyz"]) == tmp_path / "mine" / ".." / "shared" / "data" / "water"
