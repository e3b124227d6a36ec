"""Symmetry-adapted Gaussian process regression (SA-GPR) of polarizability tensors.

A re-implementation of the TENSOAP/SOAPFAST ``sagpr_*`` pipeline used in the
workshop, as one scikit-learn style estimator. The symmetric 3x3 tensor is split
into its L=0 part (a scalar, 1 number) and its L=2 part (5 numbers); each is
learned by kernel ridge regression with a lambda-SOAP kernel of matching
symmetry, so predictions rotate with the structure exactly (no data
augmentation). The antisymmetric L=1 part is not learned (it is noise in these
data).

Reference: ``shared/docs/sagpr-reference.md`` (algorithm and the numbers an
implementation must reproduce). Numerical building blocks live in
:mod:`hpo.models.sagpr.features`.

Typical use::

    frames = ase.io.read("gap_input_200.xyz", ":")
    model = SAGPR(nc=200).fit(frames, read_tensors(frames, "Polarizability", "gap_input_200.xyz", 0.1))
    errors = component_rmse(true_tensors, model.predict(validation_frames))
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import ase
import ase.data
import ase.io
import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from hpo.safe_files import atomic_write_npz, write_text
from hpo.cache import Cache, digest, frame_digests
from hpo.metrics import COMPONENTS, rmse
from hpo.models.rules import sklearn_constraints
from hpo.models.sagpr.parameters import ESTIMATOR_KEYS, PARAMETERS
from hpo.models.sagpr.features import FeatureBlock, Projection, column_gram, fit_projection, frame_ranges, normalise
from hpo.models.sagpr.lambda_soap import FEATURE_CHUNK_ATOMS, lambda_soap
from hpo.models.sagpr.linear_kernels import PRIMAL_MAX_BYTES, PrimalWeights, choose_route, structure_kernels
from hpo.models.sparse_gp import select_sparse, solve_projected_process

__all__ = [
    "SAGPR",
    "cartesian_to_spherical",
    "component_rmse",
    "predict_file",
    "spherical_to_cartesian",
]

# Bump when a change alters what is cached, so stale cache entries are ignored.
CACHE_VERSION = 2
MODEL_FORMAT = "hpo.sagpr/2"
# Models written before environment sparsification: their basis is the training set, stored as train_*.
READABLE_FORMATS = ("hpo.sagpr/1", MODEL_FORMAT)
# Atoms featurised and predicted together in predict() (whole frames): bounds memory on long MD
# trajectories and bulk cells alike. Through the folded weights (no cache) 1200 atoms (100 water
# frames) take at most about 100 MB of raw features (all columns); kernels against the training set
# (with a cache) are built for larger chunks so a refit with other regularisation reuses fewer, larger
# cache entries.
STREAM_CHUNK_ATOMS = 1200
PREDICT_CHUNK_ATOMS = 6000
# Raw training features are kept between the two passes of fit() (Gram matrices, then projection)
# while they take at most this many bytes; beyond it they are computed again in the second pass,
# so a bulk training set is never held whole (300 frames of 400 atoms: about 10 GB).
RAW_KEEP_BYTES = 2**30
# Added to the diagonal of the environment kernel K_MM of a sparsified fit so its Cholesky
# factor exists when environments nearly coincide. Kernel diagonals of normalised features are
# at most 1, so this perturbs the model far below its regularisation.
ENV_JITTER = 1e-10
# Columns (weights) of a regression whose posterior factors are kept for predict(return_std=True): two
# dense (n x n) whiteners at 4000 columns take 256 MB; beyond, the model predicts without a std.
VARIANCE_MAX_COLUMNS = 4000

_SQRT2, _SQRT3, _SQRT6 = np.sqrt(2.0), np.sqrt(3.0), np.sqrt(6.0)
# Symmetric matrices B_mu with T = sum_mu a2_mu B_mu for the L=2 part, in the
# order (xy, yz, 3z^2 - r^2, xz, x^2 - y^2): the real m = -2..2 order of
# featomic's lambda = 2 features, so features and targets rotate alike.
_B2 = np.zeros((5, 3, 3))
_B2[0, 0, 1] = _B2[0, 1, 0] = 1 / _SQRT2
_B2[1, 1, 2] = _B2[1, 2, 1] = 1 / _SQRT2
_B2[2] = np.diag([-1.0, -1.0, 2.0]) / _SQRT6
_B2[3, 0, 2] = _B2[3, 2, 0] = 1 / _SQRT2
_B2[4] = np.diag([1.0, -1.0, 0.0]) / _SQRT2


# --------------------------------------------------------------------------- #
# targets
# --------------------------------------------------------------------------- #
def cartesian_to_spherical(tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (n, 3, 3) tensors into a0 (n,) and a2 (n, 5).

    a0 = -(xx + yy + zz)/sqrt(3); a2 = [(xy+yx)/sqrt(2), (yz+zy)/sqrt(2),
    (2zz-xx-yy)/sqrt(6), (xz+zx)/sqrt(2), (xx-yy)/sqrt(2)]. For symmetric
    tensors the map is orthonormal: |T|_F^2 = a0^2 + |a2|^2.
    """
    t = np.asarray(tensors, dtype=float)
    a0 = -np.trace(t, axis1=1, axis2=2) / _SQRT3
    # B_mu is symmetric, so <T, B_mu> symmetrises T: (xy + yx)/sqrt(2) etc.
    a2 = np.einsum("nij,mij->nm", t, _B2)
    return a0, a2


def spherical_to_cartesian(a0: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Inverse of :func:`cartesian_to_spherical` (the result is symmetric)."""
    a0 = np.asarray(a0, dtype=float)
    return -a0[:, None, None] / _SQRT3 * np.eye(3) + np.einsum("nm,mij->nij", a2, _B2)


def component_rmse(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """RMSE per Cartesian component and pooled, as in the reference table.

    Keys: xx xy xz yy yz zz; unique6 (the 6 upper-triangle components pooled);
    all9 (all 9 pooled); L0 (of a0, the -trace/sqrt(3) scalar); L2 (the 5
    components of a2 pooled).
    """
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    if true.shape != pred.shape or true.shape[1:] != (3, 3):
        raise ValueError(f"need two (n, 3, 3) arrays, got {true.shape} and {pred.shape}")
    err = pred - true
    out = {name: rmse(err[:, i, j]) for name, (i, j) in COMPONENTS.items()}
    rows, cols = np.array(list(COMPONENTS.values())).T
    out["unique6"] = rmse(err[:, rows, cols])
    out["all9"] = rmse(err)
    e0, e2 = cartesian_to_spherical(err)
    out["L0"] = rmse(e0)
    out["L2"] = rmse(e2)
    return out


# --------------------------------------------------------------------------- #
# estimator
# --------------------------------------------------------------------------- #
class SAGPR(BaseEstimator):
    """SA-GPR model of a symmetric rank-2 tensor (here the polarizability).

    Parameters
    ----------
    rc, sigma : float
        Cutoff radius and Gaussian density width (Angstrom) of the SOAP density.
    n_max, l_max : int
        Radial functions and maximum angular order of the density expansion.
    zeta : int
        Kernel exponent: atom-pair kernels are (p_a . p_b)^zeta for L=0 and
        (P_a P_b^T)(p_a . p_b)^(zeta-1) for L=2.
    nc : int or None
        Feature columns kept per lambda by farthest-point sampling (None: all;
        a lambda with at most nc features keeps them all).
        Fewer columns make kernels cheaper; on the workshop data nc=200 is
        within a few percent of the full model's error.
    reg0, reg2 : float
        Absolute ridge regularisation of the L=0 and L=2 regressions (the GP noise variance).
    seed : int
        Picks the first FPS column (and environment); fixes the sparsification for given data.
    n_env : int, None or "auto"
        None: the exact model (one weight per training frame). An integer M: a projected-process
        (Nystroem) model on M training environments chosen by ``env_selection``; the same
        regularisation, cost linear in the training atoms for any zeta, and with M = every
        training environment the exact model's predictions (a test checks this). "auto": M =
        ``env_auto_count`` when that is estimated cheaper than the exact model
        (:func:`hpo.models.sagpr.linear_kernels.choose_route`), else exact; ``n_env_`` says which.
    env_selection : {"fps", "cur", "random"}
        How the M environments are chosen, on their normalised lambda = 0 features.
    env_auto_count : int
        The M of ``n_env="auto"``.
    projection_atoms : int or None
        The nc columns and their A matrix are chosen on at most this many training atoms (whole
        frames spread through the set, :func:`projection_sample`); None: on every atom.
    kernel_memory_gb : float
        What the per-structure sums of factorised kernels may take at once: they are built in
        blocks of frames of this size, so it bounds memory without ever forcing the atom-pair route.
    cache_dir : str, path or None
        Directory for the on-disk cache of features and kernels (layout in
        :class:`hpo.cache.Cache`). Content-addressed, so safe to share
        between runs and parallel workers; it never changes results, only
        their cost.

    Fitted attributes: ``species_`` (sorted atomic numbers), ``mean0_``,
    ``basis_`` (the features the weights belong to: every training frame, or the n_env chosen
    environments as one-atom frames), ``w0_``, ``w2_``, ``timings_`` (seconds per stage of the last fit),
    ``predict_timings_``, ``cache_stats_`` (hit/miss counts), ``n_env_`` (the environments of the
    fit, None for the exact model), ``kernel_route_`` ("pairs", "factorised" or "sparsified") and
    ``route_costs_`` (the flop estimates it was chosen by).
    """

    # The config's table (hpo.models.sagpr.parameters) is the one source of allowed values.
    _parameter_constraints: dict = {
        **sklearn_constraints({key: PARAMETERS[key] for key in ESTIMATOR_KEYS}),
        "cache_dir": [str, os.PathLike, None],
    }

    def __init__(
        self,
        rc: float = 4.0,
        sigma: float = 0.3,
        n_max: int = 8,
        l_max: int = 6,
        zeta: int = 2,
        nc: int | None = 200,
        reg0: float = 1e-8,
        reg2: float = 1e-5,
        seed: int = 0,
        n_env: int | str | None = "auto",
        env_selection: str = "fps",
        env_auto_count: int = 2000,
        kernel_memory_gb: float = 1.0,
        projection_atoms: int | None = 10000,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.rc = rc
        self.sigma = sigma
        self.n_max = n_max
        self.l_max = l_max
        self.zeta = zeta
        self.nc = nc
        self.reg0 = reg0
        self.reg2 = reg2
        self.seed = seed
        self.n_env = n_env
        self.env_selection = env_selection
        self.env_auto_count = env_auto_count
        self.kernel_memory_gb = kernel_memory_gb
        self.projection_atoms = projection_atoms
        self.cache_dir = cache_dir

    # -- fit / predict --------------------------------------------------------
    def fit(self, frames: Sequence[ase.Atoms], tensors: np.ndarray) -> "SAGPR":
        """Learn from ``frames`` and their (n, 3, 3) ``tensors``."""
        self._validate_params()
        frames = list(frames)
        tensors = np.asarray(tensors, dtype=float)
        if tensors.shape != (len(frames), 3, 3):
            raise ValueError(
                f"tensors must have shape (n_frames, 3, 3) = ({len(frames)}, 3, 3), "
                f"got {tensors.shape}"
            )
        if not np.isfinite(tensors).all():
            raise ValueError("tensors contain NaN or infinite values")
        if not frames:
            raise ValueError("cannot fit on zero frames")
        _check_frames(frames)

        if self.n_env not in (None, "auto") and min(self.reg0, self.reg2) <= 0:
            raise ValueError(
                f"n_env={self.n_env} needs reg0 > 0 and reg2 > 0 (got {self.reg0}, {self.reg2}): "
                "the projected process is regularised by them"
            )

        cache = Cache(self.cache_dir)
        self.cache_stats_ = cache.stats
        t0 = time.perf_counter()
        self.species_ = np.unique(np.concatenate([a.numbers for a in frames]))
        sampled = projection_sample([len(atoms) for atoms in frames], self.projection_atoms) is not None
        # keyed by projection_atoms only where it changes the fit: caches of smaller sets stay valid
        self.fit_key_ = digest("fit", self._raw_key(), self.nc, self.seed, *([self.projection_atoms] if sampled else []), frame_digests(frames))
        state = cache.get("fit", self.fit_key_)
        if state is None:
            state = self._fit_features(frames, cache)
            cache.put("fit", self.fit_key_, state)
        self.projections_ = _projections_from_arrays(state)
        train = FeatureBlock(state["p0"], state["p2"], state["counts"])
        self.n_env_, self.kernel_route_, self.route_costs_ = choose_route(
            train, self.zeta, self.n_env, self.env_auto_count, self._kernel_bytes(), min(self.reg0, self.reg2) > 0
        )
        self.basis_ = train if self.n_env_ is None else self._environments(train)
        t1 = time.perf_counter()

        kernels_key = digest(self.fit_key_, self.zeta, self.n_env_, self.env_selection)
        kernels = cache.get("train_kernels", kernels_key)
        if kernels is None:
            sparse = self.n_env_ is not None
            k0, k2 = structure_kernels(train, self.basis_ if sparse else None, self.zeta, max_bytes=self._kernel_bytes())
            kernels = {"k0": k0, "k2": k2}
            if sparse:
                kernels["kmm0"], kernels["kmm2"] = structure_kernels(self.basis_, None, self.zeta, max_bytes=self._kernel_bytes())
            cache.put("train_kernels", kernels_key, kernels)
        t2 = time.perf_counter()

        a0, a2 = cartesian_to_spherical(tensors)
        # as in the original, only L=0 is centred: the mean L=2 part of
        # randomly oriented structures is zero
        self.mean0_ = float(a0.mean())
        n, m = len(frames), self.basis_.n_frames
        k0, k2 = kernels["k0"], kernels["k2"].reshape(5 * n, 5 * m)
        if self.n_env_ is None:
            self.w0_ = _ridge_solve(k0, self.reg0, a0 - self.mean0_)
            self.w2_ = _ridge_solve(k2, self.reg2, a2.ravel())
        else:
            kmm0, kmm2 = kernels["kmm0"], kernels["kmm2"].reshape(5 * m, 5 * m)
            self.w0_ = solve_projected_process(_jittered(kmm0), k0, a0 - self.mean0_, np.sqrt(self.reg0))
            self.w2_ = solve_projected_process(_jittered(kmm2), k2, a2.ravel(), np.sqrt(self.reg2))
        self.variance_ = self._posterior(kernels, n, m)
        if self.variance_:
            # the prior variance the targets show (the kernels' own is 1): std in the targets' units
            self.variance_["amplitude0"] = np.array(_amplitude(a0 - self.mean0_, self.w0_, k0 @ self.w0_, self.reg0, self.n_env_ is None))
            self.variance_["amplitude2"] = np.array(_amplitude(a2.ravel(), self.w2_, k2 @ self.w2_, self.reg2, self.n_env_ is None))
        # Training-set predictions come free with the training kernels; predict(frames) would rebuild
        # or reload them.
        self._primal = None  # folded weights, built by the first uncached predict()
        self.train_predictions_ = spherical_to_cartesian(k0 @ self.w0_ + self.mean0_, (k2 @ self.w2_).reshape(-1, 5))
        t3 = time.perf_counter()
        self.timings_ = {
            "features_s": t1 - t0,
            "kernels_s": t2 - t1,
            "solve_s": t3 - t2,
            "total_s": t3 - t0,
        }
        return self

    def _environments(self, train: FeatureBlock) -> FeatureBlock:
        """The n_env training environments of a sparsified fit, as one-atom frames.

        As one-atom frames, K(train, basis) is exactly the K_NM of the projected process and every
        kernel and prediction route (pairs, factorised, folded weights) applies unchanged.
        """
        chosen = select_sparse(train.x0, self.n_env_, self.env_selection, self.seed)
        return FeatureBlock(train.x0[chosen], train.x2[chosen], np.ones(len(chosen), dtype=np.int64))

    def _posterior(self, kernels: dict, n: int, m: int) -> dict[str, np.ndarray]:
        """Whiteners of the GP posterior, per lambda: var(g) = k_gg - |W_minus k_g|^2 + |W_plus k_g|^2.

        Exact model: W_minus^T W_minus = (K + reg I)^-1, no W_plus (the GP's closed form). Projected process
        (n_env): W_minus^T W_minus = K_MM^-1 and W_plus^T W_plus = (K_MM + K_MN K_NM / reg)^-1 (the deterministic
        training conditional, as for GAP: ``hpo.models.gap.posterior.Posterior``). The variance is the latent
        tensor's, without the noise reg, in units of the kernel (amplitude 1): ``fit`` adds the prior variance
        fitted to the targets (``_amplitude``), which ``_std`` multiplies in. Empty when a lambda has more than
        ``VARIANCE_MAX_COLUMNS`` weights.
        """
        out: dict[str, np.ndarray] = {}
        for lam, reg, width in ((0, self.reg0, 1), (2, self.reg2, 5)):
            k = kernels[f"k{lam}"].reshape(width * n, width * m)
            if width * m > VARIANCE_MAX_COLUMNS:
                return {}
            if self.n_env_ is None:
                out[f"minus{lam}"] = _whitener(k + reg * np.eye(len(k)))
            else:
                kmm = _jittered(kernels[f"kmm{lam}"].reshape(width * m, width * m))
                out[f"minus{lam}"] = _whitener(kmm)
                out[f"plus{lam}"] = _whitener(kmm + k.T @ k / reg)
        return out

    def _std(self, features: FeatureBlock, k0: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """(n, 3, 3) predictive std of each Cartesian component, from the kernels of ``features`` against the basis."""
        n = features.n_frames
        self_k0, self_k2 = np.zeros(n), np.zeros((n, 5, 5))
        for i, one in enumerate(features.split()):
            s0, s2 = structure_kernels(one, None, self.zeta)
            self_k0[i], self_k2[i] = s0[0, 0], s2[0, :, 0, :]
        v = self.variance_

        def whitened(name: str, rows: np.ndarray) -> np.ndarray:
            return v[name] @ rows.T if name in v else np.zeros((0, len(rows)))

        r0 = k0.reshape(n, -1)
        a, b = whitened("minus0", r0), whitened("plus0", r0)
        var0 = (self_k0 - np.einsum("ij,ij->j", a, a) + np.einsum("ij,ij->j", b, b)) * float(v.get("amplitude0", 1.0))
        r2 = k2.reshape(5 * n, -1)
        a, b = whitened("minus2", r2), whitened("plus2", r2)
        a, b = a.reshape(len(a), n, 5), b.reshape(len(b), n, 5)
        cov2 = (self_k2 - np.einsum("kim,kin->imn", a, a) + np.einsum("kim,kin->imn", b, b)) * float(v.get("amplitude2", 1.0))
        # T = -a0/sqrt(3) I + sum_mu a2_mu B_mu with a0 and a2 independent a priori and a posteriori
        var = np.maximum(var0, 0.0)[:, None, None] / 3.0 * np.eye(3) + np.einsum("imn,mab,nab->iab", cov2, _B2, _B2)
        # the calibration scale fitted on validation at promotion (hpo.calibration), when the model has one
        return float(v.get("scale", 1.0)) * np.sqrt(np.maximum(var, 0.0))

    def predict(
        self,
        frames: Sequence[ase.Atoms],
        progress: Callable[[int, int], None] | None = None,
        return_std: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted (n, 3, 3) symmetric tensors of ``frames``.

        Without a cache (and when the folded weights fit in PRIMAL_MAX_BYTES,
        e.g. zeta <= 2 at any nc, zeta 3 with nc of a few hundred) frames are
        streamed STREAM_CHUNK_ATOMS atoms at a time through :class:`PrimalWeights`:
        cost linear in the atoms, independent of the training-set size, and
        memory bounded whatever the trajectory length. With a cache, test
        kernels are built (and cached) per PREDICT_CHUNK_ATOMS atoms, so a
        refit with other regularisation reuses them. Both give the same
        numbers to round-off. ``progress(frames_done, total)`` is called after
        every chunk (e.g. to draw a progress bar).

        ``return_std`` (scikit-learn's convention): also the (n, 3, 3) posterior std of each component
        (``_posterior``), from kernels against the basis chunk by chunk (never the folded weights).
        """
        check_is_fitted(self, "w2_")
        if return_std and not getattr(self, "variance_", None):
            raise ValueError(f"this model keeps no posterior (more than {VARIANCE_MAX_COLUMNS} weights, or saved without one): no std")
        frames = list(frames)
        _check_frames(frames, self.species_)
        cache = Cache(self.cache_dir)
        timings = Counter()
        out = np.empty((len(frames), 3, 3))
        std = np.empty((len(frames), 3, 3)) if return_std else None
        primal = self._primal_weights() if cache.root is None and not return_std else None
        chunk_atoms = PREDICT_CHUNK_ATOMS if primal is None else STREAM_CHUNK_ATOMS
        for start, stop in frame_ranges([len(atoms) for atoms in frames], chunk_atoms):
            chunk = frames[start:stop]
            t0 = time.perf_counter()
            if primal is not None:  # streamed: weights folded into feature space, no training kernels
                features = self._transform(chunk, cache)
                t1 = time.perf_counter()
                a0, a2 = primal.predict(features)
            else:
                key = digest(self.fit_key_, self.zeta, self.n_env_, self.env_selection, frame_digests(chunk))
                kernels = cache.get("test_kernels", key)
                features = self._transform(chunk, cache) if kernels is None or return_std else None
                if kernels is None:
                    t1 = time.perf_counter()
                    k0, k2 = structure_kernels(features, self.basis_, self.zeta, max_bytes=self._kernel_bytes())
                    cache.put("test_kernels", key, {"k0": k0, "k2": k2})
                else:
                    t1 = time.perf_counter()
                    k0, k2 = kernels["k0"], kernels["k2"]
                a0 = k0 @ self.w0_ + self.mean0_
                a2 = (k2.reshape(5 * len(chunk), -1) @ self.w2_).reshape(-1, 5)
                if return_std:
                    std[start : start + len(chunk)] = self._std(features, k0, k2)
            out[start : start + len(chunk)] = spherical_to_cartesian(a0, a2)
            t2 = time.perf_counter()
            timings["features_s"] += t1 - t0
            timings["kernels_s"] += t2 - t1
            if progress is not None:
                progress(start + len(chunk), len(frames))
        self.predict_timings_ = dict(timings)
        self.cache_stats_ = getattr(self, "cache_stats_", Counter()) + cache.stats
        return (out, std) if return_std else out

    def _primal_weights(self) -> PrimalWeights | None:
        """The weights folded into feature space (built once per fit), or None if too large."""
        if getattr(self, "_primal", None) is None:
            if PrimalWeights.nbytes(self.basis_, self.zeta) > PRIMAL_MAX_BYTES:
                return None
            self._primal = PrimalWeights.fit(self.basis_, self.zeta, self.w0_, self.w2_, self.mean0_)
        return self._primal

    # -- persistence ----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to directory ``path`` (model.npz + metadata.json)."""
        check_is_fitted(self, "w2_")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {
            "species": self.species_,
            "mean0": np.array(self.mean0_),
            "w0": self.w0_,
            "w2": self.w2_,
            "basis_p0": self.basis_.x0,
            "basis_p2": self.basis_.x2,
            "basis_counts": self.basis_.counts,
            **_projections_to_arrays(self.projections_),
            **{f"variance_{k}": v for k, v in getattr(self, "variance_", {}).items()},
        }
        atomic_write_npz(path / "model.npz", **arrays)
        params = {
            k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.get_params().items()
        }
        meta = {
            "format": MODEL_FORMAT,
            "params": params,
            "species": [int(s) for s in self.species_],
            "n_basis": int(self.basis_.n_frames),
            "n_env_effective": self.n_env_,
            "kernel_route": self.kernel_route_,
            "fit_key": self.fit_key_,
            "versions": _versions(),
        }
        text = json.dumps(meta, indent=2, default=_json_scalar)
        write_text(path / "metadata.json", text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> "SAGPR":
        """Read a model written by :meth:`save`.

        ``cache_dir`` is not taken from the file: a saved model is an artefact
        that may move to another machine, the cache is a property of the run.
        """
        path = Path(path)
        meta = json.loads((path / "metadata.json").read_text())
        if meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path}: not an {MODEL_FORMAT} model (format {meta.get('format')!r})")
        params = dict(meta["params"], cache_dir=cache_dir)
        model = cls(**params)
        with np.load(path / "model.npz", allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        model.species_ = arrays["species"]
        model.mean0_ = float(arrays["mean0"])
        model.w0_, model.w2_ = arrays["w0"], arrays["w2"]
        basis = "basis" if "basis_p0" in arrays else "train"
        model.basis_ = FeatureBlock(arrays[f"{basis}_p0"], arrays[f"{basis}_p2"], arrays[f"{basis}_counts"])
        model.projections_ = _projections_from_arrays(arrays)
        model.variance_ = {k.removeprefix("variance_"): v for k, v in arrays.items() if k.startswith("variance_")}
        model.fit_key_ = meta["fit_key"]
        # models saved before n_env="auto" fitted exactly the n_env they were given
        model.n_env_ = meta.get("n_env_effective", meta["params"].get("n_env"))
        model.kernel_route_ = meta.get("kernel_route")
        model._primal = None
        model.cache_stats_ = Counter()
        return model

    # -- internals ------------------------------------------------------------
    def _kernel_bytes(self) -> float:
        return self.kernel_memory_gb * 1e9

    def _raw_key(self) -> str:
        """Everything raw features depend on besides the frame itself."""
        return digest(
            "raw", CACHE_VERSION, float(self.rc), float(self.sigma), int(self.n_max),
            int(self.l_max), [int(s) for s in self.species_], metadata.version("featomic"),
        )

    def _raw_features(
        self, frames: list[ase.Atoms], cache: "Cache", columns: tuple[np.ndarray, np.ndarray] | None = None
    ) -> FeatureBlock:
        """Raw features (only ``columns``, if given), cached per frame so any subset of seen frames is a hit.

        The cache holds every column, so a trial with another nc or seed reuses them.
        """
        species = self.species_
        if cache.root is None:
            return lambda_soap(frames, species, self.rc, self.sigma, self.n_max, self.l_max, columns)
        raw_key = self._raw_key()
        keys = [digest(raw_key, d) for d in frame_digests(frames)]
        cached = [cache.get("raw", k) for k in keys]
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            fresh = lambda_soap([frames[i] for i in missing], species, self.rc, self.sigma, self.n_max, self.l_max)
            for i, one in zip(missing, fresh.split()):
                cached[i] = {"x0": one.x0, "x2": one.x2, "counts": one.counts}
                cache.put("raw", keys[i], cached[i])
        raw = FeatureBlock.concatenate([FeatureBlock(c["x0"], c["x2"], c["counts"]) for c in cached])
        return raw if columns is None else _select(raw, columns)

    def _fit_features(self, frames: list[ase.Atoms], cache: "Cache") -> dict[str, np.ndarray]:
        """Sparsify (if nc) and normalise the training features; arrays to cache.

        Two passes over chunks of frames, so no (atoms x all columns) array of the whole training
        set is ever needed: the first sums the column Gram matrices the FPS columns and A matrices
        are chosen from (over at most ``projection_atoms`` atoms: :func:`projection_sample`), the
        second computes only the kept columns of every frame, projects and normalises them.
        Raw chunks of the first pass are reused by the second while they fit in RAW_KEEP_BYTES.
        """
        chunks = [frames[start:stop] for start, stop in frame_ranges([len(atoms) for atoms in frames], FEATURE_CHUNK_ATOMS)]
        projections, kept = None, None
        if self.nc is not None:
            sample = projection_sample([len(atoms) for atoms in frames], self.projection_atoms)
            sampled = frames if sample is None else [frames[i] for i in sample]
            gram0 = gram2 = 0.0
            # raw chunks are reusable by the second pass only when the first saw every frame
            kept, held = ([], 0) if sample is None else (None, 0)
            for chunk in [sampled[a:b] for a, b in frame_ranges([len(atoms) for atoms in sampled], FEATURE_CHUNK_ATOMS)]:
                raw = self._raw_features(chunk, cache)
                gram0 = gram0 + column_gram(raw.x0)
                gram2 = gram2 + column_gram(raw.x2)  # lambda = 2 rows are (atom, mu): FPS and A see all 5
                held += raw.x0.nbytes + raw.x2.nbytes
                if kept is not None:
                    kept.append(raw)
                    if held > RAW_KEEP_BYTES:  # too large to keep: the second pass computes them again
                        kept = None
            # nc is "at most": a lambda with fewer features keeps them all, as gap_fit caps n_sparse,
            # so a search over nc and the descriptor size never samples an impossible pair
            projections = tuple(
                fit_projection(gram, min(self.nc, len(gram)), self.seed) for gram in (gram0, gram2)
            )
        blocks = [
            self._project(chunk, cache, projections, None if kept is None else kept[i])
            for i, chunk in enumerate(chunks)
        ]
        train = FeatureBlock.concatenate(blocks)
        return {"counts": train.counts, "p0": train.x0, "p2": train.x2, **_projections_to_arrays(projections)}

    def _project(self, frames, cache, projections, raw: FeatureBlock | None = None) -> FeatureBlock:
        """Normalised features of ``frames`` through ``projections`` (None: all columns).

        ``raw``: their full raw features, if already at hand; otherwise only the kept columns are
        computed.
        """
        columns = None if projections is None else tuple(p.columns for p in projections)
        if raw is None:
            raw = self._raw_features(frames, cache, columns)
        elif columns is not None:
            raw = _select(raw, columns)
        x0, x2 = raw.x0, raw.x2
        if projections is not None:
            x0, x2 = x0 @ projections[0].matrix, x2 @ projections[1].matrix
        p0, p2 = normalise(x0, x2)
        return FeatureBlock(p0, p2, raw.counts)

    def _transform(self, frames: list[ase.Atoms], cache: "Cache") -> FeatureBlock:
        """Normalised features of new frames, projected like the training set."""
        return self._project(frames, cache, self.projections_)


def predict_file(
    model: SAGPR, xyz_path: str | os.PathLike, out_path: str | os.PathLike
) -> np.ndarray:
    """Predict every frame of an extended-XYZ file; write 9 numbers per line.

    Each line of ``out_path`` is one frame's tensor, row-major (xx xy xz yx ...),
    the layout of the ``Polarizability`` key. Returns the (n, 3, 3) predictions.
    """
    frames = ase.io.read(str(xyz_path), ":")
    tensors = model.predict(frames)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(out_path, tensors.reshape(len(frames), 9), fmt="%.10f")
    return tensors


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_frames(frames: list[ase.Atoms], species: np.ndarray | None = None) -> None:
    """Reject frames the features cannot describe: empty, or with unknown species."""
    known = None if species is None else set(species.tolist())
    for index, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise ValueError(f"frame {index} has no atoms")
        unseen = set() if known is None else set(atoms.numbers.tolist()) - known
        if unseen:
            names = ", ".join(ase.data.chemical_symbols[z] for z in sorted(unseen))
            trained = ", ".join(ase.data.chemical_symbols[z] for z in sorted(known))
            raise ValueError(
                f"frame {index} contains species {names} not seen in training "
                f"(the model knows {trained})"
            )


def projection_sample(sizes: list[int], max_atoms: int | None) -> np.ndarray | None:
    """Frames whose column Gram matrices choose the nc columns and the A matrix: None (every frame) when
    the training set has at most ``max_atoms`` atoms, else every k-th frame, k the smallest step that
    keeps the sample within ``max_atoms`` (at least one frame).

    All atoms x all lambda = 2 columns (4096 at n_max 8, l_max 6) is the costliest part of a bulk fit
    (80000 atoms: a 3e12-flop Gram matrix, and every raw feature computed twice); a sample of frames
    spread through the set fixes the same column space for a fraction of it.
    """
    total = sum(sizes)
    if max_atoms is None or total <= max_atoms:
        return None
    step = -(-total // max_atoms)
    while step < len(sizes) and sum(sizes[::step]) > max_atoms:
        step += 1
    return np.arange(0, len(sizes), step)


def _select(raw: FeatureBlock, columns: tuple[np.ndarray, np.ndarray]) -> FeatureBlock:
    return FeatureBlock(raw.x0[:, columns[0]], raw.x2[..., columns[1]], raw.counts)


def _jittered(k_mm: np.ndarray) -> np.ndarray:
    return k_mm + ENV_JITTER * np.eye(len(k_mm))


def _whitener(a: np.ndarray) -> np.ndarray:
    """W with W^T W = a^-1 (a symmetric positive definite): L^-1 of a's Cholesky factor, or, when a is
    numerically singular (tiny reg on a near-singular kernel), diag(w^-1/2) V^T of its eigenpairs above
    round-off."""
    try:
        lower = scipy.linalg.cholesky(a, lower=True)
        return scipy.linalg.solve_triangular(lower, np.eye(len(a)), lower=True)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(a)
        keep = w > w.max() * len(a) * np.finfo(float).eps
        return (v[:, keep] / np.sqrt(w[keep])).T


def _amplitude(y: np.ndarray, weights: np.ndarray, fitted: np.ndarray, reg: float, exact: bool) -> float:
    """The maximum-likelihood prior variance s^2 of the GP y ~ N(0, s^2 (C + reg I)), C the kernel (exact) or its
    projected-process approximation: y^T (C + reg I)^-1 y / N. The mean does not depend on s; the predictive
    variance scales with it. Exact: y^T w with (K + reg I) w = y. Projected process (Woodbury):
    (y^T y - y^T K_NM w) / reg, K_NM w being the fitted values."""
    quadratic = float(y @ weights) if exact else float(y @ (y - fitted)) / reg
    return max(quadratic, 0.0) / len(y)


def _ridge_solve(k: np.ndarray, reg: float, y: np.ndarray) -> np.ndarray:
    """Solve (K + reg I) w = y; Cholesky when K + reg I is numerically PD."""
    a = k + reg * np.eye(len(k))
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True), y)
    except np.linalg.LinAlgError:
        # tiny reg on a near-singular kernel (e.g. reg0=1e-8): fall back to LU
        return scipy.linalg.solve(a, y, assume_a="sym")


def _projections_to_arrays(projections) -> dict[str, np.ndarray]:
    if projections is None:
        return {}
    return {
        f"proj{lam}_{field}": getattr(p, field)
        for lam, p in zip((0, 2), projections)
        for field in ("columns", "matrix")
    }


def _projections_from_arrays(arrays) -> tuple[Projection, Projection] | None:
    if "proj0_columns" not in arrays:
        return None
    return tuple(
        Projection(arrays[f"proj{lam}_columns"], arrays[f"proj{lam}_matrix"]) for lam in (0, 2)
    )


def _json_scalar(value):
    """json.dumps fallback: numpy scalars arrive from search libraries (np.int64 nc)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in metadata.json")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("hpo", "featomic", "metatensor-core", "numpy", "scipy", "scikit-learn", "ase"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out
