"""Raman spectra from a polarizability trajectory (e.g. SA-GPR predictions along MD).

The polarizability tensor alpha(t) (n_frames, 3, 3), sampled every ``timestep_fs``,
is split into

* the isotropic part   alpha_iso(t) = tr(alpha) / 3                  (polarised, VV, spectrum)
* the anisotropic part beta(t)      = alpha - alpha_iso I (traceless) (depolarised, VH, spectrum)

Their classical time-correlation functions, mean-subtracted and averaged over
all time origins (FFT, unbiased: lag t averages the n - t available pairs),

    C_iso(t)   = < d alpha_iso(0) d alpha_iso(t) >
    C_aniso(t) = < d beta(0) : d beta(t) > = sum_ij < d beta_ij(0) d beta_ij(t) >

are multiplied by a window that decays to zero at the largest lag kept (half
of a Hann window by default; it trades resolution for the noise of long lags)
and cosine-transformed:

    I(nu) = dt [ w_0 C_0 + 2 sum_{t >= 1} w_t C_t cos(2 pi c nu t dt) ]

with the wavenumber nu in cm^-1 and c = 2.99792458e-5 cm/fs. Intensities are
in (polarizability unit)^2 fs, per cm^-1 of the grid; the usual experimental
combinations are I_VV = I_iso + 4/45 I_aniso and I_VH = 1/15 I_aniso
(with <beta:beta> as defined here).

Vibrational density of states (``vibrational_dos``): the same transform of the
mass-weighted velocity autocorrelation of each species, sum_i m_i < v_i(0) . v_i(t) >,
from the MD frames' momenta. It shows where the potential puts the motions, so a
Raman band can be told apart from an artefact of the polarizability model: a band
with no counterpart in the VDOS does not come from the dynamics.

Quantum correction (optional, ``correction="harmonic"``): the classical ACF is
symmetric in time, the quantum one obeys detailed balance. The harmonic
correction factor (Ramirez et al., J. Chem. Phys. 121, 3973 (2004)) multiplies
the classical spectrum by  x / (1 - exp(-x)),  x = h c nu / (k_B T) =
1.4387769 cm K * nu / T; it is 1 at nu = 0 and about 16.5 at 3400 cm^-1 and
300 K (the factor that lifts the O-H stretch relative to the librations).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpo.safe_files import atomic_write

__all__ = [
    "SPEED_OF_LIGHT_CM_PER_FS",
    "WATER_BANDS",
    "Spectra",
    "autocorrelation",
    "harmonic_correction",
    "raman_spectra",
    "spectrum_plot",
    "vibrational_dos",
    "window_function",
    "write_csv",
]

SPEED_OF_LIGHT_CM_PER_FS = 2.99792458e-5
# second radiation constant h c / k_B in cm K
HC_OVER_KB_CM_K = 1.438776877
# Expected bands of liquid water (cm^-1): (label, low, high) for spectrum_plot.
WATER_BANDS: tuple[tuple[str, float, float], ...] = (
    ("librations", 400.0, 800.0),
    ("H-O-H bend", 1590.0, 1690.0),
    ("O-H stretch", 3200.0, 3600.0),
)
WINDOWS = ("hann", "blackman", "triangle", "none")


@dataclass
class Spectra:
    """Isotropic and anisotropic Raman spectra and the ACFs they come from."""

    wavenumber_cm: np.ndarray
    iso: np.ndarray
    aniso: np.ndarray
    acf_time_fs: np.ndarray
    acf_iso: np.ndarray
    acf_aniso: np.ndarray
    # per species symbol: the vibrational density of states on wavenumber_cm (vibrational_dos)
    vdos: dict[str, np.ndarray] | None = None


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """Mean-subtracted autocorrelation averaged over time origins, summed over components.

    ``x`` is (n,) or (n, ...) with time first; C(t) = 1/(n - t) sum_s sum_k dx_k(s) dx_k(s + t)
    for t = 0 .. n-1, dx = x - mean over time. C(0) is the (population) variance, summed over
    components. Computed by FFT (zero padding to 2n, so no wrap-around): O(n log n).
    """
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 time steps, got {n}")
    dx = (x - x.mean(axis=0)).reshape(n, -1)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(dx, n=size, axis=0)
    acf = np.fft.irfft((f * f.conj()).real.sum(axis=1), n=size)[:n]
    return acf / (n - np.arange(n))


def window_function(name: str | None, length: int) -> np.ndarray:
    """Right half of a symmetric window: 1 at lag 0, (near) 0 at lag ``length``.

    hann: cos^2(pi t / 2L); blackman: 0.42 + 0.5 cos(pi t/L) + 0.08 cos(2 pi t/L);
    triangle: 1 - t/L; none (or None): all ones.
    """
    t = np.arange(length) / length
    name = "none" if name is None else name.lower()
    if name == "hann":
        return np.cos(np.pi * t / 2) ** 2
    if name == "blackman":
        return 0.42 + 0.5 * np.cos(np.pi * t) + 0.08 * np.cos(2 * np.pi * t)
    if name == "triangle":
        return 1.0 - t
    if name == "none":
        return np.ones(length)
    raise ValueError(f"unknown window {name!r}; choose one of {', '.join(WINDOWS)}")


def harmonic_correction(wavenumber_cm: np.ndarray, temperature_k: float) -> np.ndarray:
    """x / (1 - exp(-x)) with x = h c nu / (k_B T); 1 at nu = 0 (see the module docstring)."""
    x = HC_OVER_KB_CM_K * np.asarray(wavenumber_cm, dtype=float) / temperature_k
    out = np.ones_like(x)
    nonzero = np.abs(x) > 1e-12
    out[nonzero] = x[nonzero] / -np.expm1(-x[nonzero])
    return out


def _cosine_transform(acf: np.ndarray, timestep_fs: float, size: int) -> np.ndarray:
    """dt [C_0 + 2 sum_{t>=1} C_t cos(2 pi k t / size)] for k = 0 .. size/2."""
    even = np.zeros(size)
    even[: len(acf)] = acf
    even[size - len(acf) + 1 :] = acf[:0:-1]
    return np.fft.rfft(even).real * timestep_fs


def raman_spectra(
    tensors: np.ndarray,
    timestep_fs: float,
    window: str | None = "hann",
    max_wavenumber: float = 4500.0,
    correlation_fs: float | None = None,
    correction: str | None = None,
    temperature_k: float = 300.0,
    oversample: int = 4,
) -> Spectra:
    """Isotropic and anisotropic Raman spectra of a (n_frames, 3, 3) polarizability series.

    ``correlation_fs``: largest ACF lag used (default: half the trajectory; longer lags
    average few time origins and are noisy). The resolution is about 1 / (c * correlation_fs)
    cm^-1 (33 cm^-1 for 1 ps), broadened by the window. ``oversample`` zero-pads the ACF to
    that many times its length so the spectrum is drawn on a finer grid (interpolation, not
    resolution). ``correction``: None or "harmonic" (at ``temperature_k``). The Nyquist limit
    1 / (2 c dt) (16678 cm^-1 at 1 fs) must exceed ``max_wavenumber``.
    """
    t = np.asarray(tensors, dtype=float)
    if t.ndim != 3 or t.shape[1:] != (3, 3):
        raise ValueError(f"tensors must have shape (n_frames, 3, 3), got {t.shape}")
    if timestep_fs <= 0:
        raise ValueError(f"timestep_fs must be positive, got {timestep_fs}")
    nyquist = 1.0 / (2.0 * SPEED_OF_LIGHT_CM_PER_FS * timestep_fs)
    if max_wavenumber > nyquist:
        raise ValueError(
            f"max_wavenumber {max_wavenumber} cm^-1 is above the Nyquist limit {nyquist:.0f} cm^-1 "
            f"of a {timestep_fs} fs time step"
        )
    if correction not in (None, "harmonic"):
        raise ValueError(f"correction must be None or 'harmonic', got {correction!r}")
    iso = np.trace(t, axis1=1, axis2=2) / 3.0
    beta = t - iso[:, None, None] * np.eye(3)
    acf_iso, acf_aniso = autocorrelation(iso), autocorrelation(beta)
    lags = _lags(len(t), timestep_fs, correlation_fs)
    wavenumber, (spec_iso, spec_aniso) = _transform([acf_iso, acf_aniso], lags, timestep_fs, window, max_wavenumber, oversample)
    if correction == "harmonic":
        factor = harmonic_correction(wavenumber, temperature_k)
        spec_iso, spec_aniso = spec_iso * factor, spec_aniso * factor
    return Spectra(
        wavenumber_cm=wavenumber,
        iso=spec_iso,
        aniso=spec_aniso,
        acf_time_fs=np.arange(lags) * timestep_fs,
        acf_iso=acf_iso[:lags],
        acf_aniso=acf_aniso[:lags],
    )


def vibrational_dos(
    frames,
    timestep_fs: float,
    window: str | None = "hann",
    max_wavenumber: float = 4500.0,
    correlation_fs: float | None = None,
    oversample: int = 4,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Wavenumbers (cm^-1) and, per species symbol, the classical vibrational density of states.

    From the momenta the MD wrote with each frame (mass-weighted velocity ACF, see the module
    docstring), transformed exactly like :func:`raman_spectra` (same lags, window and grid), in
    amu A^2 fs^-1 per cm^-1 of the grid. Frames must hold the same atoms in the same order.
    """
    import ase.units

    if not all(atoms.has("momenta") for atoms in frames):
        raise SpectrumError("the trajectory's frames carry no momenta (write them with `hpo md`)")
    symbols = frames[0].get_chemical_symbols()
    if any(atoms.get_chemical_symbols() != symbols for atoms in frames):
        raise SpectrumError("the frames do not hold the same atoms in the same order: no velocity autocorrelation")
    masses = frames[0].get_masses()
    # sqrt(m) v = p / sqrt(m), in amu^1/2 A/fs (ASE momenta: amu A / ASE time unit)
    scaled = np.array([atoms.get_momenta() for atoms in frames]) / np.sqrt(masses)[None, :, None] * ase.units.fs
    lags = _lags(len(frames), timestep_fs, correlation_fs)
    species = sorted(set(symbols))
    acfs = [autocorrelation(scaled[:, np.array(symbols) == symbol]) for symbol in species]
    wavenumber, spectra = _transform(acfs, lags, timestep_fs, window, max_wavenumber, oversample)
    return wavenumber, dict(zip(species, spectra))


def _lags(n: int, timestep_fs: float, correlation_fs: float | None) -> int:
    lags = n // 2 if correlation_fs is None else int(round(correlation_fs / timestep_fs)) + 1
    return max(2, min(lags, n))


def _transform(acfs, lags: int, timestep_fs: float, window, max_wavenumber: float, oversample: int):
    """The wavenumber grid up to ``max_wavenumber`` and the windowed cosine transform of each ACF on it."""
    w = window_function(window, lags)
    size = 1 << int(np.ceil(np.log2(2 * lags * max(1, oversample))))
    wavenumber = np.fft.rfftfreq(size, d=timestep_fs) / SPEED_OF_LIGHT_CM_PER_FS
    keep = wavenumber <= max_wavenumber
    return wavenumber[keep], [_cosine_transform(c[:lags] * w, timestep_fs, size)[keep] for c in acfs]


def write_csv(path: str | Path, spectra: Spectra, acf: bool = False) -> Path:
    """Write the spectra (wavenumber_cm, iso, aniso[, vdos_<species>...]) or, with ``acf``, the ACFs (time_fs, iso, aniso)."""
    if acf:
        header = ["time_fs", "acf_iso", "acf_aniso"]
        columns = (spectra.acf_time_fs, spectra.acf_iso, spectra.acf_aniso)
    else:
        vdos = spectra.vdos or {}
        header = ["wavenumber_cm", "iso", "aniso", *(f"vdos_{symbol}" for symbol in vdos)]
        columns = (spectra.wavenumber_cm, spectra.iso, spectra.aniso, *vdos.values())
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(zip(*(np.char.mod("%.10g", c) for c in columns)))
    return path


def spectrum_plot(
    path: str | Path,
    spectra: Spectra,
    title: str,
    bands: Sequence[tuple[str, float, float]] | None = WATER_BANDS,
) -> Path:
    """Two panels: the spectra (each scaled to its maximum) with ``bands`` shaded and
    labelled, and the normalised ACFs C(t)/C(0); with ``spectra.vdos`` a third one between
    them: the vibrational density of states per species on the same axis."""
    from hpo.plots import plt, save_figure

    if spectra.vdos:
        fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 8.5), gridspec_kw={"height_ratios": [3, 2, 2]})
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), gridspec_kw={"height_ratios": [3, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, low, high) in enumerate(bands or ()):
        top.axvspan(low, high, color=colours[(i + 2) % len(colours)], alpha=0.15, lw=0)
        top.text((low + high) / 2, 1.07, label, ha="center", va="bottom", fontsize=8)
        if spectra.vdos:
            middle.axvspan(low, high, color=colours[(i + 2) % len(colours)], alpha=0.15, lw=0)
    if spectra.vdos:
        for i, (symbol, values) in enumerate(spectra.vdos.items()):
            scale = np.abs(values).max() or 1.0
            middle.plot(spectra.wavenumber_cm, values / scale, color=colours[(i + 4) % len(colours)], lw=1, label=f"{symbol} (max {scale:.3g})")
        middle.set_xlim(0, spectra.wavenumber_cm[-1])
        middle.set_xlabel("wavenumber (cm$^{-1}$)")
        middle.set_ylabel("VDOS / max")
        middle.set_title("vibrational density of states of the MD (mass-weighted velocity ACF), per species", fontsize=8)
        middle.legend(fontsize=8)
    for name, values, colour in (("isotropic", spectra.iso, colours[0]),
                                 ("anisotropic", spectra.aniso, colours[1])):
        scale = np.abs(values).max() or 1.0
        top.plot(spectra.wavenumber_cm, values / scale, color=colour, lw=1.2,
                 label=f"{name} (max {scale:.3g})")
    top.set_xlim(0, spectra.wavenumber_cm[-1])
    top.set_ylim(min(-0.05, top.get_ylim()[0]), 1.2)
    top.set_xlabel("wavenumber (cm$^{-1}$)")
    top.set_ylabel("intensity / max")
    # between the bend and the stretch bands, below the band labels
    top.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.55, 0.86))
    for name, values, colour in (("isotropic", spectra.acf_iso, colours[0]),
                                 ("anisotropic", spectra.acf_aniso, colours[1])):
        bottom.plot(spectra.acf_time_fs, values / (values[0] or 1.0), color=colour, lw=1, label=name)
    bottom.axhline(0, color="k", lw=0.5)
    bottom.set_xlabel("time lag (fs)")
    bottom.set_ylabel("C(t) / C(0)")
    bottom.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    return save_figure(fig, Path(path))


def polarizability_key(cfg, atoms) -> str:
    """Where `hpo polarize` wrote the tensors: the dataset's polarizability key (``dataset.property_keys``
    for the workshop layout, ``dataset.keys`` for own data), else the one detected in ``atoms``."""
    from hpo.data import detect_keys, layout_of

    key = layout_of(cfg.dataset).given_keys().polarizability
    if key is None:
        key = detect_keys([atoms])[0].polarizability
    if key is None:
        raise SpectrumError("the trajectory's frames carry no polarizability (write them with `hpo polarize`)")
    return key


class SpectrumError(ValueError):
    """The trajectory cannot give a spectrum (too short, uneven time step, no tensors)."""


def timestep_of(frames) -> float:
    """The MD time step between saved frames (fs), from each frame's ``time_fs``; it must be uniform."""
    times = np.array([atoms.info.get("time_fs", np.nan) for atoms in frames], dtype=float)
    if not np.isfinite(times).all():
        raise SpectrumError("the trajectory's frames carry no time_fs (write them with `hpo md` and `hpo polarize`)")
    steps = np.diff(times)
    if not len(steps) or steps.min() <= 0 or not np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9):
        raise SpectrumError(f"the frames' time_fs are not evenly spaced (steps {np.unique(np.round(steps, 6))[:5]} fs)")
    return float(steps[0])


def main(cfg) -> dict:
    """``python -m hpo spectrum``: Raman spectra of ``spectrum.trajectory``, CSV + PNG, one MLflow run."""
    import time

    import ase.io

    from hpo.config import output_path
    from hpo.data import DataError, read_tensors
    from hpo.polarize import EXTRAPOLATED_KEY, UNCERTAIN_KEY
    from hpo.tracking import Tracker, provenance_tags

    settings = cfg.spectrum
    path = Path(str(settings.trajectory)).expanduser()
    if not path.is_file():
        raise DataError(f"spectrum.trajectory={settings.trajectory!r} does not exist; run `hpo polarize` first")
    frames = ase.io.read(path, ":")
    if len(frames) < settings.min_frames:
        raise SpectrumError(
            f"{path.name} holds {len(frames)} frames, fewer than spectrum.min_frames={settings.min_frames}: "
            "run a longer MD (md.steps) for a spectrum whose bands can be told apart"
        )
    tensors = read_tensors(frames, polarizability_key(cfg, frames[0]), path.name, symmetry_tol=float("inf"))
    timestep = timestep_of(frames)
    spectra = raman_spectra(
        tensors, timestep, window=settings.window, max_wavenumber=settings.max_wavenumber_cm,
        correlation_fs=settings.correlation_fs, correction=settings.correction, temperature_k=settings.temperature_K,
    )
    if all(atoms.has("momenta") for atoms in frames):
        _, spectra.vdos = vibrational_dos(
            frames, timestep, window=settings.window, max_wavenumber=settings.max_wavenumber_cm,
            correlation_fs=settings.correlation_fs,
        )
    outdir = output_path(cfg.experiments_dir) / "spectrum" / time.strftime("%Y%m%d-%H%M%S")
    files = [
        write_csv(outdir / "raman.csv", spectra),
        write_csv(outdir / "polarizability_acf.csv", spectra, acf=True),
        spectrum_plot(outdir / "raman.png", spectra, f"Raman spectra of {path.name}: {len(frames)} frames every {timestep:g} fs"),
    ]
    # frames `hpo polarize` flagged as predicted beyond the training data's spread
    flags = [atoms.info.get(EXTRAPOLATED_KEY) for atoms in frames]
    extrapolated = {"fraction_extrapolated": sum(bool(f) for f in flags) / len(frames)} if any(f is not None for f in flags) else {}
    doubts = [atoms.info.get(UNCERTAIN_KEY) for atoms in frames]
    if any(d is not None for d in doubts):  # the model's own std beyond its validation set's (`hpo polarize`)
        extrapolated["fraction_uncertain"] = sum(bool(d) for d in doubts) / len(frames)
    named = {"iso": spectra.iso, "aniso": spectra.aniso, **{f"vdos_{k}": v for k, v in (spectra.vdos or {}).items()}}
    peaks = {f"peak_{name}_cm": float(spectra.wavenumber_cm[np.argmax(values)]) for name, values in named.items()}
    tracker = Tracker(cfg.tracking)
    tags = {"command": "spectrum", "run_type": "spectrum", "trajectory": str(path), **provenance_tags()}
    with tracker.run("spectrum", tags=tags) as run_id:
        tracker.log(run_id, params={f"spectrum.{k}": v for k, v in settings.items() if k != "trajectory"},
                    metrics={"n_frames": len(frames), "timestep_fs": timestep, **peaks, **extrapolated})
        tracker.log_artifacts(run_id, files)
    print(f"[hpo] Raman spectra of {len(frames)} frames ({timestep:g} fs apart) in {outdir} (MLflow run {run_id})")
    print("  highest peak: " + ", ".join(f"{k[5:-3]} {v:.0f} cm^-1" for k, v in peaks.items()))
    if extrapolated.get("fraction_extrapolated"):
        print(
            f"[hpo] warning: {extrapolated['fraction_extrapolated']:.1%} of these frames were predicted beyond the training "
            "data's spread (flagged by `hpo polarize`): bands they carry are extrapolations of the polarizability model",
            flush=True,
        )
    if extrapolated.get("fraction_uncertain"):
        print(f"[hpo] warning: {extrapolated['fraction_uncertain']:.1%} of these frames have a predictive std beyond the largest "
              "on the validation frames (flagged by `hpo polarize`)", flush=True)
    return {"outdir": outdir, **peaks, **extrapolated}
