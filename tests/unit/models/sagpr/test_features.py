"""Tests of hpo.models.sagpr.features: farthest-point columns (against skmatter), frame ranges within a budget."""

from __future__ import annotations

import numpy as np

from hpo.models.sagpr.features import farthest_point_columns


def test_fps_matches_skmatter():
    from skmatter.feature_selection import FPS

    x = np.random.default_rng(3).normal(size=(60, 40)) ** 3
    for seed in range(4):
        expected = FPS(n_to_select=15, initialize="random", random_state=seed).fit(x).selected_idx_
        np.testing.assert_array_equal(farthest_point_columns(x.T @ x, 15, seed), expected)


def test_frame_ranges_hold_whole_frames_within_the_budget():
    from hpo.models.sagpr.features import frame_ranges

    counts = [3, 3, 5, 1, 10, 2]
    assert list(frame_ranges(counts, 6)) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # a 10-atom frame alone, not split
    assert list(frame_ranges(counts, 100)) == [(0, 6)]
    assert list(frame_ranges(counts, 6, start=2)) == [(2, 4), (4, 5), (5, 6)]
    assert list(frame_ranges([], 6)) == []
