"""Tests of hpo.models.gap.descriptors: the descriptor cache key."""

from __future__ import annotations

from hpo.models.gap.descriptors import descriptor_key


def test_descriptor_key_ignores_gp_settings_and_spacing():
    a = "soap cutoff=3.0 n_max=2 l_max=2 n_sparse=20 delta=1.0 zeta=2 species_Z={8 1 }"
    b = "soap  l_max=2 cutoff=3.0 n_max=2 n_sparse=400 delta=0.1 zeta=4 species_Z={8  1}"
    assert descriptor_key(a) == descriptor_key(b)
    assert descriptor_key(a) != descriptor_key(a.replace("cutoff=3.0", "cutoff=3.5"))
