"""Whole-slide expression maps (``python -m expreg.map``, ``expreg.maps``) on small synthetic slides.

Most tests call ``expreg.map.main`` in this process on slides of at most ~1000 px with a tiny random
model (``test_resnet`` at 32 px), one model and one prepared section shared per module, so the whole
file takes well under a minute; only the two-process test is ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from helpers.spaceranger import write_10x_h5
from PIL import Image

from expreg.data.expression import transform_counts
from expreg.data.h5ad import read_h5ad
from expreg.evaluation.metrics import compute_metrics
from expreg.ingest.prepare import Options, prepare
from expreg.ingest.resolution import tiff_um_per_px
from expreg.map import main
from expreg.maps.grid import make_grid
from expreg.maps.plan import MapOptions, plan_map
from expreg.maps.tissue import MIN_SATURATION, TissueMask, detect_tissue, otsu_threshold

REPO = Path(__file__).resolve().parents[1]
HER2ST_ST = REPO.parent / "shared" / "data" / "her2st_st"
GENES = ["G0", "G1", "G2", "G3", "G4"]
MEASURED_GENES = [*GENES, "G5", "G6", "G7"]  # the section measured more genes than the model predicts
PATCH_UM, PATCH_PX = 112.0, 64
SLIDE_W, SLIDE_H = 1024, 768
# at 1 um/px a tile is 112 px: the grid's corners are x 8 + 112 i (9 columns), y 48 + 112 j (6 rows);
# the tissue rectangle below lies on tile edges, so every tile is clearly in (7 x 4 = 28) or out
TISSUE_RECT = (120, 160, 904, 608)  # x0, y0, x1, y1
KINDS_TILES = 28
SAMPLE_W, SAMPLE_H = 900, 580  # the Space Ranger section: 8 x 5 tiles of 112 px at 1 um/px
# a square lattice 100 px apart: a miniature ST array at 1 um/px with the 100 um pitch the tests state
SPOTS_XY = [(150 + 100 * (k % 5), 140 + 100 * (k // 5)) for k in range(20)]
SPOT_PITCH_UM = 100.0
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


# ---------------------------------------------------------------- synthetic slides, sections, models


def tissue_pixels(width: int, height: int, rect, seed: int = 0) -> np.ndarray:
    """White glass (with a little noise) and an H&E-coloured rectangle of tissue (pink to purple, textured)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(238, 256, (height, width, 3)).astype(np.float64)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    mix = (0.5 + 0.5 * np.sin(xx / 37 + np.cos(yy / 53) * 3))[..., None]  # eosin <-> haematoxylin
    colour = (1 - mix) * np.array([225, 140, 185]) + mix * np.array([115, 60, 150])
    colour += rng.normal(0, 14, colour.shape)
    x0, y0, x1, y1 = rect
    pixels[y0:y1, x0:x1] = colour[y0:y1, x0:x1]
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def glass(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A slide of bare glass: bright grey with noise in brightness and a little in colour."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(236, 254, (height, width, 1)) + rng.integers(-2, 3, (height, width, 3))
    return np.clip(grey, 0, 255).astype(np.uint8)


def halve(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    return (pixels[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)) + 0.5).astype(
        np.uint8
    )


def write_pyramid(path: Path, pixels, levels=3, subifds=False, compression="zlib", tile=256, **level0_tags):
    """A tiled pyramidal TIFF: levels as SubIFDs of page 0 or as successive pages."""
    pyramid = [pixels]
    for _ in range(levels - 1):
        pyramid.append(halve(pyramid[-1]))
    options = {"tile": (tile, tile), "compression": compression, "photometric": "rgb"}
    with tifffile.TiffWriter(path) as writer:
        writer.write(pyramid[0], subifds=(levels - 1) if subifds else None, **options, **level0_tags)
        for level in pyramid[1:]:
            writer.write(level, subfiletype=1 if subifds else 0, **options)
    return path


def write_svs(path: Path, pixels, mpp: float | None = 0.5) -> Path:
    """Aperio-style: tiled level 0 (MPP in its description), an untiled thumbnail, tiled level 1, a label."""
    head = "Aperio Image Library v12.0.0\n"
    description = f"{head}{pixels.shape[1]}x{pixels.shape[0]} (256x256) RAW/RGB|AppMag = 20"
    description += f"|MPP = {mpp}" if mpp is not None else ""
    with tifffile.TiffWriter(path) as writer:
        writer.write(pixels, tile=(256, 256), photometric="rgb", compression="zlib", description=description)
        writer.write(halve(halve(pixels)), photometric="rgb", description=f"{head}thumbnail")
        writer.write(halve(pixels), tile=(256, 256), photometric="rgb", compression="zlib", description=f"{head}l1")
        label = np.full((150, 150, 3), 90, np.uint8)
        writer.write(label, photometric="rgb", subfiletype=1, description=f"{head}label 150x150")
    return path


def write_slide(kind: str, path_stem: Path, pixels: np.ndarray) -> Path:
    """The same pixels in one of the containers a slide can come in."""
    if kind == "png":
        path = path_stem.with_suffix(".png")
        Image.fromarray(pixels).save(path)
    elif kind == "jpeg":
        path = path_stem.with_suffix(".jpg")
        Image.fromarray(pixels).save(path, quality=95)
    elif kind == "tiff_untiled":
        path = path_stem.with_suffix(".tif")
        tifffile.imwrite(path, pixels, photometric="rgb")
    elif kind == "tiff_subifds":
        path = write_pyramid(path_stem.with_suffix(".tif"), pixels, subifds=True)
    elif kind == "tiff_pages":
        path = write_pyramid(path_stem.with_suffix(".tif"), pixels)
    elif kind == "svs":
        path = write_svs(path_stem.with_suffix(".svs"), pixels)
    elif kind == "tiff_jpeg_tiles":
        path = write_pyramid(path_stem.with_suffix(".tif"), pixels, compression="jpeg")
    else:
        raise ValueError(kind)
    return path


def make_spaceranger(root: Path, name: str = "S1", seed: int = 3, genes=MEASURED_GENES) -> tuple[Path, sp.csr_matrix]:
    """``root/name/outs`` and ``root/name/name_fullres.png`` (900 x 580 px): 20 spots of 50 px on a square
    lattice 100 px apart (1 um/px at ``SPOT_PITCH_UM``)."""
    rng = np.random.default_rng(seed)
    barcodes = [f"{name}spot{k}" for k in range(len(SPOTS_XY))]
    counts = sp.csr_matrix(rng.poisson(rng.uniform(1, 8, len(genes)), (20, len(genes))))
    outs = root / name / "outs"
    (outs / "spatial").mkdir(parents=True)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, genes)
    rows = [f"{b},1,{k // 5},{k % 5},{y},{x}" for k, (b, (x, y)) in enumerate(zip(barcodes, SPOTS_XY))]
    (outs / "spatial" / "tissue_positions.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    scalefactors = {"spot_diameter_fullres": 50.0, "tissue_hires_scalef": 0.5}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    pixels = tissue_pixels(SAMPLE_W, SAMPLE_H, (60, 60, 840, 520), seed)
    Image.fromarray(pixels).resize((SAMPLE_W // 2, SAMPLE_H // 2)).save(outs / "spatial" / "tissue_hires_image.png")
    Image.fromarray(pixels).save(root / name / f"{name}_fullres.png")
    return root / name, counts


def save_model(folder: Path, genes=GENES, **overrides) -> Path:
    from expreg.modeling.model import build_model

    k = len(genes)
    kwargs = dict(
        gene_names=list(genes),
        image_size=32,
        patch_um=PATCH_UM,
        patch_px=PATCH_PX,
        target_transform="log1p_cpm",
        target_mean=[1.0 + 0.1 * i for i in range(k)],
        target_std=[0.5] * k,
    )
    kwargs.update(overrides)
    build_model("test_resnet", k, **kwargs).save_pretrained(folder)
    return folder


def map_args(model, slide, out, *extra, genes: str | None = "G0") -> list[str]:
    args = ["--model", str(model), "--slide", str(slide), "--out_dir", str(out)]
    args += ["--num_workers", "0", "--thumbnail_px", "256", "--batch_size", "16"]
    return [*args, *(["--genes", genes] if genes else []), *extra]


def predictions(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv", index_col="tile")


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def accelerator():
    from expreg.training.launch import build_accelerator

    return build_accelerator()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("maps")


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    return save_model(work / "tiny")


@pytest.fixture(scope="module")
def model(model_dir):
    from expreg.inference import load_model

    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return tissue_pixels(SLIDE_W, SLIDE_H, TISSUE_RECT)


@pytest.fixture(scope="module")
def png_slide(work, pixels) -> Path:
    return write_slide("png", work / "slide", pixels)


@pytest.fixture(scope="module")
def reference(work, model_dir, png_slide) -> pd.DataFrame:
    """The PNG slide's map at 1 um/px: what every other container of the same pixels must give."""
    out = work / "reference"
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1")) == 0
    return predictions(out)


@pytest.fixture(scope="module")
def section(work):
    """A Space Ranger section and its expreg.prepare output (112 um patches of 64 px, PNG)."""
    sample, counts = make_spaceranger(work / "sr")
    (work / "sheet.csv").write_text(f"sample_id,group_id,path\nS1,P1,{sample}\n")
    prepare(
        work / "sheet.csv",
        work / "prepared",
        Options(patch_um=PATCH_UM, patch_px=PATCH_PX, spot_pitch_um=SPOT_PITCH_UM),
    )
    return {"sample": sample, "counts": counts, "prepared": work / "prepared", "image": sample / "S1_fullres.png"}


# ---------------------------------------------------------------- 1. slide kinds


@pytest.mark.parametrize(
    "kind", ["png", "jpeg", "tiff_untiled", "tiff_subifds", "tiff_pages", "svs", "tiff_jpeg_tiles"]
)
def test_every_slide_kind_gives_the_same_map(kind, tmp_path, model_dir, pixels, reference):
    slide = write_slide(kind, tmp_path / "slide", pixels)
    out = tmp_path / "out"
    assert main(map_args(model_dir, slide, out, "--um_per_px", "1")) == 0
    got = predictions(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == len(got) == KINDS_TILES and summary["level"] == 0
    assert list(got.index) == list(reference.index)  # the same tissue tiles, whatever the container
    assert list(got.columns) == ["x_px", "y_px", *GENES]
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["G0.png"]
    spread = reference[GENES].to_numpy().std()
    assert spread > 1e-3  # tiles differ, so equal maps mean equal tiles
    if kind in ("jpeg", "tiff_jpeg_tiles"):
        diff = np.abs(got[GENES].to_numpy() - reference[GENES].to_numpy())
        assert diff.mean() < 0.1 * spread
        assert np.corrcoef(got[GENES].to_numpy().ravel(), reference[GENES].to_numpy().ravel())[0, 1] > 0.95
    else:
        np.testing.assert_allclose(got.to_numpy(), reference.to_numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["tiff_pages", "tiff_subifds", "svs"])
def test_a_tiled_slide_is_read_from_the_level_of_the_model_never_whole_at_level_0(
    kind, tmp_path, model_dir, pixels, monkeypatch
):
    from expreg.ingest.images import TiledSlide

    reads = []
    original = TiledSlide._read

    def recording(self, level, x0, y0, x1, y1):
        reads.append((level, x1 - x0, y1 - y0))
        return original(self, level, x0, y0, x1, y1)

    monkeypatch.setattr(TiledSlide, "_read", recording)
    slide = write_slide(kind, tmp_path / "slide", pixels)
    out = tmp_path / "out"
    # 0.5 um/px: a 112 um tile is 224 level-0 px for 64 model px (downsample 3.5): level 1 (downsample 2)
    assert main(map_args(model_dir, slide, out, "--um_per_px", "0.5")) == 0
    info = read_h5ad(out / "predictions.h5ad").uns["expreg_map"]
    assert info["level"] == 1 and info["level_downsample"] == 2.0 and info["tile_px_level0"] == 224
    assert len(predictions(out)) > 0 and reads
    assert all(w * h < SLIDE_W * SLIDE_H for _, w, h in reads)
    assert all(level >= 1 for level, _, _ in reads)  # tiles from level 1, the thumbnail from a small level


# ---------------------------------------------------------------- 2. geometry sources


def _tiff(path: Path, **tags) -> Path:
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb", **tags)
    return path


def test_tiff_um_per_px_reads_the_units_mpp_and_ome_and_refuses_implausible_values(tmp_path):
    cm = _tiff(tmp_path / "cm.tif", resolution=(10000, 10000), resolutionunit="CENTIMETER")
    assert tiff_um_per_px(cm) == (pytest.approx(1.0), "the TIFF XResolution tag (10000 per centimeter)")
    inch = _tiff(tmp_path / "inch.tif", resolution=(50800, 50800), resolutionunit="INCH")
    assert tiff_um_per_px(inch)[0] == pytest.approx(0.5)
    svs = _tiff(tmp_path / "svs.tif", description="Aperio Image Library v12\n8x8|AppMag = 40|MPP = 0.2527")
    assert tiff_um_per_px(svs) == (pytest.approx(0.2527), "the SVS description (MPP)")
    ome = tmp_path / "a.ome.tif"
    tifffile.imwrite(ome, np.zeros((8, 8, 3), np.uint8), photometric="rgb", metadata={"PhysicalSizeX": 0.25})
    assert tiff_um_per_px(ome)[0] == pytest.approx(0.25)
    dpi72 = _tiff(tmp_path / "dpi72.tif", resolution=(72, 72), resolutionunit="INCH")
    value, why = tiff_um_per_px(dpi72)
    assert value is None and "implausible" in why and "352.8" in why
    no_unit = _tiff(tmp_path / "none.tif", resolution=(10000, 10000), resolutionunit="NONE")
    assert tiff_um_per_px(no_unit)[0] is None
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    value, why = tiff_um_per_px(tmp_path / "a.png")
    assert value is None and "not a TIFF" in why


def _plan(model, slide, out, **kwargs):
    options = MapOptions(model="tiny", slide=str(slide), out_dir=str(out), thumbnail_px=256, **kwargs)
    plan = plan_map(options, model)
    plan.slide.close()
    return plan


def test_scale_from_the_flag_the_tags_or_the_measured_section_and_the_flag_wins(
    tmp_path, model, pixels, section, caplog
):
    cm = write_pyramid(tmp_path / "cm.tif", pixels, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    inch = write_pyramid(tmp_path / "inch.tif", pixels, resolution=(25400, 25400), resolutionunit="INCH")
    svs = write_svs(tmp_path / "a.svs", pixels, mpp=0.5)
    plan = _plan(model, cm, tmp_path / "o")
    assert plan.geometry.um_per_px == pytest.approx(0.5) and "XResolution" in plan.scale_source
    assert plan.geometry.box_px == 224 and not plan.warnings
    assert _plan(model, inch, tmp_path / "o").geometry.um_per_px == pytest.approx(1.0)
    plan = _plan(model, svs, tmp_path / "o")
    assert plan.geometry.um_per_px == pytest.approx(0.5) and plan.scale_source.endswith(
        "a.svs: the SVS description (MPP)"
    )
    with caplog.at_level("WARNING", logger="expreg"):
        plan = _plan(model, svs, tmp_path / "o", um_per_px=0.8)
    assert plan.geometry.um_per_px == 0.8 and plan.scale_source == "--um_per_px"
    assert len(plan.warnings) == 1 and "(MPP) gives 0.5 µm/px, but 0.8 from --um_per_px is used" in plan.warnings[0]
    assert "but 0.8 from --um_per_px is used" in caplog.text
    # --measured: the scale prepare used (1 um/px, its lattice at a 100 um pitch) beats the slide's tags (0.9)
    tagged = tmp_path / "tagged.tif"
    tifffile.imwrite(
        tagged,
        np.asarray(Image.open(section["image"])),
        photometric="rgb",
        resolution=(1e4 / 0.9, 1e4 / 0.9),
        resolutionunit="CENTIMETER",
    )
    plan = _plan(model, tagged, tmp_path / "o", measured=str(section["prepared"]))
    assert plan.geometry.um_per_px == pytest.approx(1.0) and "prepare.json" in plan.scale_source
    assert len(plan.warnings) == 1 and "0.9 µm/px" in plan.warnings[0]
    plan = _plan(model, tagged, tmp_path / "o", measured=str(section["prepared"]), um_per_px=1.0)
    assert plan.scale_source == "--um_per_px" and len(plan.warnings) == 1  # only the tag disagrees
    plan = _plan(model, tagged, tmp_path / "o", measured=str(section["prepared"]), um_per_px=1.2)
    assert plan.geometry.um_per_px == 1.2 and len(plan.warnings) == 2  # the flag beats both, both disagree
    assert "prepare.json" in plan.warnings[0] and "gives 1 µm/px, but 1.2 from --um_per_px" in plan.warnings[0]
    plan = _plan(model, section["image"], tmp_path / "o", measured=str(section["sample"]), spot_pitch_um=100.0)
    assert (
        plan.geometry.um_per_px == pytest.approx(1.0) and "square ST lattice: --spot_pitch_um 100" in plan.scale_source
    )
    assert plan.warnings == []
    plan = _plan(model, section["image"], tmp_path / "o", measured=str(section["sample"]))  # the ST default: 200 um
    assert plan.geometry.um_per_px == pytest.approx(2.0) and "the standard 200 um pitch" in plan.scale_source


def test_the_scale_and_a_disagreeing_tag_are_printed_at_the_end_of_the_run(tmp_path, model_dir, section, capsys):
    tagged = tmp_path / "tagged.tif"
    pixels = np.asarray(Image.open(section["image"]))
    tifffile.imwrite(tagged, pixels, photometric="rgb", resolution=(1e4 / 0.8, 1e4 / 0.8), resolutionunit="CENTIMETER")
    assert main(map_args(model_dir, tagged, tmp_path / "out", "--measured", str(section["prepared"]))) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["um_per_px"] == pytest.approx(1.0) and "square ST lattice" in summary["um_per_px_source"]
    assert out[-3].startswith("done in ") and "s (the whole command" in out[-3]  # not only the prediction time
    assert out[-2].startswith("scale: 1 µm/px from ") and out[-2].endswith(summary["um_per_px_source"])
    assert out[-1].startswith("warning: ") and "gives 0.8 µm/px, but 1 from" in out[-1]  # the last lines, not a file


@pytest.mark.parametrize("tags", [{}, {"resolution": (72, 72), "resolutionunit": "INCH"}])
def test_an_unknown_or_implausible_scale_is_an_error_that_says_to_pass_um_per_px(
    tags, tmp_path, model_dir, pixels, capsys
):
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, pixels, photometric="rgb", **tags)
    out = tmp_path / "out"
    assert main(map_args(model_dir, slide, out)) == 2
    err = capsys.readouterr().err
    assert "scale is unknown" in err and "pass --um_per_px" in err
    assert ("implausible for a slide" in err) == bool(tags)
    assert nothing_written(out)
    png = tmp_path / "slide.png"
    Image.fromarray(pixels).save(png)
    assert main(map_args(model_dir, png, out)) == 2 and "pass --um_per_px" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. tile coverage


def _lattice(length: int, box: int, stride: float) -> np.ndarray:
    """Top-left corners along one side: as many tiles as fit, the run centred (written out here again)."""
    count = int((length - box) // stride) + 1
    start = (length - box - (count - 1) * stride) / 2
    return np.floor(start + np.arange(count) * stride + 0.5).astype(int)


@pytest.mark.parametrize("stride_um", [None, 50.0])
def test_every_tissue_tile_of_a_known_mask_appears_exactly_once(stride_um, tmp_path, model_dir, png_slide):
    mx0, my0, mx1, my1 = 150, 130, 700, 540  # the tissue of the mask, not on tile edges
    mask = np.zeros((SLIDE_H, SLIDE_W), np.uint8)
    mask[my0:my1, mx0:mx1] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    extra = ["--um_per_px", "1", "--mask", str(tmp_path / "mask.png"), "--thumbnail_px", str(SLIDE_W)]
    extra += ["--stride_um", str(stride_um)] if stride_um else []
    assert main(map_args(model_dir, png_slide, out, *extra)) == 0
    box, stride = 112, stride_um or 112
    expected = {}
    for r, y0 in enumerate(_lattice(SLIDE_H, box, stride)):
        for c, x0 in enumerate(_lattice(SLIDE_W, box, stride)):
            overlap = max(0, min(x0 + box, mx1) - max(x0, mx0)) * max(0, min(y0 + box, my1) - max(y0, my0))
            if overlap >= 0.5 * box * box:
                expected[f"tile_{r}_{c}"] = (x0 + box / 2, y0 + box / 2)
    got = predictions(out)
    assert got.index.is_unique and set(got.index) == set(expected)
    assert len(got) == (15 if stride_um is None else 86)  # 5 x 3 of 112 px; at a 50 um stride 11 x 8 less 2 corners
    centres = np.array([expected[name] for name in got.index])
    np.testing.assert_array_equal(got[["x_px", "y_px"]].to_numpy(), centres)
    assert (centres - box / 2 >= 0).all() and (centres[:, 0] + box / 2 <= SLIDE_W).all()
    assert (centres[:, 1] + box / 2 <= SLIDE_H).all()
    table = read_h5ad(out / "predictions.h5ad")
    assert list(table.obs.index) == list(got.index)
    np.testing.assert_allclose(table.X.toarray(), got[GENES].to_numpy(), rtol=1e-5)
    if stride_um:  # overlapping tiles: neighbours' corners 50 px apart, each tile still 112 px
        assert read_h5ad(out / "predictions.h5ad").uns["expreg_map"]["stride_um"] == 50.0
        assert set(np.diff(np.unique(centres[:, 0])).tolist()) == {50}


def _full_mask(shape, value=True):
    return TissueMask(np.full(shape, value), (1.0, 1.0), "test")


def test_make_grid_fits_centres_and_keeps_tiles_by_tissue_fraction():
    grid = make_grid((1000, 500), 100, 100, _full_mask((500, 1000)), 0.5)
    assert grid.shape == (5, 10) and len(grid) == 50 and grid.origin == (0.0, 0.0)
    assert grid.names()[:2] == ["tile_0_0", "tile_0_1"] and grid.names()[-1] == "tile_4_9"
    np.testing.assert_array_equal(grid.centre_x[:3], [50, 150, 250])
    grid = make_grid((1000, 520), 100, 60.5, _full_mask((520, 1000)), 0.5)
    assert grid.shape == (7, 15)  # (520 - 100) / 60.5 = 6.9 -> 7 rows; (1000 - 100) / 60.5 = 14.9 -> 15
    assert grid.x0.min() >= 0 and (grid.x0 + 100).max() <= 1000 and (grid.y0 + 100).max() <= 520
    assert abs(grid.x0.min() - (1000 - grid.x0.max() - 100)) <= 1  # centred
    assert abs(grid.y0.min() - (520 - grid.y0.max() - 100)) <= 1
    assert len(make_grid((99, 500), 100, 100, _full_mask((500, 99)), 0.0)) == 0
    half = np.zeros((100, 400), bool)
    half[:, 150:] = True  # tile 1 (x 100..200) is exactly half tissue
    mask = TissueMask(half[::2, ::2], (2.0, 2.0), "test")  # a mask at half the slide's resolution
    grid = make_grid((400, 100), 100, 100, mask, 0.5)
    assert grid.col.tolist() == [1, 2, 3] and grid.tissue.tolist() == [0.5, 1.0, 1.0]
    assert make_grid((400, 100), 100, 100, mask, 0.51).col.tolist() == [2, 3]
    raster = grid.raster(np.array([1.0, 2.0, 3.0]))
    assert np.isnan(raster[0, 0]) and raster[0, 1:].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="must be positive"):
        make_grid((400, 100), 0, 100, mask, 0.5)


def test_otsu_threshold_splits_two_modes_and_detect_tissue_finds_the_section():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.05, 0.02, 3000), rng.normal(0.6, 0.05, 1000)]).clip(0, 1)
    threshold = otsu_threshold(values)
    assert (values[:3000] <= threshold).mean() > 0.99 and (values[3000:] > threshold).all()
    assert otsu_threshold(np.full(100, 0.3)) == 1.0 and otsu_threshold(np.array([])) == 1.0
    thumb = tissue_pixels(200, 150, (40, 30, 160, 120))
    thumb[70:75, 95:100] = 250  # a white hole inside the section: filled
    thumb[5:7, 5:7] = (200, 60, 150)  # a speck of dust on the glass: removed
    thumb[:, :3] = 0  # a black scanner border: never tissue
    tissue = detect_tissue(thumb, (4.0, 4.0))
    truth = np.zeros((150, 200), bool)
    truth[30:120, 40:160] = True
    assert (tissue.mask == truth).mean() > 0.995 and tissue.mask[72, 97] and not tissue.mask[6, 6]
    assert not tissue.mask[:, :3].any() and tissue.threshold >= MIN_SATURATION
    assert tissue.area_mm2(1.0) == pytest.approx(truth.sum() * 16 / 1e6, rel=0.02)
    blank = detect_tissue(glass(200, 150), (1.0, 1.0))
    assert not blank.mask.any() and blank.fraction == 0.0


# ---------------------------------------------------------------- 5. outputs


def test_outputs_hold_the_predictions_in_expression_units_with_their_positions(tmp_path, model_dir, model, pixels):
    from expreg.inference import predict_files

    slide = write_slide("png", tmp_path / "slide", pixels)
    out = tmp_path / "out"
    # 1.75 um/px: a 112 um tile is 64 px, the model's patch_px, so a tile is exactly the slide's pixels
    assert main(map_args(model_dir, slide, out, "--um_per_px", "1.75", genes=None)) == 0
    table, got = read_h5ad(out / "predictions.h5ad"), predictions(out)
    assert table.X.shape == (len(got), len(GENES)) and len(got) > 10
    np.testing.assert_allclose(table.X.toarray(), got[GENES].to_numpy(), rtol=1e-5)  # the CSV: 6 digits
    assert list(table.var_names) == GENES and list(table.obs.index) == list(got.index)
    np.testing.assert_allclose(table.obs[["x_px", "y_px"]].to_numpy(), got[["x_px", "y_px"]].to_numpy())
    np.testing.assert_allclose(table.obsm["spatial"], got[["x_px", "y_px"]].to_numpy())
    info = table.uns["expreg_map"]
    assert info["um_per_px"] == 1.75 and info["patch_um"] == PATCH_UM and info["stride_um"] == PATCH_UM
    assert info["model"] == str(model_dir) and info["tile_px_level0"] == 64 and info["units"].startswith("log1p")
    files = []
    for name, x, y in zip(got.index, got["x_px"], got["y_px"]):  # the tile around each centre, cut here
        x0, y0 = int(x) - 32, int(y) - 32
        files.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(pixels[y0 : y0 + 64, x0 : x0 + 64]).save(files[-1])
    expected = predict_files(model, files, accelerator(), batch_size=7, num_workers=0)
    np.testing.assert_allclose(table.X.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected.mean(axis=0) - np.array(model.config.target_mean)).max() < 3  # expression units
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == len(got) and summary["genes"] == len(GENES) and summary["tiles_per_s"] > 0
    tissue_mm2 = (TISSUE_RECT[2] - TISSUE_RECT[0]) * (TISSUE_RECT[3] - TISSUE_RECT[1]) * 1.75**2 / 1e6
    assert summary["tissue_area_mm2"] == pytest.approx(tissue_mm2, rel=0.05)
    assert summary["overview_genes"] == sorted(GENES, key=lambda g: -got[g].var(ddof=0))
    pictures = ["thumbnail.png", "mask.png", "overview.png", *(f"maps/{g}.png" for g in GENES)]
    assert all(is_png(out / p) for p in pictures)
    assert sorted(p.name for p in (out / "maps").iterdir()) == [f"{g}.png" for g in GENES]
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (192, 256) and set(np.unique(mask)) == {0, 255}
    # --genes: only those maps, and the overview shows them in the order asked
    assert main(map_args(model_dir, slide, tmp_path / "two", "--um_per_px", "1.75", genes="G3,G1")) == 0
    assert sorted(p.name for p in (tmp_path / "two" / "maps").iterdir()) == ["G1.png", "G3.png"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["overview_genes"] == ["G3", "G1"]
    np.testing.assert_allclose(predictions(tmp_path / "two").to_numpy(), got.to_numpy())  # all genes predicted


# ---------------------------------------------------------------- 6. --measured


def test_spot_predictions_and_metrics_agree_with_predict_on_the_prepared_patches(tmp_path, model_dir, model, section):
    from expreg.inference import predict_files

    prepared = section["prepared"]
    out = tmp_path / "out"
    assert main(map_args(model_dir, section["image"], out, "--measured", str(prepared))) == 0
    meta = pd.read_csv(prepared / "metadata.csv")
    expected = predict_files(model, [str(prepared / p) for p in meta["path"]], accelerator(), 8, 0)
    table = pd.read_csv(out / "measured_vs_predicted.csv").set_index("barcode").loc[meta["barcode"]]
    assert len(table) == 20
    np.testing.assert_allclose(table[[f"predicted:{g}" for g in GENES]].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    targets = transform_counts(section["counts"], list(range(len(GENES))), "log1p_cpm")  # G0..G4 of all 8 genes
    np.testing.assert_allclose(table[[f"measured:{g}" for g in GENES]].to_numpy(), targets, rtol=1e-5)
    np.testing.assert_allclose(table[["x_px", "y_px"]].to_numpy(), np.array(SPOTS_XY, float))
    library = np.asarray(section["counts"].sum(axis=1)).ravel()  # every gene the spot measured, not the model's 5
    metrics = compute_metrics(expected, targets.astype(np.float64), GENES, library_size=library)
    record = json.loads((out / "spot_metrics.json").read_text())
    assert record["num_samples"] == 20 and record["num_genes"] == len(GENES)
    assert record["spearman_mean"] == pytest.approx(metrics.spearman_mean, rel=1e-5, abs=1e-6)
    assert record["pearson_mean"] == pytest.approx(metrics.pearson_mean, rel=1e-5, abs=1e-6)
    for key in ("spearman_depth_adjusted_mean", "pearson_depth_adjusted_mean", "depth_oracle_spearman_mean"):
        assert record[key] == pytest.approx(metrics.summary[key], rel=1e-5, abs=1e-6), key
    assert "spearman_depth_adjusted" in pd.read_csv(out / "per_gene_spot_metrics.csv").columns
    assert record["target_transform"] == "log1p_cpm" and len(record["drawn"]) == 5  # 3 best + 2 others of 5
    assert is_png(out / "measured_vs_predicted.png") and (out / "per_gene_spot_metrics.csv").is_file()
    assert json.loads((out / "summary.json").read_text())["um_per_px_source"].startswith(str(prepared))
    # the Space Ranger folder itself: the same spots, scale and predictions
    direct = tmp_path / "direct"
    args = ["--measured", str(section["sample"]), "--spot_pitch_um", str(SPOT_PITCH_UM)]
    assert main(map_args(model_dir, section["image"], direct, *args)) == 0
    again = pd.read_csv(direct / "measured_vs_predicted.csv").set_index("barcode").loc[meta["barcode"]]
    np.testing.assert_allclose(again.to_numpy(), table.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predictions(direct).to_numpy(), predictions(out).to_numpy(), rtol=1e-5, atol=1e-6)


def test_spot_outputs_when_no_gene_varies_at_the_spots_draw_no_picture(tmp_path):
    from types import SimpleNamespace

    from expreg.maps import outputs

    predicted = np.random.default_rng(0).normal(size=(6, 2))
    measured = np.ones((6, 2))  # constant: every Spearman is undefined
    metrics = compute_metrics(predicted, measured, ["G0", "G1"])
    config = SimpleNamespace(target_transform="log1p_cpm")
    plan = SimpleNamespace(thumbnail=np.full((10, 10, 3), 255, np.uint8), slide=SimpleNamespace(size=(100, 100)))
    plan.model = SimpleNamespace(config=config)
    spots = {"barcode": [f"s{i}" for i in range(6)], "x_px": np.arange(6.0) * 10, "y_px": np.full(6, 50.0)}
    assert outputs.write_measured(tmp_path, plan, spots, metrics, measured, predicted) == []
    table = pd.read_csv(tmp_path / "measured_vs_predicted.csv")
    assert list(table.columns) == [
        "barcode",
        "x_px",
        "y_px",
        "measured:G0",
        "predicted:G0",
        "measured:G1",
        "predicted:G1",
    ]
    np.testing.assert_allclose(table["predicted:G1"], predicted[:, 1], rtol=1e-5)
    assert not (tmp_path / "measured_vs_predicted.png").exists()


# ---------------------------------------------------------------- 7. bad inputs


def test_a_file_that_is_not_an_image_is_named(tmp_path, model_dir, capsys):
    slide = tmp_path / "slide.png"
    slide.write_text("barcode,x,y\n")
    out = tmp_path / "out"
    assert main(map_args(model_dir, slide, out, "--um_per_px", "1")) == 2
    err = capsys.readouterr().err
    assert str(slide) in err and "not an image" in err and nothing_written(out)
    assert main(map_args(model_dir, tmp_path / "missing.tif", out, "--um_per_px", "1")) == 2
    assert "no such image file" in capsys.readouterr().err and nothing_written(out)


def _corrupt_tile(path: Path, page: int, index: int) -> None:
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[page].dataoffsets[index], tif.pages[page].databytecounts[index]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("levels", [3, 1])
def test_a_corrupt_tile_is_named_with_its_position(levels, tmp_path, model_dir, pixels, capsys):
    slide = write_pyramid(tmp_path / "slide.tif", pixels, levels=levels)
    _corrupt_tile(slide, 0, 5)  # level 0, tile row 1, column 1: x 256..512, y 256..512 (in the tissue)
    out = tmp_path / "out"
    assert main(map_args(model_dir, slide, out, "--um_per_px", "1")) == 2
    err = capsys.readouterr().err
    assert str(slide) in err and "corrupt" in err and nothing_written(out)
    if levels == 3:  # the thumbnail comes from level 2: the first tile over the broken one is named
        assert "cannot read tile_1_2 (level-0 x 232..344, y 160..272)" in err
    else:  # no pyramid: the thumbnail, read from level 0 band by band, meets it first
        assert "cannot read level 0 region" in err and "while reading the thumbnail" in err


def test_no_tissue_writes_the_thumbnail_and_mask_and_a_rerun_is_allowed(tmp_path, model_dir, png_slide, capsys):
    blank = tmp_path / "blank.png"
    Image.fromarray(glass(500, 400)).save(blank)
    out = tmp_path / "out"
    assert main(map_args(model_dir, blank, out, "--um_per_px", "1")) == 2
    err = capsys.readouterr().err
    assert "no 112 µm tile has 50% tissue" in err and "thumbnail.png" in err
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "no_tissue.json", "thumbnail.png"]
    assert is_png(out / "thumbnail.png") and not np.asarray(Image.open(out / "mask.png")).any()
    assert json.loads((out / "no_tissue.json").read_text())["tissue_fraction_of_slide"] == 0
    assert main(map_args(model_dir, blank, out, "--um_per_px", "1")) == 2  # again: not "exists"
    assert "exists" not in capsys.readouterr().err
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1")) == 0  # the same folder, a real map
    assert (out / "predictions.h5ad").is_file() and not (out / "no_tissue.json").exists()


def test_bad_models_genes_masks_and_out_dirs_are_named(tmp_path, work, model_dir, png_slide, capsys):
    out = tmp_path / "out"
    no_geometry = save_model(tmp_path / "nogeom", patch_um=None)
    assert main(map_args(no_geometry, png_slide, out, "--um_per_px", "1")) == 2
    assert "does not record the physical size of its training patches (patch_um)" in capsys.readouterr().err
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1", genes="G1,NOPE,ALSO")) == 2
    assert "--genes: the model does not predict NOPE, ALSO" in capsys.readouterr().err
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(tmp_path / "square.png")
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1", "--mask", str(tmp_path / "square.png"))) == 2
    assert "--mask" in (err := capsys.readouterr().err) and "aspect" in err and "not a mask of this slide" in err
    assert nothing_written(out)
    out.mkdir()
    (out / "predictions.csv").write_text("a finished map\n")
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1")) == 2
    assert "exists; choose another folder or pass --overwrite" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == "a finished map\n"
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1", "--overwrite")) == 0
    assert (out / "predictions.h5ad").is_file()


def test_bad_measured_sections_are_named(tmp_path, model_dir, png_slide, section, capsys):
    out = tmp_path / "out"
    args = ["--measured", str(section["prepared"]), "--sample_id", "S1"]
    assert main(map_args(model_dir, png_slide, out, *args)) == 2  # the section's image is not this slide
    err = capsys.readouterr().err
    assert f"900 x 580 px image, but {png_slide} is 1024 x 768 px" in err and "not the image" in err
    no_transform = save_model(tmp_path / "notransform", target_transform=None)
    assert main(map_args(no_transform, section["image"], out, "--measured", str(section["prepared"]))) == 2
    assert "pass --target_transform" in capsys.readouterr().err
    other = save_model(tmp_path / "other", genes=["A1", "B2"])
    assert main(map_args(other, section["image"], out, "--measured", str(section["prepared"]), genes=None)) == 2
    assert "measured none of the model's 2 genes (A1, B2)" in capsys.readouterr().err
    assert nothing_written(out)


def test_a_model_without_target_transform_may_be_told_it(tmp_path, section):
    from expreg.inference import load_model

    model = load_model(str(save_model(tmp_path / "notransform", target_transform=None)))
    plan = _plan(model, section["image"], tmp_path / "o", measured=str(section["prepared"]), target_transform="log1p")
    assert plan.target_transform == "log1p" and len(plan.measured.barcodes) == 20


# ---------------------------------------------------------------- 8. real data


def test_real_her2st_section_c2_with_its_measured_spots(tmp_path):
    hest = HER2ST_ST / "hest"
    if not (hest / "wsis" / "C2.tif").is_file():
        pytest.skip(f"real HER2ST section not available at {hest}")
    table = read_h5ad(hest / "st" / "C2.h5ad")
    totals = np.asarray(table.X.sum(axis=0)).ravel()
    genes = [table.var_names[i] for i in np.argsort(-totals)[:5]]
    model_dir = save_model(tmp_path / "tiny", genes=genes)
    out = tmp_path / "c2"
    args = ["--measured", str(hest), "--sample_id", "C2", "--batch_size", "512"]
    assert main(map_args(model_dir, hest / "wsis" / "C2.tif", out, *args, genes=genes[0])) == 0
    record = json.loads((out / "spot_metrics.json").read_text())
    assert record["num_samples"] == 187 and record["num_genes"] == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] > 300 and summary["level"] == 1 and summary["um_per_px"] == pytest.approx(0.688, rel=0.01)


# ---------------------------------------------------------------- 4. two processes


@pytest.mark.slow
def test_two_processes_give_every_tile_once_and_the_same_predictions(tmp_path, model_dir, section):
    # the section's 8 x 5 tiles less the 3 at the bottom right: 37, in batches of 8 (the last one partial)
    mask = np.full((SAMPLE_H, SAMPLE_W), 255, np.uint8)
    mask[458:, 562:] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    extra = ["--mask", str(tmp_path / "mask.png"), "--thumbnail_px", "1024", "--batch_size", "8"]
    extra += ["--measured", str(section["prepared"])]
    one = tmp_path / "one"
    assert main(map_args(model_dir, section["image"], one, *extra)) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1")
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
    two = tmp_path / "two"
    cmd = [*launcher, "-m", "expreg.map", *map_args(model_dir, section["image"], two, *extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    a, b = predictions(one), predictions(two)
    assert len(a) == 37 and b.index.is_unique and list(b.index) == list(a.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-5)
    spots_a, spots_b = (pd.read_csv(d / "measured_vs_predicted.csv") for d in (one, two))
    assert len(spots_b) == 20 and list(spots_b["barcode"]) == list(spots_a["barcode"])
    np.testing.assert_allclose(spots_b.iloc[:, 1:].to_numpy(), spots_a.iloc[:, 1:].to_numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads((two / "summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize("box", [163, 164])
def test_a_tile_centre_is_where_prepare_would_centre_a_patch(box):
    """obs x/y of a tile, given to expreg.prepare's patch_box, gives back exactly that tile (odd and even sides)."""
    from expreg.ingest.patches import PatchGeometry, patch_box

    geometry = PatchGeometry(patch_um=box * 0.5, patch_px=64, um_per_px=0.5)
    assert geometry.box_px == box
    grid = make_grid((2000, 1500), box, 150.5, _full_mask((150, 200)), 0.5)
    assert len(grid) > 50
    for x0, y0, cx, cy in zip(grid.x0, grid.y0, grid.centre_x, grid.centre_y):
        assert patch_box(cx, cy, geometry) == (x0, y0, box, box)


# ---------------------------------------------------------------- review fixes


def test_a_target_transform_that_contradicts_the_model_is_refused(tmp_path, model_dir, section, capsys):
    out = tmp_path / "out"
    args = ["--measured", str(section["prepared"]), "--target_transform", "log1p"]
    assert main(map_args(model_dir, section["image"], out, *args)) == 2
    assert "the model records that its targets were log1p_cpm" in capsys.readouterr().err
    assert nothing_written(out)


def test_overwriting_a_map_with_a_slide_without_tissue_leaves_only_the_diagnostics(tmp_path, model_dir, png_slide):
    out = tmp_path / "out"
    assert main(map_args(model_dir, png_slide, out, "--um_per_px", "1")) == 0
    blank = tmp_path / "blank.png"
    Image.fromarray(glass(500, 400)).save(blank)
    assert main(map_args(model_dir, blank, out, "--um_per_px", "1", "--overwrite")) == 2
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "no_tissue.json", "thumbnail.png"]


def test_an_out_dir_that_holds_an_input_is_never_replaced(tmp_path, model_dir, pixels, capsys):
    out = tmp_path / "out"
    out.mkdir()
    slide = out / "slide.png"
    Image.fromarray(pixels).save(slide)
    assert main(map_args(model_dir, slide, out, "--um_per_px", "1", "--overwrite")) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["slide.png"]


def test_genes_only_another_sample_measured_are_left_out_not_scored_as_zeros(tmp_path, work):
    """A prepare folder holds the union of its samples' genes: S1's zeros for S2's gene GX are no measurement."""
    s1, _ = make_spaceranger(tmp_path / "sr", "S1", seed=3)
    s2, _ = make_spaceranger(tmp_path / "sr", "S2", seed=4, genes=[*MEASURED_GENES, "GX"])
    (tmp_path / "sheet.csv").write_text(f"sample_id,group_id,path\nS1,P1,{s1}\nS2,P2,{s2}\n")
    prepare(
        tmp_path / "sheet.csv",
        tmp_path / "prepared",
        Options(patch_um=PATCH_UM, patch_px=PATCH_PX, spot_pitch_um=SPOT_PITCH_UM),
    )
    model = save_model(tmp_path / "gx", genes=[*GENES, "GX"])
    out = tmp_path / "out"
    args = ["--measured", str(tmp_path / "prepared"), "--sample_id", "S1"]
    assert main(map_args(model, s1 / "S1_fullres.png", out, *args, genes=None)) == 0
    record = json.loads((out / "spot_metrics.json").read_text())
    assert record["genes_not_measured"] == ["GX"] and record["num_genes"] == len(GENES)
    assert [r["gene"] for r in record["per_gene"]] == GENES
    assert (
        main(map_args(model, s2 / "S2_fullres.png", tmp_path / "out2", *args[:2], "--sample_id", "S2", genes=None))
        == 0
    )
    assert json.loads((tmp_path / "out2" / "spot_metrics.json").read_text())["num_genes"] == len(GENES) + 1


def test_tissue_running_off_the_slide_is_not_eroded_at_the_border():
    thumb = np.full((60, 80, 3), 250, np.uint8)
    thumb[10:, 40:] = (180, 80, 160)  # tissue to the right and bottom edges
    mask = detect_tissue(thumb, (1.0, 1.0)).mask
    assert mask[10:, 40:].all() and not mask[:8].any() and not mask[:, :38].any()


def test_every_picture_has_a_scale_bar_in_um_and_the_tiles_the_opacity_asked(tmp_path):
    """Gene maps, the overview and the thumbnail carry a round-length scale bar; ``--alpha`` is the tiles' opacity
    (0..1, anything else refused); the colour bar says the range is clipped."""
    import argparse

    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from expreg.map import _opacity
    from expreg.maps import pictures
    from expreg.maps.grid import make_grid

    assert [pictures.scale_bar_um(w) for w in (1000, 2600, 9000, 60)] == [200, 500, 1000, 10]
    with pytest.raises(argparse.ArgumentTypeError, match="an opacity from 0"):
        _opacity("1.5")
    assert _opacity("0.4") == 0.4
    thumbnail = np.full((96, 128, 3), 230, np.uint8)
    grid = make_grid((256, 192), 32, 32, _full_mask((192, 256)), 0.5)
    maps = pictures.GeneMaps(thumbnail, (256, 192), grid, "log1p CPM", "slide", um_per_px=2.0, alpha=0.4)
    maps.draw(tmp_path / "g.png", np.arange(len(grid), dtype=float), "G1")
    bars = [a for a in maps.ax.artists if isinstance(a, AnchoredSizeBar)]
    assert len(bars) == 1 and bars[0].txt_label.get_text() == "100 µm"  # 512 µm wide: a fifth, rounded
    assert maps.image.get_alpha() == 0.4 and "clipped to its 1st-99th percentile" in maps.bar.ax.get_ylabel()
    maps.close()
    mask = np.zeros((96, 128), bool)
    mask[20:70, 30:100] = True
    pictures.save_thumbnail(tmp_path / "t.png", thumbnail, mask, um_per_thumbnail_px=4.0)
    drawn = np.asarray(Image.open(tmp_path / "t.png"))
    corner = drawn[-30:, :70]
    assert (corner == 0).all(axis=2).sum() > 20 and (corner == 255).all(axis=2).sum() > 50  # black bar on white
