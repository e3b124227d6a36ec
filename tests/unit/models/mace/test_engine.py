"""hpo.models.mace.engine with the real mace-torch: a tiny MACE trained for a few epochs on EMT Cu frames.

EMT forces are the exact negative gradient of the EMT energy, so the data are consistent; the checks are on the
engine (units, signs, epochs, stopping, seeds), not on how well 3 epochs learn. Each training takes 5-8 s on one
core, 4-5 s of it the child process importing torch and mace-torch (an epoch of these frames takes about 0.2 s), so
epochs are cheap and trainings are not: one model (``trained``) serves every test that only loads, predicts or
builds a calculator, and a test has a training of its own only when training is what it checks. Those that end
with a model (label keys, stage two, seeds) are trained together in ``fits``, two at a time (each child on one
thread of the 2 cores; the caller only polls); the ones about stopping and failing (on_epoch raising, a failing
run_train, a killed caller) run in their tests, which look for leftover processes.
Needs mace-torch: the ``mace`` extra, which the ``test`` extra installs (a missing install fails, never skips).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

import mace  # noqa: F401  (fails here, not in a child process, when the extra is missing)

from emt_data import emt_splits, make_isolated_atoms

from hpo import metrics
from hpo.models.base import ConfigError
from hpo.models.mace import engine, parameters
from hpo.paths import CONF_DIR

# each test trains a network; predictions and the calculator in this process on one thread (conftest)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CONF = CONF_DIR  # the package's own config, wherever hpo is installed
EPOCHS = 3


class Pruned(Exception):
    """What an Optuna objective raises from on_epoch (optuna.TrialPruned in the kind)."""


def tiny_params(**changes) -> dict:
    params = yaml.safe_load((CONF / "model" / "mace.yaml").read_text())
    params.update(num_channels=8, max_num_epochs=EPOCHS, batch_size=4)
    params.update(changes)
    return params


@pytest.fixture(scope="module")
def cu_data():
    """8 training and 4 validation Cu cells of 4 and 8 atoms, the isolated Cu atom among the training frames
    (as hpo's data have it) and its energy as E0."""
    splits = emt_splits()
    only_cu = lambda frames: [a for a in frames if set(a.get_chemical_symbols()) == {"Cu"} and len(a) > 1]  # noqa: E731
    isolated = [a for a in make_isolated_atoms() if a.get_chemical_symbols() == ["Cu"]]
    train = isolated + only_cu(splits["train"])[:8]
    val = only_cu(splits["val"] + splits["test"])[:4]
    return train, val, {"Cu": float(isolated[0].info["REF_energy"])}


def relabelled(frames):
    """The workshop water layout: energy under `energy` (ASE's reader moves it onto a SinglePointCalculator) and
    forces under `force` (an array); the same numbers."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for atoms in frames:
        copy = atoms.copy()
        energy = copy.info.pop("REF_energy")
        copy.arrays["force"] = copy.arrays.pop("REF_forces")
        copy.calc = SinglePointCalculator(copy, energy=energy)
        out.append(copy)
    return out


def _fit(train, val, params, workdir, e0, keys=engine.DataKeys()):
    """(model file, [(epoch, metrics)] as on_epoch saw them, workdir) of one training."""
    seen: list[tuple[int, dict]] = []
    model = engine.train(train, val, params, workdir, lambda epoch, found: seen.append((epoch, found)), e0=e0, keys=keys)
    return model, seen, workdir


@pytest.fixture(scope="module")
def fits(cu_data, tmp_path_factory):
    """The module's trainings that end with a model, two at a time: {name: future of ``_fit``'s result}. A test
    takes its fit's ``result()``, so a fit that fails fails the tests that use it, and only those.

    - trained: EPOCHS epochs, the model of every test that loads, predicts or builds a calculator
    - ase_keys: the same frames and seed under ASE's own label names, 1 epoch
    - stage_two: swa on, EMA off, 2 epochs (the fewest with an epoch of each stage)
    - same_seed, other_seed: ``trained`` again, with its seed and with seed 1
    """
    train, val, e0 = cu_data
    jobs = {
        "trained": (train, val, tiny_params(), {}),
        "ase_keys": (relabelled(train), relabelled(val), tiny_params(max_num_epochs=1), {"keys": engine.DataKeys(energy="energy", forces="force")}),
        "stage_two": (train, val, tiny_params(max_num_epochs=2, swa=True, ema=False), {}),
        "same_seed": (train, val, tiny_params(), {}),
        "other_seed": (train, val, tiny_params(seed=1), {}),
    }
    with ThreadPoolExecutor(2) as pool:  # waits for every fit: none runs on beside the tests that train their own
        return {name: pool.submit(_fit, t, v, params, tmp_path_factory.mktemp(f"mace_{name}"), e0, **extra)
                for name, (t, v, params, extra) in jobs.items()}


@pytest.fixture(scope="module")
def trained(fits):
    """One training of EPOCHS epochs: (model file, [(epoch, metrics)] as on_epoch saw them, workdir)."""
    return fits["trained"].result()


def test_training_writes_a_model_and_reports_every_epoch_in_hpo_units(trained, cu_data):
    model, seen, workdir = trained
    _, val, _ = cu_data
    assert model.is_file() and model.stat().st_size > 0
    assert [epoch for epoch, _ in seen] == list(range(1, EPOCHS + 1))
    for _, found in seen:
        assert set(engine.EPOCH_METRICS.values()) <= set(found)
        assert all(np.isfinite(value) and value >= 0 for value in found.values())
    # The saved model is mace-torch's checkpoint of lowest validation loss: its errors, computed here from
    # predict in hpo's own way, are the ones on_epoch reported for that epoch (same units: eV, eV/atom, eV/A).
    best = min(seen, key=lambda item: item[1]["val_mace_loss"])[1]
    energies, forces = engine.predict(model, val)
    ours = metrics.energy_force_metrics(
        "val", np.array([a.info["REF_energy"] for a in val]), energies, np.array([len(a) for a in val]),
        [a.arrays["REF_forces"] for a in val], forces,
    )
    for name in ("val_energy_rmse", "val_energy_rmse_per_atom", "val_force_rmse", "val_force_mae"):
        assert ours[name] == pytest.approx(best[name], rel=1e-6, abs=1e-9), name


def test_isolated_atoms_are_not_trained_on_but_given_as_e0(trained, cu_data):
    _, _, workdir = trained
    train, _, _ = cu_data
    written = __import__("ase.io").io.read(workdir / engine.TRAIN_FILE, ":")
    assert len(written) == len(train) - 1 and all(len(a) > 1 for a in written)
    assert engine.e0_argument({"Cu": 3.51, "Al": 3.28}) == "{13: 3.28, 29: 3.51}"
    assert engine.e0_argument(None) == "average"


def test_labels_under_ase_own_energy_name_train_the_same_model(trained, fits):
    """The workshop water layout (``relabelled``), trained with keys=DataKeys("energy", "force"). Same numbers,
    same seed: epoch 1 must match the REF_ keys' fit exactly."""
    _, seen, _ = fits["ase_keys"].result()
    assert dict(seen)[1] == pytest.approx(trained[1][0][1], rel=1e-9)


def _processes_using(directory: Path) -> list[int]:
    """Processes (other than this one) that run in, or hold an open file (hence any lock) under, ``directory``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/cwd")] + [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone, or not ours to read
            continue
        if any(link.startswith(str(directory)) for link in links):
            found.append(int(pid))
    return found


def test_raising_from_on_epoch_stops_training_and_leaves_no_process(trained, cu_data, tmp_path):
    train, val, e0 = cu_data
    seen = []

    def prune_after_first(epoch: int, found: dict) -> None:
        seen.append((epoch, found))
        raise Pruned(f"epoch {epoch}: {found['val_energy_rmse_per_atom']:.3g} eV/atom")

    with pytest.raises(Pruned):
        engine.train(train, val, tiny_params(max_num_epochs=200), tmp_path, prune_after_first, e0=e0)
    assert [epoch for epoch, _ in seen] == [1]  # one epoch of 200, and no call after the raise
    # Epochs are a clean fidelity: without stage two nothing depends on max_num_epochs (the LR schedule
    # reacts to the validation loss), so epoch 1 of a 200-epoch fit is epoch 1 of the 3-epoch one.
    assert seen[0][1] == pytest.approx(trained[1][0][1], rel=1e-9)
    assert not (tmp_path / f"{engine.RUN_NAME}.model").exists()
    assert _processes_using(tmp_path.resolve()) == []


def test_stage_two_hands_back_its_own_model(cu_data, fits):
    """With swa (stage two) run_train saves two models; the fit's is stage two's best, whose errors on_epoch reported
    (2 epochs, the fewest with one of each stage: epoch 1 stage one, epoch 2 stage two, as engine.stage_two_start
    places it). EMA off: the other branch of the command."""
    _, val, _ = cu_data
    assert engine.stage_two_start(tiny_params(max_num_epochs=2, swa=True)) == 1  # 0-based: the second and last epoch
    model, seen, workdir = fits["stage_two"].result()
    seen = dict(seen)
    assert model.name == "mace_stagetwo.model" and (workdir / "mace.model").is_file()
    assert sorted(seen) == [1, 2]
    energies, forces = engine.predict(model, val)
    ours = metrics.energy_force_metrics(
        "val", np.array([a.info["REF_energy"] for a in val]), energies, np.array([len(a) for a in val]),
        [a.arrays["REF_forces"] for a in val], forces,
    )
    assert ours["val_energy_rmse_per_atom"] == pytest.approx(seen[2]["val_energy_rmse_per_atom"], rel=1e-6)
    assert ours["val_force_rmse"] == pytest.approx(seen[2]["val_force_rmse"], rel=1e-6)


def test_predict_equals_the_ase_calculator(trained, cu_data):
    model, _, _ = trained
    _, val, _ = cu_data
    energies, forces = engine.predict(model, val)
    calc = engine.calculator(model)
    for atoms, energy, force in zip(val, energies, forces):
        atoms = atoms.copy()
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), force, atol=1e-6)


def test_forces_are_minus_the_gradient_of_the_energy(trained, cu_data):
    """Central differences of the calculator's energy (eV) over 1e-4 A steps against its forces (eV/A)."""
    model, _, _ = trained
    atoms = cu_data[1][0].copy()
    atoms.calc = engine.calculator(model)
    forces = atoms.get_forces()
    step = 1e-4
    for index, axis in [(0, 0), (1, 1), (2, 2), (3, 0)]:
        shifted = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.positions[index, axis] += sign * step
            shifted.append(moved.get_potential_energy())
        gradient = (shifted[0] - shifted[1]) / (2 * step)
        assert -gradient == pytest.approx(forces[index, axis], abs=1e-4), (index, axis)
    assert np.abs(forces).max() > 1e-3  # a zero force field would pass the comparison trivially


def test_the_same_seed_gives_the_same_model(trained, cu_data, fits):
    """``trained`` trained again in its own folder, with its seed and with seed 1 (``fits``)."""
    model, _, _ = trained
    _, val, _ = cu_data
    again, other = (fits[name].result()[0] for name in ("same_seed", "other_seed"))
    energies, forces = engine.predict(model, val)
    same_energies, same_forces = engine.predict(again, val)
    other_energies, _ = engine.predict(other, val)
    np.testing.assert_allclose(same_energies, energies, atol=1e-8)
    np.testing.assert_allclose(np.concatenate(same_forces), np.concatenate(forces), atol=1e-8)
    assert np.abs(other_energies - energies).max() > 1e-6  # the seed matters, so the equality above means something


def test_a_failing_training_raises_with_mace_torchs_message(cu_data, tmp_path):
    train, val, _ = cu_data
    with pytest.raises(engine.MaceTrainingError, match="(?s)last lines of.*"):
        engine.train(train, val, tiny_params(), tmp_path, e0={"Al": 3.28})  # no E0 for Cu
    assert _processes_using(tmp_path.resolve()) == []


def test_the_default_config_and_the_search_space_pass_the_table():
    params = yaml.safe_load((CONF / "model" / "mace.yaml").read_text())
    parameters.check(params)
    space = yaml.safe_load((CONF / "search" / "mace.yaml").read_text())["space"]
    for name, spec in space.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:
            parameters.check({**params, name: value})
    with pytest.raises(ConfigError, match="correlation"):
        parameters.check({**params, "correlation": 9})
    with pytest.raises(ConfigError, match="no term"):
        parameters.check({**params, "energy_weight": 0.0, "forces_weight": 0.0})


KILLED_PARENT = """
import sys
from pathlib import Path
import yaml
from hpo.models.mace import engine, measure
params = yaml.safe_load(Path(sys.argv[1]).read_text())
params.update(num_channels=8, max_num_epochs=500, batch_size=4)
frames = measure.small_cu_frames(12)
def started(epoch, found):
    Path(sys.argv[3]).touch()
engine.train(frames[:8], frames[8:], params, Path(sys.argv[2]), started, e0=measure.cu_e0(), keys=measure.KEYS)
"""


def test_a_killed_caller_takes_its_training_with_it(tmp_path):
    """An Optuna worker killed by SIGKILL (the OOM killer, a scheduler) cannot run its finally: Linux's
    parent-death signal ends the training child instead of leaving it to run its epochs."""
    import signal
    import subprocess
    import sys
    import time

    workdir, marker = tmp_path / "fit", tmp_path / "started"
    caller = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(CONF / "model" / "mace.yaml"), str(workdir), str(marker)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert caller.poll() is None and time.monotonic() < deadline, "training never reached its first epoch"
            time.sleep(0.2)
        assert _processes_using(workdir.resolve()), "the training child should be running in its workdir"
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    deadline = time.monotonic() + 10
    while _processes_using(workdir.resolve()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_using(workdir.resolve()) == []
