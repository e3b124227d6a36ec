"""The models' own uncertainty on the workshop data: calibration, an MD run's extrapolating frames, the RDF rule,
and quippy's local_gap_variance against hpo's posterior.

    HPO_DATA_DIR=../shared/data/water python benchmarks/bench_uncertainty.py [--n-sparse 1000] [--steps 400] [--sagpr | --only-sagpr]

1. GAP (hpo's solver, energies only, the default model with ``--n-sparse`` points per species) on
   gap_input_200.xyz: validation (gap_validate.xyz) and test (frames of gap_input_400.xyz not in training)
   coverage of the 1- and 2-std intervals of the frame energies, before and after the scale fitted on validation.
2. ``--steps`` NVE steps (conf/md/nve.yaml) from validation frame 0 with that GAP: the fraction of frames whose
   std per atom passes the largest on the validation frames, and the RDF rule's integrals (windows of 20 and
   50 frames, 0.05-A bins, over half the smallest cell height) against those of validation frames.
3. ``--sagpr``: the default SA-GPR model on the same frames, coverage of its component std likewise.
4. quippy: a gap_fit model of 8 frames with ``export_covariance=T`` on hpo's sparse points; quippy's
   ``local_gap_variance`` per atom next to hpo's posterior variance of the local energies.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import ase.io
import numpy as np
from omegaconf import OmegaConf

from hpo import calibration
from hpo import md as hpo_md
from hpo import stability
from hpo.cache import Cache, frame_digests
from hpo.models.gap import gap_fit as gap
from hpo.models.gap import solver as gs
from hpo.models.gap.descriptors import environments
from hpo.models.sparse_gp import select_sparse

from hpo.paths import CONF_DIR as CONF  # the installed package's conf/, wherever it is
E0 = {"H": -12.13639159, "O": -2026.441234142}


def energies(frames) -> np.ndarray:
    return np.array([a.get_potential_energy() for a in frames])


def coverage_line(name: str, found: dict, quantity: str) -> str:
    return (f"{name:>5}: raw 1-std {found[f'{name}_{quantity}_raw_coverage_1std']:.3f}, 2-std {found[f'{name}_{quantity}_raw_coverage_2std']:.3f}; "
            f"scaled 1-std {found[f'{name}_{quantity}_coverage_1std']:.3f}, 2-std {found[f'{name}_{quantity}_coverage_2std']:.3f} "
            f"(nominal 0.683, 0.954)")


def sagpr_calibration(train, val, test) -> None:
    """Section 3: the default SA-GPR model's component std on validation and test, before and after the scale."""
    from hpo.data import read_tensors
    from hpo.models.sagpr.estimator import SAGPR
    from hpo.models.sagpr.kind import unique_components

    sagpr = SAGPR().fit(train, read_tensors(train, "Polarizability", "train", symmetry_tol=0.1))
    amplitudes = ", ".join(f"lambda {k[-1]} {float(v):.4g}" for k, v in sagpr.variance_.items() if k.startswith("amplitude"))
    print(f"SA-GPR prior variance fitted to the training tensors (a.u.^2): {amplitudes}")
    pairs = {}
    for name, frames in (("val", val), ("test", test)):
        predicted, std = sagpr.predict(frames, return_std=True)
        truth = read_tensors(frames, "Polarizability", name, symmetry_tol=0.1)
        pairs[name] = (unique_components(predicted - truth), unique_components(std))
    scale, found = calibration.calibrate("polarizability", pairs)
    print(f"SA-GPR (default model): std scale fitted on validation {scale:.3f}")
    for name in pairs:
        print(coverage_line(name, found, "polarizability"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-sparse", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sagpr", action="store_true")
    parser.add_argument("--only-sagpr", action="store_true", help="section 3 alone")
    args = parser.parse_args()
    from hpo.config import load_config
    from hpo.data import find_data_dir

    data = find_data_dir(load_config([]).dataset, ["gap_input_200.xyz"])  # HPO_DATA_DIR, else ../shared/data/water
    train = ase.io.read(data / "gap_input_200.xyz", ":")
    val = ase.io.read(data / "gap_validate.xyz", ":")
    seen = set(frame_digests(train))
    pool = ase.io.read(data / "gap_input_400.xyz", ":")
    test = [a for a, d in zip(pool, frame_digests(pool)) if d not in seen]
    print(f"{len(train)} training, {len(val)} validation, {len(test)} test frames")
    if args.only_sagpr:
        sagpr_calibration(train, val, test)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-uncertainty-"))
    cache = Cache(work / "cache")

    # 1. GAP calibration
    params = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "gap.yaml"), resolve=False)
    params.update(n_sparse=args.n_sparse, default_sigma=dict(energy=0.01, force=0.5, virial=0.0, hessian=0.0))
    model, _ = gs.fit_frames(params, train, energies(train), E0, cache=cache)
    hyper = gs.Hyper.from_params(params, E0)
    posterior = gs.posterior_of_model(model, train, hyper, cache=cache)
    splits = {}
    for name, frames in (("val", val), ("test", test)):
        predicted = model.predict(frames, cache)
        splits[name] = (predicted - energies(frames), posterior.std(frames, cache)[0])
        print(f"GAP {name}: energy RMSE {np.sqrt(np.mean(splits[name][0] ** 2)):.4f} eV, median std {np.median(splits[name][1]):.4f} eV")
    scale, found = calibration.calibrate("energy", splits)
    print(f"GAP n_sparse={args.n_sparse}: std scale fitted on validation {scale:.3f}")
    for name in splits:
        print(coverage_line(name, found, "energy"))

    # 2. MD: extrapolating frames and the RDF rule
    md_cfg = OmegaConf.load(CONF / "md" / "nve.yaml")
    md_cfg.steps = args.steps
    xml = gs.write_xml(model, work / "gap.xml")
    _, trace, blow_up = hpo_md.run(val[0], gap.load(xml), md_cfg, work / "md")
    md_std = posterior.std(trace.frames, cache)[0] / len(val[0])
    val_std = splits["val"][1] / len(val[0])
    beyond = md_std > val_std.max()
    print(f"MD {args.steps} NVE steps (blow-up: {blow_up or 'none'}), mean temperature {np.mean(trace.temperature):.0f} K: "
          f"{beyond.sum()} of {len(beyond)} frames ({beyond.mean():.1%}) beyond the largest validation std per atom "
          f"{val_std.max():.4g} eV/atom; median std per atom MD {np.median(md_std):.4g}, validation {np.median(val_std):.4g}")
    r_max = stability.usable_range([*train, val[0]])
    reference = stability.rdf(train, r_max, 0.05)
    for window in (20, 50):
        for name, frames in (("MD", trace.frames), ("validation", val)):
            mae = stability.windowed_rdf_mae(frames, reference, window)
            print(f"RDF rule over 0-{r_max:.2f} A, windows of {window} {name} frames: largest integral "
                  + ", ".join(f"{k} {np.nanmax(v):.3g}" for k, v in mae.items()))

    # 3. SA-GPR calibration
    if args.sagpr:
        sagpr_calibration(train, val, test)

    # 4. quippy's local_gap_variance
    small = gs.Hyper.from_params({**params, "n_sparse": 12}, E0)
    root = work / "quippy"
    root.mkdir()
    ase.io.write(root / "train.xyz", ase.io.read(data / "gap_input_50.xyz", ":8"), format="extxyz")
    eight = ase.io.read(root / "train.xyz", ":")
    tiny = {**params, "n_max": 2, "l_max": 2, "cutoff": 3.0, "n_sparse": 12}
    descriptors = gap.expected_descriptors(tiny, eight)
    indices = {d: select_sparse(environments(d, eight).vectors, 12, "fps", 0) for d in descriptors}
    points = gap.SparsePoints(eight, tuple(indices[d] for d in descriptors))
    points.write(root)
    command = gap.build_command(tiny, "train.xyz", E0, SimpleNamespace(energy="energy", force="force"), 0, sparse=points, energy_only=True)
    command[0] = gap.executable()
    subprocess.run([*command, "export_covariance=T"], cwd=root, capture_output=True, check=True)
    import quippy.potential

    from hpo.models.gap.sparse_gap import SparseGap

    frame = val[0].copy()
    frame.calc = quippy.potential.Potential(param_filename=str(root / gap.PARTIAL_MODEL_FILE), calc_args="local_gap_variance")
    frame.get_potential_energy()
    quippy_variance = np.ravel(frame.calc.extra_results["atoms"]["local_gap_variance"])
    ours = gs.posterior_of_model(SparseGap.read(root / gap.PARTIAL_MODEL_FILE), eight, small).std([val[0]])[1][0] ** 2
    print(f"quippy local_gap_variance (export_covariance=T), eV^2 per atom: {quippy_variance.min():.3g}-{quippy_variance.max():.3g}; "
          f"hpo's posterior variance of the local energies: {ours.min():.3g}-{ours.max():.3g}")


if __name__ == "__main__":
    main()
