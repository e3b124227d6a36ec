"""The comparison table of hpo.registry.compare: cells in their units, missing values said, and a warning when the
models were not trained and tested on the same data."""

from __future__ import annotations

from hpo.registry.compare import COLUMNS, Row, _value, markdown, same_splits


def _row(name: str, train_sha: str, **values) -> Row:
    cells = {c.header: None for c in COLUMNS} | values
    return Row(name, "gap", "1", "s", "0", cells, {"sha256.train.xyz": train_sha, "test_split_sha256": "t" * 64}, "")


def test_rows_on_different_training_files_are_flagged():
    same = [_row("a", "x" * 64), _row("b", "x" * 64)]
    assert same_splits(same) == [] and "WARNING" not in markdown(same) and "Same data: sha256.train.xyz xxxxxxxxxxxx" in markdown(same)
    other = [_row("a", "x" * 64), _row("b", "y" * 64)]
    assert same_splits(other) == ["sha256.train.xyz"]
    assert "WARNING: the models were not trained and tested on the same data: sha256.train.xyz differ." in markdown(other)


def test_values_come_from_tags_or_the_screens_mean_in_the_columns_units():
    energy, cost = COLUMNS[0], COLUMNS[4]
    assert _value(energy, {"test_energy_rmse_per_atom": "0.00181"}, {}) == 1.81  # eV/atom -> meV/atom
    runs = {"screen.start0.ms_per_atom_per_step": 1.0, "screen.start1.ms_per_atom_per_step": 2.0, "screen.start0.wall_time_s": 9.0}
    assert _value(cost, {"metric.md_ms_per_atom": "7"}, runs) == 1.5  # the screen first, averaged over its start frames
    assert _value(cost, {"metric.md_ms_per_atom": "7"}, {}) == 7.0  # else the trial's own timing
    assert _value(cost, {}, {}) is None
    line = markdown([_row("a", "x", **{energy.header: 1.81})]).splitlines()[2]
    assert line.startswith("| a | gap | 1 | s (0) | 1.81 | n/a |")
