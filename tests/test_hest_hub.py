"""HEST-1k by id through huggingface_hub, offline: a stand-in of ``MahmoodLab/hest`` in a HuggingFace cache.

The cache holds what ``snapshot_download`` leaves there (``datasets--MahmoodLab--hest/refs/main`` and
``snapshots/<commit>/``): two metadata tables (the newest is used), samples S1 (patient P1, Breast) and
S2 (P2, Lung) with ``st/``, ``wsis/`` and ``metadata/`` files. With ``HF_HUB_OFFLINE=1`` (as the tests
run) the real hub code reads the cache; what it cannot find there is the error a user without network
or without access would see.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_prepare import _hest_root

from expreg.datasets import main
from expreg.ingest.prepare import Options, prepare

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path) -> Path:
    repo = tmp_path / "hf" / "datasets--MahmoodLab--hest"
    snapshot = repo / "snapshots" / COMMIT
    _hest_root(snapshot)
    for folder, suffix in (("st", ".h5ad"), ("wsis", ".tif"), ("metadata", ".json")):
        shutil.copy(snapshot / folder / f"S1{suffix}", snapshot / folder / f"S2{suffix}")
    columns = "id,patient,organ,st_technology,species,dataset_title\n"
    (snapshot / "HEST_v1_0_0.csv").write_text(columns + "S1,P1,Breast,Visium,Homo sapiens,A\n")
    (snapshot / "HEST_v1_1_0.csv").write_text(
        columns
        + "S1,P1,Breast,Visium,Homo sapiens,A\nS2,P2,Lung,Visium,Homo sapiens,B\nS3,,Lung,Xenium,Homo sapiens,B\n"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hf"


def test_samples_by_id_become_the_hest_layout_and_a_sheet_prepare_reads(cache, tmp_path, capsys):
    out = tmp_path / "hest"
    assert main(["hest", "--ids", "S1", "S2", "--out", str(out), "--cache_dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "2 HEST-1k sample(s) (S1, S2) from MahmoodLab/hest (HEST_v1_1_0.csv)" in printed  # the newest table
    for sid in ("S1", "S2"):
        for name in (f"st/{sid}.h5ad", f"wsis/{sid}.tif", f"metadata/{sid}.json"):
            assert (out / name).is_symlink() and (out / name).resolve().is_relative_to(cache.resolve()), name
    assert not (out / "patches").exists()  # only with --patches
    sheet = pd.read_csv(out / "samples.csv")
    assert sheet.to_dict("list") == {"sample_id": ["S1", "S2"], "group_id": ["P1", "P2"], "path": [".", "."]}
    summary = prepare(out / "samples.csv", tmp_path / "prepared", Options(patch_um=32, patch_px=32))
    assert [s["layout"] for s in summary["samples"]] == ["hest", "hest"] and summary["spots"] == 24
    assert main(["hest", "--ids", "S1", "--out", str(out), "--cache_dir", str(cache)]) == 2
    assert "already holds samples.csv" in capsys.readouterr().err
    assert main(["hest", "--ids", "S1", "--out", str(out), "--cache_dir", str(cache), "--overwrite"]) == 0


def test_selection_by_metadata_and_the_errors_that_say_what_exists(cache, capsys):
    assert main(["hest", "--where", "organ=breast", "--list", "--cache_dir", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert "S1" in listed and "S2" not in listed and "1 sample(s) of 3 in HEST_v1_1_0.csv" in listed
    assert main(["hest", "--where", "organ=Kidney", "--list", "--cache_dir", str(cache)]) == 2
    assert "no sample has it; organ takes values Breast, Lung" in capsys.readouterr().err
    assert main(["hest", "--ids", "S11", "--list", "--cache_dir", str(cache)]) == 2
    assert "unknown HEST-1k id(s) in HEST_v1_1_0.csv: S11 (did you mean S1" in capsys.readouterr().err
    assert main(["hest", "--where", "tissue=x", "--list", "--cache_dir", str(cache)]) == 2
    assert "expected column=value with a column of HEST_v1_1_0.csv (id, patient, organ" in capsys.readouterr().err
    assert main(["hest", "--ids", "S3", "--out", str(cache.parent / "o"), "--cache_dir", str(cache)]) == 2
    assert "sample S3 lacks st/S3.h5ad" in capsys.readouterr().err  # in the table, not in this snapshot


def test_no_network_and_a_gated_dataset_fail_in_one_line_that_says_what_to_do(tmp_path, monkeypatch, capsys):
    assert main(["hest", "--ids", "S1", "--out", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the HuggingFace cache given and the Hub cannot be reached" in err
    assert not (tmp_path / "o").exists()
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "401 Client Error: access to this dataset is restricted")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    assert main(["hest", "--ids", "S1", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "MahmoodLab/hest is gated: accept its terms at https://huggingface.co/datasets/MahmoodLab/hest" in err
    assert "hf auth login" in err


def test_a_patient_in_two_datasets_is_said(cache, tmp_path, capsys):
    table = cache / "datasets--MahmoodLab--hest" / "snapshots" / COMMIT / "HEST_v1_1_0.csv"
    table.write_text(table.read_text().replace("S2,P2,Lung", "S2,P1,Lung"))
    assert main(["hest", "--ids", "S1", "S2", "--out", str(tmp_path / "o"), "--cache_dir", str(cache)]) == 0
    assert "patient 'P1' appears in 2 datasets" in capsys.readouterr().out
    assert json.loads(json.dumps(pd.read_csv(tmp_path / "o" / "samples.csv")["group_id"].tolist())) == ["P1", "P1"]
