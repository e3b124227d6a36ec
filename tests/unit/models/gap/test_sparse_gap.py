"""Tests of hpo.models.gap.sparse_gap: a fitted GAP's energies in numpy equal quippy's; the descriptor cache."""

from __future__ import annotations

import numpy as np
import pytest

from hpo.models.gap import gap_fit as gap
from hpo.cache import Cache
from hpo.config import model_params
from hpo.data import load_datasets
from hpo.models.gap.descriptors import descriptor_key
from hpo.models.gap.sparse_gap import SparseGap


@pytest.fixture
def fitted(tiny_cfg, tmp_path):
    """A tiny GAP fitted by gap_fit, with the frames it was trained and validated on."""
    cfg = tiny_cfg()
    data = load_datasets(cfg)
    model = model_params(cfg)
    model["n_sparse"] = gap.effective_n_sparse(model["n_sparse"], data.train.frames)
    result = gap.GAP(model, dict(cfg.dataset.e0), cfg.dataset.property_keys).fit(data.train.path, tmp_path / "fit")
    return model, data, result.model_file_


def quippy_energies(model_file, frames) -> np.ndarray:
    energies, _ = gap.predict(gap.load(model_file), frames)
    return energies


@pytest.mark.slow
def test_numpy_energies_equal_quippy(fitted, tmp_path):
    model, data, model_file = fitted
    frames = data.train.frames + data.val.frames
    sparse = SparseGap.read(model_file)
    assert len(sparse.gps) == 2  # one sparse GP per centre species (H, O)
    difference = np.abs(sparse.predict(frames) - quippy_energies(model_file, frames))
    assert difference.max() < 1e-6

    # The descriptors hpo computes while gap_fit runs are the ones gap_fit writes into the model.
    expected = sorted(descriptor_key(d) for d in gap.expected_descriptors(model, data.train.frames))
    assert expected == sorted(descriptor_key(d) for d in sparse.descriptors)


def test_descriptor_cache_is_reused_and_exact(fitted, tmp_path):
    _, data, model_file = fitted
    sparse = SparseGap.read(model_file)
    cache = Cache(tmp_path / "cache")
    n = len(data.val.frames)  # entries are per frame and per descriptor (2 species)
    first = sparse.predict(data.val.frames, cache)
    assert cache.stats["gap_descriptors_miss"] == 2 * n and cache.stats["gap_descriptors_hit"] == 0
    second = sparse.predict(data.val.frames, cache)
    assert cache.stats["gap_descriptors_hit"] == 2 * n
    np.testing.assert_array_equal(first, second)
    # A subset of seen frames is all hits; a moved frame is a new entry, never a stale hit.
    sparse.predict(data.val.frames[:3], cache)
    assert cache.stats["gap_descriptors_hit"] == 2 * n + 6 and cache.stats["gap_descriptors_miss"] == 2 * n
    moved = data.val.frames[0].copy()
    moved.positions[0, 0] += 1e-9
    sparse.predict([moved], cache)
    assert cache.stats["gap_descriptors_miss"] == 2 * n + 2
