"""``python -m expreg.prepare``: sections -> patches, metadata.csv, expression.h5ad, prepare.json.

Synthetic Space Ranger samples made here (a textured image, a grid of spots, a 10x HDF5), plus the
real HER2ST section C2 read from its Space Ranger folder and from its HEST-1k copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers.spaceranger import write_10x_h5
from PIL import Image

from expreg.data.h5ad import read_h5ad
from expreg.ingest.errors import IngestError
from expreg.ingest.prepare import Options, prepare
from expreg.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared/data/her2st_st"
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


def _image(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def make_sample(root: Path, name: str, seed: int = 0, genes=None, size=(240, 200), spot_px=20.0, outside=0) -> Path:
    """``root/name/outs`` + ``root/name/name_fullres.png``: 20 spots on a square lattice 40 px apart
    (``outside`` of them moved near the border, so that their patch leaves the image): a miniature ST
    array, 1 um/px at the 40 um pitch the sheets of these tests state (``spot_pitch_um``, see ``_sheet``);
    20-px spots, half the pitch as on ST arrays."""
    genes = genes or [f"G{i}" for i in range(8)]
    rng = np.random.default_rng(seed)
    xy = [(40 + 40 * (k % 5), 40 + 40 * (k // 5)) for k in range(20)]
    for k in range(outside):
        xy[k] = (3, 3 + 9 * k)
    barcodes = [f"{name}spot{k}" for k in range(20)]
    counts = sp.csr_matrix(rng.poisson(3.0, (20, len(genes))).astype(np.int32))
    outs = root / name / "outs"
    (outs / "spatial").mkdir(parents=True)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, genes)
    rows = [f"{b},1,{k // 5},{k % 5},{y},{x}" for k, (b, (x, y)) in enumerate(zip(barcodes, xy))]
    (outs / "spatial" / "tissue_positions.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    scalefactors = {"spot_diameter_fullres": spot_px, "tissue_hires_scalef": 0.5}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    pixels = _image(size, seed)
    Image.fromarray(pixels).resize((size[0] // 2, size[1] // 2)).save(outs / "spatial" / "tissue_hires_image.png")
    Image.fromarray(pixels).save(root / name / f"{name}_fullres.png")
    return root / name


SCALE_COLUMNS = ("um_per_px", "spot_pitch_um", "spot_diameter_um")


def _sheet(tmp_path: Path, rows: list[dict], pitch: float | None = 40.0) -> Path:
    """The sample sheet; rows that state no scale get ``spot_pitch_um`` = ``pitch`` (that of ``make_sample``)."""
    path = tmp_path / "samples.csv"
    rows = [
        {**row, "spot_pitch_um": pitch} if pitch and not any(c in row for c in SCALE_COLUMNS) else row for row in rows
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _two_samples(tmp_path: Path, **kwargs) -> Path:
    make_sample(tmp_path, "S1", seed=1, genes=["G0", "G1", "G2", "ONLY1"], **kwargs)
    make_sample(tmp_path, "S2", seed=2, genes=["G0", "G1", "G2", "ONLY2"])
    return _sheet(
        tmp_path,
        [
            {"sample_id": "S1", "group_id": "P1", "path": "S1"},
            {"sample_id": "S2", "group_id": "P2", "path": "S2/outs"},
        ],
    )


def test_prepare_writes_patches_tables_and_a_record(tmp_path):
    sheet = _two_samples(tmp_path)
    summary = prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    out = tmp_path / "out"
    meta = pd.read_csv(out / "metadata.csv")
    assert list(meta.columns) == ["path", "group_id", "sample_id", "barcode", "x_px", "y_px", "um_per_px"]
    assert len(meta) == 40 and set(meta["group_id"]) == {"P1", "P2"}
    assert all((out / p).is_file() for p in meta["path"])
    row = meta.iloc[3]  # S1 spot 3 at (160, 40): the patch is the 16-px crop around it (1 um/px, no resize)
    source = np.asarray(Image.open(tmp_path / "S1" / "S1_fullres.png"))
    patch = np.asarray(Image.open(out / row["path"]))
    np.testing.assert_array_equal(patch, source[32:48, 152:168])
    table = read_h5ad(out / "expression.h5ad")
    assert table.X.shape == (40, 5) and list(table.var_names) == ["G0", "G1", "G2", "ONLY1", "ONLY2"]
    assert list(table.obs["barcode"]) == list(meta["barcode"]) and list(table.obs["sample_id"]) == list(
        meta["sample_id"]
    )
    assert table.X[20:, 3].sum() == 0 and table.X[:20, 4].sum() == 0  # a gene a sample did not measure: no counts
    np.testing.assert_allclose(table.obsm["spatial"], meta[["x_px", "y_px"]].to_numpy())
    record = json.loads((out / "prepare.json").read_text())
    assert record == json.loads(json.dumps(summary, default=str))
    s1 = record["samples"][0]
    assert s1["layout"] == "spaceranger" and s1["um_per_px"] == pytest.approx(1.0)
    assert (
        s1["um_per_px_source"]
        == "square ST lattice: sample sheet spot_pitch_um (line 2) 40 um pitch / 40 px fitted over 20 spots"
    )
    assert s1["scale_checks"] == ["spot_diameter_fullres 20 px as a 20 um spot gives 1 um/px (+0.0 %)"]
    assert s1["spots_kept"] == 20 and record["patch"]["patch_px"] == 16
    assert record["versions"]["tifffile"] and not list(tmp_path.glob(".out.tmp-*"))


def test_each_section_gets_a_picture_of_where_its_patches_were_cut(tmp_path):
    """``qc/<sample>.png``: the section below a caption band, each kept patch's square outlined in green at
    its place (scaled to the picture), tissue elsewhere untouched, and a scale bar."""
    from expreg.ingest.patch_picture import PATCH_RGB

    prepare(_two_samples(tmp_path), tmp_path / "out", Options(patch_um=16, patch_px=16))
    assert sorted(p.name for p in (tmp_path / "out" / "qc").iterdir()) == ["S1.png", "S2.png"]
    picture = np.asarray(Image.open(tmp_path / "out" / "qc" / "S1.png").convert("RGB"))
    source = np.asarray(Image.open(tmp_path / "S1" / "S1_fullres.png"))
    band = picture.shape[0] - source.shape[0]  # the section is drawn at its own size (smaller than 1600 px)
    assert picture.shape[1] == source.shape[1] and band > 0
    section = picture[band:]
    # spot 3 at (160, 40), a 16-px patch: its square's left edge at x = 152, from y = 32 to 48
    assert (section[32:49, 152] == PATCH_RGB).all() and (section[32:49, 168] == PATCH_RGB).all()
    assert (section[40, 153:167] == source[40, 153:167]).all()  # the patch's inside is the image
    assert (section[-40:, :60] == 0).all(axis=2).any()  # the scale bar (black) at the lower left
    assert not (picture[:band] == PATCH_RGB).all(axis=2).any() and (picture[:band] < 128).any()  # the caption


def test_a_section_larger_than_its_picture_is_drawn_to_scale(tmp_path, monkeypatch):
    """A 240 x 200 px section drawn at 120 px: halved, and every square halved with it."""
    from expreg.ingest import patch_picture

    monkeypatch.setattr(patch_picture, "PICTURE_SIDE", 120)
    prepare(_two_samples(tmp_path), tmp_path / "out", Options(patch_um=16, patch_px=16))
    picture = np.asarray(Image.open(tmp_path / "out" / "qc" / "S1.png").convert("RGB"))
    section = picture[picture.shape[0] - 100 :]
    assert picture.shape[1] == 120
    # spot 3 at (160, 40), its 16-px patch from x = 152 and y = 32: at half size from (76, 16) to (84, 24)
    assert (section[16:25, 76] == patch_picture.PATCH_RGB).all() and (
        section[16:25, 84] == patch_picture.PATCH_RGB
    ).all()
    assert not (section[16:25, 72] == patch_picture.PATCH_RGB).all()


def test_genes_give_transformed_targets_and_a_gene_a_sample_did_not_measure_is_an_error(tmp_path):
    sheet = _two_samples(tmp_path)
    (tmp_path / "genes.txt").write_text("G1\nG2\n")
    prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16, genes_file=str(tmp_path / "genes.txt")))
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert (tmp_path / "out" / "genes.txt").read_text().split() == ["G1", "G2"]
    table = read_h5ad(tmp_path / "out" / "expression.h5ad")
    counts = table.X.toarray()
    totals = counts[:20, [0, 1, 2, 3]].sum(axis=1)  # S1's own genes: its library size
    np.testing.assert_allclose(meta["y0"][:20], np.log1p(counts[:20, 1] / totals * 1e4), rtol=1e-5)
    (tmp_path / "one.txt").write_text("G1\nONLY1\n")  # S2 never measured ONLY1: its zeros are no targets
    with pytest.raises(IngestError, match=r"sample S2 did not measure 1: ONLY1\. .*data.allow_unmeasured_genes=true"):
        prepare(sheet, tmp_path / "out1", Options(patch_um=16, genes_file=str(tmp_path / "one.txt")))
    (tmp_path / "bad.txt").write_text("G1\nNOWHERE\n")
    with pytest.raises(IngestError, match="1 gene\\(s\\) measured by no sample: NOWHERE"):
        prepare(sheet, tmp_path / "out2", Options(patch_um=16, genes_file=str(tmp_path / "bad.txt")))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_scale_sources_in_order(tmp_path, caplog):
    make_sample(tmp_path, "S1", spot_px=50.0)
    rows = [{"sample_id": "S1", "group_id": "P1", "path": "S1"}]

    def scale(name, rows, **options):
        sample = prepare(_sheet(tmp_path, rows, pitch=None), tmp_path / name, Options(16, 16, **options))["samples"][0]
        return sample["um_per_px"], sample["um_per_px_source"], sample["warnings"]

    value, source, warnings = scale("lattice", rows)  # no column, no flag: the square lattice's 200 um pitch
    assert value == pytest.approx(5.0) and source.startswith("square ST lattice: the standard 200 um pitch / 40 px")
    assert scale("flag", rows, spot_pitch_um=40)[0] == pytest.approx(1.0)
    value, source, _ = scale("sheet", [{**rows[0], "spot_pitch_um": 50}], spot_pitch_um=40)
    assert value == pytest.approx(1.25) and "sample sheet spot_pitch_um (line 2) 50 um pitch" in source
    with caplog.at_level("INFO", logger="expreg"):
        value, source, warnings = scale("diameter", rows, spot_diameter_um=100)
    assert value == pytest.approx(2.0) and source.startswith("--spot_diameter_um 100 um / spot_diameter_fullres 50 px")
    assert "S1: 2 um/px from --spot_diameter_um 100 um" in caplog.text  # the log says which source won
    assert (
        "scale: the square ST lattice (its 200 um pitch) gives 5 um/px (+150.0 %) against the 2 um/px used" in warnings
    )
    value, source, _ = scale("sheet_diameter", [{**rows[0], "spot_diameter_um": 55}], spot_diameter_um=100)
    assert value == pytest.approx(1.1) and "sample sheet spot_diameter_um (line 2)" in source
    value, source, _ = scale("um_per_px", [{**rows[0], "um_per_px": 0.5, "spot_pitch_um": 50}])
    assert (value, source) == (0.5, "sample sheet um_per_px (line 2)")


def test_spots_outside_the_image_are_dropped_and_counted_and_most_outside_is_an_error(tmp_path):
    make_sample(tmp_path, "S1", outside=3)
    rows = [{"sample_id": "S1", "group_id": "P1", "path": "S1"}]
    summary = prepare(_sheet(tmp_path, rows), tmp_path / "out", Options(patch_um=16, patch_px=16))
    assert summary["samples"][0]["spots_kept"] == 17
    assert summary["samples"][0]["spots_dropped"] == {"patch outside the image": 3}
    with pytest.raises(IngestError, match="20 of 20 spots have their 400 um patch outside"):
        prepare(_sheet(tmp_path, rows), tmp_path / "big", Options(patch_um=400, patch_px=16))
    assert not (tmp_path / "big").exists()


def test_an_image_that_disagrees_with_the_scale_factors_is_an_error(tmp_path):
    make_sample(tmp_path, "S1")
    Image.fromarray(_image((300, 200), 0)).save(tmp_path / "other.png")  # wider than hires / scalef says
    rows = [{"sample_id": "S1", "group_id": "P1", "path": "S1", "image": "other.png"}]
    with pytest.raises(
        IngestError, match=r"other.png is 300 x 200 px, but .*implies a full-resolution image of about 240 x 200"
    ):
        prepare(_sheet(tmp_path, rows), tmp_path / "out", Options(patch_um=16, patch_px=16))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"sample_id": "S1", "path": "S1"}], "missing column\\(s\\) group_id"),
        ([{"sample_id": "S1", "group_id": "P", "path": "S1", "um_per_px": "-1"}], "line 2, column 'um_per_px': '-1'"),
        ([{"sample_id": "a/b", "group_id": "P", "path": "S1"}], "line 2, column 'sample_id': 'a/b' is not a portable"),
        ([{"sample_id": "S1", "group_id": "P", "path": "S1"}] * 2, "line 3, column 'sample_id': 'S1' repeats line 2"),
        ([{"sample_id": "S1", "group_id": "", "path": "S1"}], "line 2, column 'group_id': empty"),
        # a path that is not there: the line, the path as resolved and the rule for relative paths
        (
            [
                {"sample_id": "S1", "group_id": "P", "path": "S1"},
                {"sample_id": "S2", "group_id": "P", "path": "../S2"},
            ],
            r"samples.csv: line 3, column 'path': '../S2' does not exist \(looked for /.*/S2; relative paths "
            r"start at the sheet's folder /",
        ),
        (
            [{"sample_id": "S1", "group_id": "P", "path": "S1", "image": "S1/he.tif"}],
            r"line 2, column 'image': 'S1/he.tif' does not exist \(looked for /.*/S1/he.tif; relative",
        ),
    ],
)
def test_bad_sample_sheets_name_line_and_column(tmp_path, rows, message):
    make_sample(tmp_path, "S1")
    with pytest.raises(IngestError, match=message):
        prepare(_sheet(tmp_path, rows), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_scale_is_an_error_that_says_what_to_add(tmp_path):
    from expreg.data.h5ad import write_h5ad

    obs = pd.DataFrame(index=[f"b{i}" for i in range(4)])
    spatial = np.array([[50.0, 50.0], [100, 50], [50, 100], [100, 100]])
    write_h5ad(
        tmp_path / "s.h5ad",
        sp.csr_matrix(np.ones((4, 3), np.float32)),
        obs,
        ["a", "b", "c"],
        obsm={"spatial": spatial},
    )
    Image.fromarray(_image((160, 160), 0)).save(tmp_path / "s.png")
    rows = [{"sample_id": "S1", "group_id": "P1", "path": "s.h5ad", "image": "s.png"}]
    with pytest.raises(IngestError, match="no array_row/array_col.* add a um_per_px column .* line 2"):
        prepare(_sheet(tmp_path, rows, pitch=None), tmp_path / "out")
    rows[0]["um_per_px"] = 1.0
    summary = prepare(_sheet(tmp_path, rows), tmp_path / "out", Options(patch_um=20, patch_px=10))
    assert summary["samples"][0]["layout"] == "h5ad" and summary["spots"] == 4


def test_a_failure_half_way_leaves_nothing_and_outputs_are_never_overwritten(tmp_path, monkeypatch):
    sheet = _two_samples(tmp_path)
    from expreg.ingest import prepare as machinery

    calls = {"n": 0}
    original = machinery.cut_patch

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:  # in the second sample
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(machinery, "cut_patch", failing)
    with pytest.raises(OSError):
        prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.setattr(machinery, "cut_patch", original)
    prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    with pytest.raises(IngestError, match="exists; choose another folder or pass --overwrite"):
        prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=8), overwrite=True)
    assert Image.open(next((tmp_path / "out" / "patches" / "S1").iterdir())).size == (8, 8)


def test_command_line_exit_codes(tmp_path, capsys):
    sheet = _two_samples(tmp_path)
    args = ["--samples", str(sheet), "--out_dir", str(tmp_path / "out"), "--patch_um", "16", "--patch_px", "16"]
    assert prepare_main([*args, "--image_format", "jpeg"]) == 0
    out = capsys.readouterr().out
    assert "S1 (spaceranger): 20 spots, 1 um/px" in out and "wrote 40 patches" in out
    assert next((tmp_path / "out" / "patches" / "S2").iterdir()).suffix == ".jpg"
    assert prepare_main(args) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.skipif(not REAL.is_dir(), reason="real HER2ST sections not available")
def test_real_section_c2_from_space_ranger_and_from_hest_agree(tmp_path):
    rows = [
        {"sample_id": "C2", "group_id": "C", "path": str(REAL / "visium" / "C2")},  # no scale column: the lattice
    ]
    prepare(_sheet(tmp_path, rows, pitch=None), tmp_path / "visium", Options(patch_px=64))
    (tmp_path / "h").mkdir()
    rows = [{"sample_id": "C2", "group_id": "C", "path": str(REAL / "hest")}]
    prepare(_sheet(tmp_path / "h", rows), tmp_path / "hest", Options(patch_px=64))
    a, b = (pd.read_csv(tmp_path / name / "metadata.csv") for name in ("visium", "hest"))
    assert list(a["barcode"]) == list(b["barcode"]) and len(a) == 187
    np.testing.assert_allclose(a["um_per_px"], b["um_per_px"], rtol=0.005)  # the lattice vs HEST's estimate
    x_a, x_b = (read_h5ad(tmp_path / name / "expression.h5ad") for name in ("visium", "hest"))
    assert list(x_a.var_names) == list(x_b.var_names) and (x_a.X != x_b.X).nnz == 0
    diffs = [
        np.abs(
            np.asarray(Image.open(tmp_path / "visium" / p), np.int16)
            - np.asarray(Image.open(tmp_path / "hest" / q), np.int16)
        ).mean()
        for p, q in zip(a["path"][:40], b["path"][:40])
    ]
    assert max(diffs) < 6.0  # the same pixels, JPEG-compressed differently (full-res JPEG vs JPEG tiles)
    shutil.rmtree(tmp_path / "visium")


def test_python_dash_m_runs(tmp_path):
    sheet = _two_samples(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "expreg.prepare",
            "--samples",
            str(sheet),
            "--out_dir",
            str(tmp_path / "o"),
            "--patch_um",
            "16",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "o" / "prepare.json").is_file()


def _hest_root(root: Path, wsi: bool = True, patches: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    """A HEST-1k sample S1: st/S1.h5ad, metadata/S1.json (0.5 um/px) and a tiled pyramidal JPEG TIFF and/or
    patches/S1.h5 (HEST's 224-px patches); returns (root, pixels, spot x/y)."""
    import tifffile

    from expreg.data.h5ad import write_h5ad

    pixels = np.kron(_image((64, 48), 3), np.ones((8, 8, 1), np.uint8))  # 512 x 384, smooth enough for JPEG
    xy = np.array([[100.0 + 60 * (k % 6), 100.0 + 60 * (k // 6)] for k in range(12)])
    obs = pd.DataFrame({"in_tissue": np.ones(12, np.int64)}, index=[f"s{k}" for k in range(12)])
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (12, 6)).astype(np.float32))
    (root / "st").mkdir(parents=True)
    write_h5ad(root / "st" / "S1.h5ad", counts, obs, [f"G{i}" for i in range(6)], obsm={"spatial": xy})
    (root / "metadata").mkdir()
    (root / "metadata" / "S1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.5, "spot_diameter": 55.0}))
    if wsi:
        (root / "wsis").mkdir()
        with tifffile.TiffWriter(root / "wsis" / "S1.tif") as tif:
            tif.write(pixels, tile=(128, 128), compression="jpeg", photometric="rgb")
            tif.write(pixels[::2, ::2], tile=(128, 128), compression="jpeg", photometric="rgb")
    if patches:
        (root / "patches").mkdir()
        with h5py.File(root / "patches" / "S1.h5", "w") as f:
            f.create_dataset("img", data=np.stack([np.full((224, 224, 3), 10 * k, np.uint8) for k in range(10)]))
            f.create_dataset("coords", data=np.zeros((10, 2), np.int64))
            f.create_dataset("barcode", data=np.array([[f"s{k}".encode()] for k in range(10)]))
    return root, pixels, xy


def test_hest_sample_with_a_tiled_wsi_and_its_metadata_scale(tmp_path):
    import tifffile

    root, pixels, xy = _hest_root(tmp_path / "hest")
    rows = [{"sample_id": "S1", "group_id": "P1", "path": str(root)}]
    summary = prepare(_sheet(tmp_path, rows), tmp_path / "out", Options(patch_um=32, patch_px=64))
    s1 = summary["samples"][0]
    assert s1["layout"] == "hest" and s1["um_per_px"] == 0.5 and "pixel_size_um_estimated" in s1["um_per_px_source"]
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    x, y = xy[7].astype(int)
    patch = np.asarray(Image.open(tmp_path / "out" / meta["path"][7]), np.int16)  # 32 um = 64 px at level 0
    decoded = tifffile.imread(root / "wsis" / "S1.tif", key=0).astype(np.int16)  # the JPEG tiles as stored
    assert np.abs(patch - decoded[y - 32 : y + 32, x - 32 : x + 32]).max() <= 1
    assert np.abs(patch - pixels[y - 32 : y + 32, x - 32 : x + 32]).mean() < 12.0  # and close to the source


def test_hest_sample_with_patches_only(tmp_path):
    root, _, _ = _hest_root(tmp_path / "hest", wsi=False, patches=True)
    rows = [{"sample_id": "S1", "group_id": "P1", "path": str(root)}]
    with pytest.raises(IngestError, match="pass --patch_um 112"):
        prepare(_sheet(tmp_path, rows), tmp_path / "out", Options(patch_um=100))
    summary = prepare(_sheet(tmp_path, rows), tmp_path / "out", Options(patch_px=32))
    assert summary["samples"][0]["spots_kept"] == 10
    assert summary["samples"][0]["spots_dropped"] == {"no patch in S1.h5": 2}
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    patch = np.asarray(Image.open(tmp_path / "out" / meta["path"][3]))
    assert patch.shape == (32, 32, 3) and (patch == 30).all()
    assert not (tmp_path / "out" / "qc").exists()  # HEST's own patches: no section image to draw on


def test_an_unreadable_image_is_named_and_nothing_is_written(tmp_path, capsys):
    sheet = _two_samples(tmp_path)
    (tmp_path / "S2" / "S2_fullres.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated
    code = prepare_main(["--samples", str(sheet), "--out_dir", str(tmp_path / "out"), "--patch_um", "16"])
    assert code == 2 and "S2_fullres.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_scales_hires_images_and_gene_lists_are_named(tmp_path):
    make_sample(tmp_path, "S1")
    rows = [{"sample_id": "S1", "group_id": "P1", "path": "S1"}]
    sheet = _sheet(tmp_path, rows)
    scalefactors = tmp_path / "S1" / "outs" / "spatial" / "scalefactors_json.json"
    scalefactors.write_text(json.dumps({"spot_diameter_fullres": -3, "tissue_hires_scalef": 0.5}))
    with pytest.raises(IngestError, match="spot_diameter_fullres in scalefactors_json.json is -3, not a positive"):
        prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    scalefactors.write_text(json.dumps({"spot_diameter_fullres": 20, "tissue_hires_scalef": 0.5}))
    (tmp_path / "S1" / "outs" / "spatial" / "tissue_hires_image.png").write_bytes(b"not a png")
    with pytest.raises(IngestError, match="tissue_hires_image.png: not a readable image"):
        prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    (tmp_path / "latin1.txt").write_bytes("G1\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(IngestError, match="latin1.txt: not a UTF-8 text file"):
        prepare(sheet, tmp_path / "out", Options(genes_file=str(tmp_path / "latin1.txt")))
    (tmp_path / "twice.txt").write_text("G1\n # a note\nG1\n")
    with pytest.raises(IngestError, match="repeated gene name\\(s\\) G1"):
        prepare(sheet, tmp_path / "out", Options(genes_file=str(tmp_path / "twice.txt")))
    with pytest.raises(IngestError, match="positive, finite"):
        prepare(sheet, tmp_path / "out", Options(patch_um=float("inf")))
    assert not (tmp_path / "out").exists()


def test_overwrite_sets_the_old_output_aside_and_abandoned_temporary_folders_are_removed(tmp_path):
    sheet = _two_samples(tmp_path)
    abandoned = tmp_path / ".out.tmp-999999999"  # a killed run's folder (no such process)
    (abandoned / "patches").mkdir(parents=True)
    prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=16))
    assert not abandoned.exists()
    prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=8), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_features_that_are_not_genes_are_left_out(tmp_path):
    from expreg.ingest.readers import read_section

    root = make_sample(tmp_path, "S1", genes=["G0", "G1", "CD3-protein", "G2"])
    matrix = root / "outs" / "filtered_feature_bc_matrix.h5"
    with h5py.File(matrix) as f:
        counts = sp.csc_matrix(
            (f["matrix/data"][...], f["matrix/indices"][...], f["matrix/indptr"][...]), shape=(4, 20)
        )
        barcodes = [b.decode() for b in f["matrix/barcodes"][...]]
    kinds = ["Gene Expression", "Gene Expression", "Antibody Capture", "Gene Expression"]
    write_10x_h5(matrix, counts.T.tocsr(), barcodes, ["G0", "G1", "CD3-protein", "G2"], kinds)
    section = read_section(root, "S1")
    assert section.gene_names == ["G0", "G1", "G2"] and section.counts.shape == (20, 3)
    assert any("left out 1 feature(s) that are not genes (Antibody Capture)" in w for w in section.warnings)


def test_a_model_trained_on_prepared_patches_knows_their_physical_size(tmp_path):
    import yaml

    from expreg.config import ConfigError
    from expreg.training.setup import patch_geometry

    sheet = _two_samples(tmp_path)
    (tmp_path / "genes.txt").write_text("G0\nG1\nG2\n")
    prepare(sheet, tmp_path / "out", Options(patch_um=16, patch_px=32, genes_file=str(tmp_path / "genes.txt")))
    csv = tmp_path / "out" / "metadata.csv"
    assert patch_geometry(csv, None) == (16.0, 32) and patch_geometry(csv, 16.0) == (16.0, 32)
    with pytest.raises(ConfigError, match="data.patch_um=20, but .*prepare.json says the patches are 16 um"):
        patch_geometry(csv, 20.0)
    assert patch_geometry(tmp_path / "elsewhere.csv", 55.0) == (55.0, None)  # a hand-made CSV: the recipe's value
    args = [
        str(REPO / "run_regression.py"),
        str(REPO / "recipes" / "tiny.yaml"),
        f"data.metadata_csv={csv}",
        f"logging.output_dir={tmp_path / 'runs'}",
        "logging.run_name=geom",
        "train.epochs=1",
        "data.image_size=16",
    ]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "geom"
    config = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert config["patch_um"] == 16.0 and config["patch_px"] == 32 and config["image_size"] == 16
    assert yaml.safe_load((run / "config_resolved.yaml").read_text())["data"]["patch_um"] == 16.0
    assert (
        "Patches of 16 µm, seen by the model at 16 px (1 µm per input pixel)"
        in (run / "checkpoints" / "best" / "README.md").read_text()
    )
