"""What the data look like, for people: summary statistics, the check table for a terminal, and a plot
of the energy and force distributions (``hpo data check`` prints and records them)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import ase
import numpy as np
from ase.data import atomic_numbers

from hpo.safe_files import atomic_write
from hpo.data.checks import Check
from hpo.data.read import Keys, energy_of, forces_of, is_isolated_atom, tensor_of
from hpo.progress import format_value


def statistics(frames: Sequence[ase.Atoms], keys: Keys) -> dict:
    """Summary numbers of a set (isolated atoms counted but left out of energies and forces).

    Keys: frames, isolated_atoms, atoms_min, atoms_max, species (symbol -> atom count),
    cell_length_min/max (Angstrom, periodic frames), volume_per_atom_min/max (Angstrom^3),
    energy_per_atom_mean/std/min/max (eV/atom), force_rms and force_max (eV/Angstrom),
    polarizability_frames. Missing quantities are None.
    """
    bulk = [atoms for atoms in frames if not is_isolated_atom(atoms)]
    species = Counter(s for atoms in frames for s in atoms.get_chemical_symbols())
    periodic = [atoms for atoms in bulk if atoms.pbc.all() and atoms.cell.volume > 0]
    lengths = np.array([atoms.cell.lengths() for atoms in periodic]) if periodic else None
    volumes = np.array([atoms.cell.volume / len(atoms) for atoms in periodic]) if periodic else None
    per_atom = np.array([energy_of(atoms, keys.energy) / len(atoms) for atoms in bulk]) if bulk else np.array([])
    per_atom = per_atom[np.isfinite(per_atom)]
    forces = [forces_of(atoms, keys.forces) for atoms in bulk]
    forces = [f for f in forces if f is not None and np.isfinite(f).all()]
    norms = np.linalg.norm(np.concatenate(forces), axis=1) if forces else None

    def stat(values, reduce):
        return None if values is None or len(values) == 0 else float(reduce(values))

    return {
        "frames": len(frames),
        "isolated_atoms": len(frames) - len(bulk),
        "atoms_min": min((len(a) for a in frames), default=None),
        "atoms_max": max((len(a) for a in frames), default=None),
        "species": dict(sorted(species.items(), key=lambda item: atomic_numbers[item[0]])),
        "cell_length_min": stat(lengths, np.min),
        "cell_length_max": stat(lengths, np.max),
        "volume_per_atom_min": stat(volumes, np.min),
        "volume_per_atom_max": stat(volumes, np.max),
        "energy_per_atom_mean": stat(per_atom, np.mean),
        "energy_per_atom_std": stat(per_atom, np.std),
        "energy_per_atom_min": stat(per_atom, np.min),
        "energy_per_atom_max": stat(per_atom, np.max),
        "force_rms": stat(norms, lambda n: np.sqrt(np.mean(n**2) / 3)),
        "force_max": stat(norms, np.max),
        "polarizability_frames": sum(tensor_of(atoms, keys.polarizability) is not None for atoms in frames),
    }


# Rows of the statistics table: (label, statistics keys, unit). Data, so a new row is one line.
STAT_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("frames (isolated atoms)", ("frames", "isolated_atoms"), ""),
    ("atoms per frame min/max", ("atoms_min", "atoms_max"), ""),
    ("cell length min/max", ("cell_length_min", "cell_length_max"), "A"),
    ("volume per atom min/max", ("volume_per_atom_min", "volume_per_atom_max"), "A^3"),
    ("energy per atom mean/std", ("energy_per_atom_mean", "energy_per_atom_std"), "eV/atom"),
    ("energy per atom min/max", ("energy_per_atom_min", "energy_per_atom_max"), "eV/atom"),
    ("force rms (component)/max |F|", ("force_rms", "force_max"), "eV/A"),
    ("frames with polarizability", ("polarizability_frames",), ""),
)
VERDICT_MARKS: dict[str, str] = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def render_table(checks: Sequence[Check], stats: Mapping[str, Mapping] | Mapping | None = None) -> str:
    """Plain-text report for a terminal: one line per check, then statistics.

    ``stats`` is one :func:`statistics` dict or a dict of them keyed by split label
    (one column per split).
    """
    width = max((len(c.name) for c in checks), default=5)
    lines = [f"{'check':<{width}}  verdict  message"]
    lines += [f"{c.name:<{width}}  {VERDICT_MARKS[c.verdict]:<7}  {c.message}" for c in checks]
    if stats:
        columns = stats if all(isinstance(v, Mapping) and "frames" in v for v in stats.values()) else {"all": stats}
        label_width = max(len(row[0]) for row in STAT_ROWS) + 8
        lines += ["", f"{'statistics':<{label_width}}" + "".join(f"{name:>24}" for name in columns)]
        species = {name: ", ".join(f"{s} {n}" for s, n in col["species"].items()) for name, col in columns.items()}
        lines.append(f"{'species (atoms)':<{label_width}}" + "".join(f"{species[name]:>24}" for name in columns))
        for label, names, unit in STAT_ROWS:
            head = f"{label} ({unit})" if unit else label
            cells = ["/".join(format_value(col.get(key), 6) for key in names) for col in columns.values()]
            lines.append(f"{head:<{label_width}}" + "".join(f"{cell:>24}" for cell in cells))
    failed = sum(c.verdict == "fail" for c in checks)
    warned = sum(c.verdict == "warn" for c in checks)
    lines += ["", f"{len(checks)} checks: {failed} failed, {warned} warnings"]
    return "\n".join(lines)


def distributions_plot(path: str | Path, frames: Sequence[ase.Atoms], keys: Keys, title: str) -> Path:
    """PNG with two histograms: energy per atom (eV/atom) and per-atom |F| (eV/Angstrom).

    Isolated atoms are left out; a missing quantity leaves its panel with a note.
    Uses the Agg canvas directly, so no pyplot state or display is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    bulk = [atoms for atoms in frames if not is_isolated_atom(atoms)]
    per_atom = np.array([energy_of(atoms, keys.energy) / len(atoms) for atoms in bulk])
    per_atom = per_atom[np.isfinite(per_atom)]
    forces = [forces_of(atoms, keys.forces) for atoms in bulk]
    forces = [f for f in forces if f is not None and np.isfinite(f).all()]
    norms = np.linalg.norm(np.concatenate(forces), axis=1) if forces else np.array([])

    figure = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(figure)
    # Energies per atom are large with a small spread (-688.81 +- 0.01 eV for water):
    # plotted relative to their mean, which the label states, so the ticks stay readable.
    mean = float(np.mean(per_atom)) if len(per_atom) else 0.0
    force_legend = f"mean {np.mean(norms):.3g} eV/Å" if len(norms) else ""
    panels = (
        (per_atom - mean, f"energy per atom ({keys.energy}) - mean (eV/atom)", "frames", f"mean {mean:.6g} eV/atom"),
        (norms, f"|F| per atom ({keys.forces}) (eV/Å)", "atoms", force_legend),
    )
    for position, (values, xlabel, ylabel, legend) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, position)
        if len(values):
            axes.hist(values, bins=min(40, max(5, len(values) // 3)), color="tab:blue", alpha=0.8)
            axes.axvline(np.mean(values), color="k", ls="--", lw=1, label=legend)
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(6))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
