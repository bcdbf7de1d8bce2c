"""expreg.prepare with several worker processes writes what one process writes, byte for byte."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
from test_map import SPOT_PITCH_UM, make_spaceranger

from expreg.data.h5ad import read_h5ad
from expreg.ingest.errors import IngestError
from expreg.ingest.prepare import Options, prepare


def three_sample_sheet(tmp_path):
    """Space Ranger sections S1, S2, S3 (20 spots each, patients P0-P2) under ``tmp_path/sr`` and their sheet."""
    rows = ["sample_id,group_id,path"]
    for k, name in enumerate(("S1", "S2", "S3")):
        sample, _ = make_spaceranger(tmp_path / "sr", name, seed=k)
        rows.append(f"{name},P{k},{sample}")
    (tmp_path / "sheet.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "sheet.csv"


def test_two_workers_write_the_same_patches_and_tables_as_one(tmp_path):
    three_sample_sheet(tmp_path)
    outs = {}
    for workers in (1, 2):
        options = Options(patch_um=112.0, patch_px=48, spot_pitch_um=SPOT_PITCH_UM, num_workers=workers)
        summary = prepare(tmp_path / "sheet.csv", tmp_path / f"w{workers}", options)
        assert summary["spots"] == 60 and summary["inputs"]["num_workers"] == workers
        outs[workers] = tmp_path / f"w{workers}"
    one, two = outs[1], outs[2]
    files = sorted(p.relative_to(one) for p in (one / "patches").rglob("*.png"))
    assert len(files) == 60 and files == sorted(p.relative_to(two) for p in (two / "patches").rglob("*.png"))
    match, mismatch, errors = filecmp.cmpfiles(one, two, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == 60
    assert (one / "metadata.csv").read_bytes() == (two / "metadata.csv").read_bytes()
    a, b = read_h5ad(one / "expression.h5ad"), read_h5ad(two / "expression.h5ad")
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    samples = [json.loads((o / "prepare.json").read_text())["samples"] for o in (one, two)]
    assert [s["spots_kept"] for s in samples[0]] == [s["spots_kept"] for s in samples[1]]
    with pytest.raises(IngestError, match="--num_workers 0"):
        prepare(tmp_path / "sheet.csv", tmp_path / "w0", Options(num_workers=0))
