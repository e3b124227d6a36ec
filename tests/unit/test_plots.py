"""Tests of hpo.plots: the energy parity plot and plain tick labels."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from hpo import plots


def test_energy_parity_is_per_atom_relative_with_plain_ticks(tmp_path):
    atoms = np.full(5, 12)
    true = -5600.0 + np.linspace(0, 0.5, 5)  # eV per cell: thousands of eV, differing in the last digits
    path = plots.energy_parity_plot(tmp_path / "parity_energy.png", {"train": (true, true + 0.01, atoms), "validation": (true, true - 0.02, atoms)}, "t")
    assert path.is_file()
    fig, ax = plt.subplots()
    ax.plot([20000.001, 20000.002], [1e-4, 2e-4])
    plots.plain_ticks(ax)
    fig.canvas.draw()
    assert ax.xaxis.get_major_formatter().get_offset() == "" and ax.yaxis.get_major_formatter().get_offset() == ""
    plt.close(fig)
