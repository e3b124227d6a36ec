"""Tests of hpo.cli that need no command run: the process's thread share."""

from __future__ import annotations

import os

from hpo.cli import apply_threads
from hpo.config import load_config


def test_a_commands_process_gets_its_share_of_threads_in_the_environment(monkeypatch):
    """torch reads OMP_NUM_THREADS when first imported: without it, a MACE's MD in an `hpo md` or `hpo promote`
    process ran on every core whatever `threads` said."""
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("MKL_NUM_THREADS", "8")
    assert apply_threads(load_config(["threads=1"])) == 1 and os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    assert apply_threads(load_config(["threads=6", "study.n_workers=2"])) == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    assert apply_threads(load_config(["threads=1", "study.n_workers=4"])) == 1
