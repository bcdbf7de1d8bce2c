"""Visium HD and Space Ranger >= 3: Parquet positions, bins summed into pseudo-spots, maps scored against them.

A synthetic HD ``outs/`` folder: a 60 x 60 grid of 8 µm bins at 0.5 µm/px, laid on the image with a
known rotation and offset, tissue a disc (bins outside it have ``in_tissue`` 0, a few of them in the
matrix too), Poisson counts; positions in ``tissue_positions.parquet`` written with pyarrow.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers.spaceranger import write_10x_h5
from PIL import Image

from expreg.data.h5ad import read_h5ad
from expreg.ingest.errors import IngestError
from expreg.ingest.prepare import Options, prepare
from expreg.ingest.readers import detect_layout, read_section

BIN_UM, UM_PER_PX, GRID = 8.0, 0.5, 60
GENES = [f"G{i}" for i in range(12)]
IMAGE_PX = 1400


def bin_centres(angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """array_row, array_col and the full-resolution (x, y) of every bin, the grid rotated by ``angle_deg``."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    u, v = (cols + 0.5) * BIN_UM / UM_PER_PX, (rows + 0.5) * BIN_UM / UM_PER_PX  # px along the array's axes
    u, v = u - u.mean(), v - v.mean()
    a = math.radians(angle_deg)
    x = IMAGE_PX / 2 + u * math.cos(a) - v * math.sin(a)
    y = IMAGE_PX / 2 + u * math.sin(a) + v * math.cos(a)
    return rows, cols, x, y


def make_hd(root: Path, angle_deg: float = 0.0, seed: int = 0) -> dict:
    """``root/outs/binned_outputs/square_008um`` (and an empty ``square_016um``) plus ``root/image.png``."""
    rng = np.random.default_rng(seed)
    rows, cols, x, y = bin_centres(angle_deg)
    in_tissue = np.hypot(x - IMAGE_PX / 2, y - IMAGE_PX / 2) < 0.42 * GRID * BIN_UM / UM_PER_PX
    barcodes = np.array([f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)])
    in_matrix = in_tissue | (rng.random(len(rows)) < 0.02)  # a few bins outside the tissue in the matrix too
    rate = np.exp(rng.normal(0, 0.5, len(GENES)))[None, :] * (1 + (x[:, None] > IMAGE_PX / 2))
    counts = sp.csr_matrix(rng.poisson(rate * 0.3)[in_matrix].astype(np.int32))
    folder = root / "outs" / "binned_outputs" / "square_008um"
    (folder / "spatial").mkdir(parents=True)
    (root / "outs" / "binned_outputs" / "square_016um").mkdir()
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes[in_matrix].tolist(), GENES)
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(np.int32),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": y,
            "pxl_col_in_fullres": x,
        }
    )
    positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    scalefactors = {"microns_per_pixel": UM_PER_PX, "bin_size_um": BIN_UM, "spot_diameter_fullres": BIN_UM / UM_PER_PX}
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    pixels = rng.integers(120, 230, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "image.png")
    return {
        "counts": counts,
        "barcodes": barcodes[in_matrix],
        "x": x[in_matrix],
        "y": y[in_matrix],
        "tissue": in_tissue[in_matrix],
    }


@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_pseudo_spots_sum_exactly_the_bins_whose_centres_fall_inside(tmp_path, angle):
    hd = make_hd(tmp_path / "HD1", angle)
    assert detect_layout(tmp_path / "HD1", "HD1") == "visium_hd"
    (tmp_path / "sheet.csv").write_text("sample_id,group_id,path\nHD1,P1,HD1\n")
    patch_um = 64.0  # 8 x 8 = 64 bins in a full pseudo-spot
    summary = prepare(tmp_path / "sheet.csv", tmp_path / "out", Options(patch_um=patch_um, patch_px=32))
    sample = summary["samples"][0]
    assert sample["layout"] == "visium_hd" and sample["um_per_px"] == UM_PER_PX
    assert sample["um_per_px_source"].startswith("microns_per_pixel 0.5")
    assert any("Visium HD bin grid" in c and "(+0.0 %)" in c for c in sample["scale_checks"]), sample["scale_checks"]
    assert not [w for w in sample["warnings"] if "differ" in w or "%" in w]
    assert sample["spots_dropped"]["bins not under tissue"] == int((~hd["tissue"]).sum())
    assert sample["spots_dropped"]["pseudo-spot with too little tissue"] > 0  # the disc's rim
    table = read_h5ad(tmp_path / "out" / "expression.h5ad")
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert len(meta) == table.X.shape[0] > 10 and list(table.var_names) == GENES
    side = patch_um / UM_PER_PX
    tissue = np.flatnonzero(hd["tissue"])
    x, y, counts = hd["x"][tissue], hd["y"][tissue], hd["counts"][tissue]
    for i, (cx, cy) in enumerate(zip(meta["x_px"], meta["y_px"])):  # an independent sum, bin by bin
        inside = (x >= cx - side / 2) & (x < cx + side / 2) & (y >= cy - side / 2) & (y < cy + side / 2)
        assert meta["hd_bins"][i] == inside.sum() >= 0.5 * (8 - 1) ** 2  # half a full cell, less its rim
        np.testing.assert_array_equal(table.X[i].toarray().ravel(), np.asarray(counts[inside].sum(axis=0)).ravel())
    assert table.obs["hd_bins"].tolist() == meta["hd_bins"].tolist()
    kept = meta["hd_bins"].sum()
    assert kept <= len(tissue) and sample["pseudo_spots"]["bins_under_tissue"] == len(tissue)
    assert sample["pseudo_spots"]["bins_in_a_full_cell"] == 64


def test_bin_size_from_the_sheet_and_what_is_there_when_it_is_not(tmp_path):
    make_hd(tmp_path / "HD1")
    (tmp_path / "sheet.csv").write_text("sample_id,group_id,path,bin_um\nHD1,P1,HD1,2\n")
    with pytest.raises(IngestError, match=r"no square_002um/ .* it holds square_008um, square_016um: choose one"):
        prepare(tmp_path / "sheet.csv", tmp_path / "out", Options(patch_um=64, patch_px=32))
    section = read_section(tmp_path / "HD1", "HD1", bin_um=8)
    assert section.bin_um == 8 and section.lattice_kind == "bins" and section.counts.shape[1] == len(GENES)
    assert section.image == str(tmp_path / "HD1" / "image.png")  # beside outs/, not beside binned_outputs/
    with pytest.raises(IngestError, match="--hd_min_tissue 0"):
        prepare(tmp_path / "sheet.csv", tmp_path / "out", Options(hd_min_tissue=0))


def test_parquet_positions_read_as_the_csv_of_older_space_rangers(tmp_path):
    make_hd(tmp_path / "HD1")
    bins = tmp_path / "HD1" / "outs" / "binned_outputs" / "square_008um"
    folders = {}
    for name in ("SR3", "SR2"):  # Space Ranger >= 3 (Parquet positions) and 2.x (CSV)
        folders[name] = tmp_path / name
        (folders[name] / "spatial").mkdir(parents=True)
        shutil.copy(bins / "filtered_feature_bc_matrix.h5", folders[name])
    shutil.copy(bins / "spatial" / "tissue_positions.parquet", folders["SR3"] / "spatial")
    positions = pd.read_parquet(bins / "spatial" / "tissue_positions.parquet")
    positions.to_csv(folders["SR2"] / "spatial" / "tissue_positions.csv", index=False)
    assert detect_layout(folders["SR3"], "B") == detect_layout(folders["SR2"], "B") == "spaceranger"
    a, b = read_section(folders["SR3"], "B"), read_section(folders["SR2"], "B")
    assert list(a.barcodes) == list(b.barcodes) and (a.counts != b.counts).nnz == 0
    np.testing.assert_array_equal(a.x_px, b.x_px)
    np.testing.assert_array_equal(a.array_row, b.array_row)
    (folders["SR3"] / "spatial" / "tissue_positions.parquet").write_bytes(b"not parquet")
    with pytest.raises(IngestError, match="tissue_positions.parquet: unreadable positions Parquet file"):
        read_section(folders["SR3"], "B")


@pytest.mark.slow  # an end-to-end map (about 25 s): the slow tier
def test_a_map_is_scored_against_the_hd_pseudo_spots_as_against_their_prepared_folder(tmp_path):
    from test_map import map_args, save_model

    from expreg.map import main

    make_hd(tmp_path / "HD1", angle_deg=30.0)
    model = save_model(tmp_path / "model", patch_um=64.0, patch_px=32)
    (tmp_path / "sheet.csv").write_text("sample_id,group_id,path\nHD1,P1,HD1\n")
    prepare(tmp_path / "sheet.csv", tmp_path / "prepared", Options(patch_um=64.0, patch_px=32))
    image = tmp_path / "HD1" / "image.png"
    tables = {}
    for name, measured in (("direct", tmp_path / "HD1"), ("prepared", tmp_path / "prepared")):
        assert main(map_args(model, image, tmp_path / f"map_{name}", "--measured", str(measured))) == 0
        tables[name] = (
            pd.read_csv(tmp_path / f"map_{name}" / "measured_vs_predicted.csv").set_index("barcode").sort_index()
        )
        record = json.loads((tmp_path / f"map_{name}" / "spot_metrics.json").read_text())
        assert record["num_samples"] == len(tables[name]) > 10 and record["spearman_depth_adjusted_mean"] is not None
    assert list(tables["direct"].index) == list(tables["prepared"].index)
    np.testing.assert_allclose(tables["direct"].to_numpy(), tables["prepared"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_bin_folder_given_directly_a_stated_pitch_and_a_whole_cell_threshold(tmp_path):
    make_hd(tmp_path / "HD1", angle_deg=30.0)
    bins = tmp_path / "HD1" / "outs" / "binned_outputs" / "square_008um"
    assert detect_layout(bins, "HD1") == "visium_hd"  # not read as a Space Ranger folder of 8 um "spots"
    (tmp_path / "sheet.csv").write_text(f"sample_id,group_id,path\nHD1,P1,{bins}\n")
    options = Options(patch_um=64.0, patch_px=32, spot_pitch_um=100.0, hd_min_tissue=1.0)
    sample = prepare(tmp_path / "sheet.csv", tmp_path / "out", options)["samples"][0]
    assert sample["layout"] == "visium_hd" and sample["pseudo_spots"]["bin_um"] == 8.0
    assert not [w for w in sample["warnings"] if "%" in w]  # the stated spot pitch is not the bins' pitch
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert len(meta) > 20 and meta["hd_bins"].min() >= 49  # cells over tissue hold 63-65 bins when rotated
    sample = prepare(tmp_path / "sheet.csv", tmp_path / "o2", Options(patch_um=100.0, patch_px=32))["samples"][0]
    assert any("not a whole number of 8 um bins" in w for w in sample["warnings"])
