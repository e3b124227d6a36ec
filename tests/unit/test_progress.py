"""Tests of hpo.progress: the progress bar on a terminal and in a log."""

from __future__ import annotations

import io

from hpo.progress import Bar


def test_progress_bar_on_a_terminal_and_in_a_log():
    log = io.StringIO()
    with Bar(4, "[hpo] NVE MD", "steps", stream=log, tty=False, every_s=3600) as bar:
        for _ in range(4):
            bar.update()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[hpo] NVE MD: 1/4 steps (25%)") and lines[-1].startswith("[hpo] NVE MD: 4/4 steps (100%)")
    assert len(lines) == 2 and "\r" not in log.getvalue()  # one line per every_s, and the last

    tty = io.StringIO()
    with Bar(2, "MD", "steps", stream=tty, tty=True) as bar:
        bar.update()
        bar.update()
    assert tty.getvalue().count("\r") == 3 and "[" + "#" * Bar.WIDTH + "] 2/2 steps" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
