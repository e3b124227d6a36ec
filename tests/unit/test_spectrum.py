"""Tests of hpo.spectrum on synthetic polarizability series of known frequencies."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from hpo.spectrum import (
    SPEED_OF_LIGHT_CM_PER_FS,
    autocorrelation,
    harmonic_correction,
    raman_spectra,
    spectrum_plot,
    write_csv,
)

TIMESTEP_FS = 0.5


def synthetic(n: int = 8000, seed: int = 0) -> np.ndarray:
    """Isotropic part at 1600 cm^-1, anisotropic (traceless) part at 3400 cm^-1, plus noise."""
    rng = np.random.default_rng(seed)
    time = np.arange(n) * TIMESTEP_FS
    omega = 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS
    tensors = np.tile(np.diag([9.0, 9.5, 10.0]), (n, 1, 1))  # a mean, removed by the ACF
    tensors += (0.3 * np.cos(omega * 1600 * time))[:, None, None] * np.eye(3)
    traceless = np.array([[0.5, 0.2, 0.0], [0.2, -0.3, 0.1], [0.0, 0.1, -0.2]])
    tensors += np.sin(omega * 3400 * time + 0.3)[:, None, None] * traceless
    noise = 0.01 * rng.normal(size=(n, 3, 3))
    return tensors + (noise + noise.transpose(0, 2, 1)) / 2


def test_autocorrelation_matches_direct_average_over_origins():
    x = np.random.default_rng(1).normal(size=(50, 2)) + 3.0
    dx = x - x.mean(axis=0)
    direct = [np.mean(np.sum(dx[: 50 - t] * dx[t:], axis=1)) for t in range(50)]
    np.testing.assert_allclose(autocorrelation(x), direct, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        autocorrelation(np.ones(1))


def test_peaks_recovered_and_acf_starts_at_variance():
    tensors = synthetic()
    spectra = raman_spectra(tensors, TIMESTEP_FS, window="hann", max_wavenumber=4500)
    # resolution: 1 / (c * correlation time); the default correlation time is half the run (2 ps)
    resolution = 1.0 / (SPEED_OF_LIGHT_CM_PER_FS * spectra.acf_time_fs[-1])
    peak_iso = spectra.wavenumber_cm[np.argmax(spectra.iso)]
    peak_aniso = spectra.wavenumber_cm[np.argmax(spectra.aniso)]
    print(f"resolution {resolution:.1f} cm^-1, iso peak {peak_iso:.1f}, aniso peak {peak_aniso:.1f}")
    assert abs(peak_iso - 1600) < resolution
    assert abs(peak_aniso - 3400) < resolution
    # the parts are separated: no 3400 band in the isotropic spectrum and vice versa
    at = lambda s, nu: s[np.argmin(np.abs(spectra.wavenumber_cm - nu))]  # noqa: E731
    assert at(spectra.iso, 3400) < 1e-2 * spectra.iso.max()
    assert at(spectra.aniso, 1600) < 1e-2 * spectra.aniso.max()

    iso = np.trace(tensors, axis1=1, axis2=2) / 3
    beta = tensors - iso[:, None, None] * np.eye(3)
    assert spectra.acf_iso[0] == pytest.approx(np.var(iso), rel=1e-10)
    assert spectra.acf_aniso[0] == pytest.approx(np.var(beta, axis=0).sum(), rel=1e-10)
    assert spectra.wavenumber_cm[-1] <= 4500


def test_parseval_window_none_integrates_to_acf_at_zero():
    # with no window, the integral of I over frequency (in 1/fs) is C(0): a check of the scale
    spectra = raman_spectra(synthetic(2000), TIMESTEP_FS, window=None, max_wavenumber=16000,
                            oversample=1)
    df = (spectra.wavenumber_cm[1] - spectra.wavenumber_cm[0]) * SPEED_OF_LIGHT_CM_PER_FS
    integral = 2 * spectra.iso.sum() * df - spectra.iso[0] * df  # both signs of frequency
    assert integral == pytest.approx(spectra.acf_iso[0], rel=0.02)


def test_options_and_errors():
    tensors = synthetic(1000)
    plain = raman_spectra(tensors, TIMESTEP_FS)
    corrected = raman_spectra(tensors, TIMESTEP_FS, correction="harmonic", temperature_k=300)
    factor = harmonic_correction(plain.wavenumber_cm, 300)
    np.testing.assert_allclose(corrected.iso, plain.iso * factor)
    assert factor[0] == 1.0 and harmonic_correction(np.array([3400.0]), 300)[0] == pytest.approx(16.3, abs=0.3)
    short = raman_spectra(tensors, TIMESTEP_FS, correlation_fs=100.0, window="blackman")
    assert short.acf_time_fs[-1] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="Nyquist"):
        raman_spectra(tensors, 5.0, max_wavenumber=4500)
    with pytest.raises(ValueError, match="unknown window"):
        raman_spectra(tensors, TIMESTEP_FS, window="kaiser")
    with pytest.raises(ValueError, match=r"\(n_frames, 3, 3\)"):
        raman_spectra(tensors[:, 0], TIMESTEP_FS)


def test_csv_and_plot(tmp_path):
    spectra = raman_spectra(synthetic(4000), TIMESTEP_FS)
    out = write_csv(tmp_path / "raman.csv", spectra)
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["wavenumber_cm", "iso", "aniso"] and len(rows) == len(spectra.iso) + 1
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], spectra.aniso, rtol=1e-9)
    acf = list(csv.reader(write_csv(tmp_path / "acf.csv", spectra, acf=True).open()))
    assert acf[0] == ["time_fs", "acf_iso", "acf_aniso"] and len(acf) == len(spectra.acf_iso) + 1
    png = spectrum_plot(tmp_path / "raman.png", spectra, "synthetic: iso 1600, aniso 3400 cm$^{-1}$")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trajectory(path, n_frames, timestep_fs=0.5, wavenumber=1600.0, vibrations=(("H", 3000.0), ("O", 500.0))):
    """Water frames whose polarizability oscillates at ``wavenumber`` (isotropic part), as `hpo polarize`
    writes them, with momenta: the atoms of each species of ``vibrations`` move at its wavenumber."""
    import ase.io
    from ase.build import molecule

    frames = []
    omega = 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS
    for i in range(n_frames):
        atoms = molecule("H2O")
        t = i * timestep_fs
        alpha = 9.0 + 0.3 * np.cos(omega * wavenumber * t)
        atoms.info["Polarizability"] = (alpha * np.eye(3)).ravel()
        atoms.info["time_fs"] = t
        velocity = {symbol: np.cos(omega * nu * t) for symbol, nu in vibrations}
        momenta = [atoms.get_masses()[k] * velocity[symbol] * np.array([0.01, 0.0, 0.005]) for k, symbol in enumerate(atoms.get_chemical_symbols())]
        atoms.set_momenta(np.array(momenta))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.mark.slow
def test_spectrum_command_finds_the_band_and_logs_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from hpo.config import load_config, output_overrides
    from hpo.spectrum import main

    trajectory = _trajectory(tmp_path / "trajectory_polarizability.xyz", 800)
    cfg = load_config([*output_overrides(tmp_path), f"spectrum.trajectory={trajectory}", "spectrum.correction=null"])
    result = main(cfg)
    assert abs(result["peak_iso_cm"] - 1600.0) < 40.0
    # the vibrational density of states of each species, from the frames' momenta
    assert abs(result["peak_vdos_H_cm"] - 3000.0) < 40.0 and abs(result["peak_vdos_O_cm"] - 500.0) < 40.0
    assert {p.name for p in result["outdir"].iterdir()} >= {"raman.csv", "polarizability_acf.csv", "raman.png"}
    with open(result["outdir"] / "raman.csv") as handle:
        assert next(csv.reader(handle)) == ["wavenumber_cm", "iso", "aniso", "vdos_H", "vdos_O"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert runs[0].data.tags["run_type"] == "spectrum" and runs[0].data.metrics["timestep_fs"] == 0.5


@pytest.mark.slow
def test_spectrum_command_refuses_short_or_uneven_trajectories(tmp_path):
    import ase.io

    from hpo.config import load_config, output_overrides
    from hpo.spectrum import SpectrumError, main, timestep_of

    short = _trajectory(tmp_path / "short.xyz", 50)
    with pytest.raises(SpectrumError, match="holds 50 frames, fewer than spectrum.min_frames=400"):
        main(load_config([*output_overrides(tmp_path), f"spectrum.trajectory={short}"]))
    frames = ase.io.read(short, ":")
    frames[10].info["time_fs"] += 0.1
    with pytest.raises(SpectrumError, match="not evenly spaced"):
        timestep_of(frames)


def test_vibrational_dos_needs_momenta_and_fixed_atoms(tmp_path):
    import ase.io

    from hpo.spectrum import SpectrumError, vibrational_dos

    frames = ase.io.read(_trajectory(tmp_path / "t.xyz", 40), ":")
    wavenumber, vdos = vibrational_dos(frames, 0.5, max_wavenumber=4000)
    assert set(vdos) == {"H", "O"} and all(v.shape == wavenumber.shape for v in vdos.values())
    bare = [atoms.copy() for atoms in frames]
    for atoms in bare:
        del atoms.arrays["momenta"]
    with pytest.raises(SpectrumError, match="no momenta"):
        vibrational_dos(bare, 0.5)
    frames[3] = frames[3][[1, 0, 2]]
    with pytest.raises(SpectrumError, match="same atoms in the same order"):
        vibrational_dos(frames, 0.5)
