"""`hpo compare` end to end: a GAP and a ridge model (the dummy third kind) searched, screened and promoted on the
same EMT splits, then side by side from the registry."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from helpers import files_overrides, make_cfg
from hpo.config import load_config, output_overrides
from hpo.registry.compare import COLUMNS, compare
from hpo.registry.promote import promote
from hpo.registry.resolve import PromoteError
from hpo.search import loop

# slow (pyproject.toml markers): two studies and their promotions
pytestmark = pytest.mark.slow


def test_champions_of_two_kinds_side_by_side(promoted_emt_gap, capsys):
    """The session's promoted GAP (conftest ``promoted_emt_gap``) and a ridge model promoted on the same splits."""
    tmp_path, emt = promoted_emt_gap["root"], promoted_emt_gap["emt"]
    promoted = {"gap": promoted_emt_gap["lineage"]}
    cfg = load_config([*output_overrides(tmp_path), *files_overrides(emt), "model=ridge", "study.n_trials=1",
                       "promote.screen.k=1", "promote.screen.steps=10"])
    loop.run(cfg)
    promoted["ridge"] = promote(cfg)

    rows = compare(make_cfg(tmp_path, *files_overrides(emt)))
    assert [(r.name, r.kind, r.version) for r in rows] == [("files-gap", "gap", "1"), ("files-ridge", "ridge", "1")]
    for row in rows:
        lineage = promoted[row.kind]
        for header, key, factor in (("test force RMSE (eV/Å)", "test_force_rmse", 1.0), ("test energy RMSE (meV/atom)", "test_energy_rmse_per_atom", 1000.0),
                                    ("fit time of the trial (s)", "metric.fit_time_s", 1.0)):
            assert row.values[header] == (pytest.approx(factor * float(lineage[key])) if key in lineage else None)
        assert row.values["MD stable"] == lineage["md_stable"]
        assert row.values["MD cost (ms per atom-step)"] > 0  # the screening MD's own timing
    assert rows[0].values["test force RMSE (eV/Å)"] > 0  # GAP is tested on forces
    out = capsys.readouterr().out
    assert "| files-gap | gap | 1 |" in out and "Same data: sha256.train.xyz" in out and "WARNING" not in out

    outdir = tmp_path / "experiments" / "compare"
    assert (outdir / "compare.md").read_text().splitlines()[0].count("|") == len(COLUMNS) + 5
    assert (outdir / "compare.png").read_bytes()[:4] == b"\x89PNG" and len((outdir / "compare.csv").read_text().splitlines()) == 3
    cfg = make_cfg(tmp_path, *files_overrides(emt))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id], "tags.run_type = 'compare'")[0]
    assert run.data.tags["compared"] == "files-gap v1, files-ridge v1"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"compare.md", "compare.csv", "compare.png"}

    with pytest.raises(PromoteError, match="'files-mace' has no version with the alias 'champion'"):
        compare(make_cfg(tmp_path, *files_overrides(emt), "compare.models=[files-gap,files-mace]"))
