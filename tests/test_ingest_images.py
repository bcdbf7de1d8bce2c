"""Slides and patches (expreg.ingest.images, expreg.ingest.patches) on images written here, and on C2 of her2st_st."""

from __future__ import annotations

import csv
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from expreg.ingest.images import SlideError, open_slide
from expreg.ingest.patches import (
    NO_POSITION,
    OUTSIDE,
    PatchGeometry,
    cut_patch,
    inside,
    iter_patches,
    patch_box,
)

HER2ST_ST = Path(__file__).resolve().parents[1].parent / "shared/data/her2st_st"
JPEG_MEAN_TOLERANCE = 3.0  # mean |difference| on 0..255 of a smooth pattern through JPEG (measured ~1)


def smooth(height: int, width: int) -> np.ndarray:
    """A smooth RGB pattern that survives JPEG well and differs everywhere (for checking positions)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        128 + 100 * np.sin(xx / 23 + yy / 41),
        128 + 100 * np.cos(yy / 31 - xx / 57),
        128 + 100 * np.sin((xx - yy) / 53),
    ]
    return np.clip(np.stack(channels, axis=-1) + 0.5, 0, 255).astype(np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def halve(pixels: np.ndarray) -> np.ndarray:
    """2 x 2 mean (odd last row/column dropped): the next pyramid level."""
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    blocks = pixels[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3)
    return (blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def write_pyramid(path: Path, pixels: np.ndarray, levels: int = 3, subifds: bool = False, compression="jpeg"):
    """A tiled (256) pyramidal TIFF: levels as SubIFDs of page 0, or as successive pages (HEST-1k)."""
    pyramid = [pixels]
    for _ in range(levels - 1):
        pyramid.append(halve(pyramid[-1]))
    options = {"tile": (256, 256), "compression": compression, "photometric": "rgb"}
    with tifffile.TiffWriter(path) as writer:
        if subifds:
            writer.write(pyramid[0], subifds=levels - 1, **options)
            for level in pyramid[1:]:
                writer.write(level, subfiletype=1, **options)
        else:
            for level in pyramid:
                writer.write(level, **options)
    return pyramid


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.fixture(scope="module")
def pyramid_tif(tmp_path_factory):
    """1101 x 1301 px smooth pattern, JPEG tiles, 3 levels as successive pages; returns (path, pyramid)."""
    path = tmp_path_factory.mktemp("slides") / "pyramid.tif"
    return path, write_pyramid(path, smooth(1101, 1301))


# ---------------------------------------------------------------- plain images


def test_png_reads_exact_regions(tmp_path):
    pixels = noise(300, 400)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as slide:
        assert (slide.size, slide.level_sizes, slide.tiled) == ((400, 300), [(400, 300)], False)
        for x, y, w, h in [(0, 0, 400, 300), (17, 33, 224, 101), (399, 299, 1, 1)]:
            np.testing.assert_array_equal(slide.read_region(x, y, w, h), pixels[y : y + h, x : x + w])
        assert slide.read_region(5, 5, 7, 9).dtype == np.uint8


def test_regions_crossing_the_border_are_white(tmp_path):
    pixels = noise(100, 120)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as slide:
        region = slide.read_region(-10, -5, 30, 20)
        assert region.shape == (20, 30, 3)
        assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
        np.testing.assert_array_equal(region[5:, 10:], pixels[:15, :20])
        region = slide.read_region(110, 90, 20, 20)
        np.testing.assert_array_equal(region[:10, :10], pixels[90:, 110:])
        assert (region[10:] == 255).all() and (region[:, 10:] == 255).all()
        assert (slide.read_region(500, 500, 8, 8) == 255).all()


def test_jpeg_within_tolerance(tmp_path):
    pixels = smooth(320, 410)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    with open_slide(tmp_path / "a.jpg") as slide:
        assert slide.size == (410, 320)
        assert mad(slide.read_region(50, 60, 224, 224), pixels[60:284, 50:274]) < JPEG_MEAN_TOLERANCE


def test_rgba_png_is_composited_onto_white(tmp_path):
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 0  # transparent -> white
    rgba[:, 4:8, 3] = 255  # opaque -> the colour
    rgba[:, 8:, 3] = 128  # half -> halfway to white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as slide:
        region = slide.read_region(0, 0, 12, 10)
    assert (region[:, :4] == 255).all()
    assert (region[:, 4:8] == [200, 0, 0]).all()
    assert np.allclose(region[:, 8:], [200 + 55 * 127 / 255, 127, 127], atol=1.5)


def test_16bit_greyscale_is_scaled_to_8bit_rgb(tmp_path):
    grey = (np.arange(40 * 50).reshape(40, 50) * 32).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as slide:
        region = slide.read_region(0, 0, 50, 40)
    assert region.shape == (40, 50, 3) and region.dtype == np.uint8
    assert (region[..., 0] == region[..., 2]).all()
    np.testing.assert_allclose(region[..., 1], grey / 257, atol=0.51)


@pytest.mark.parametrize("mode", ["L", "LA", "P"])
def test_greyscale_and_palette_modes_become_rgb(tmp_path, mode):
    image = Image.fromarray(noise(20, 30)).convert(mode)
    image.save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as slide:
        region = slide.read_region(0, 0, 30, 20)
    np.testing.assert_array_equal(region, np.asarray(image.convert("RGBA").convert("RGB")))


def test_plain_tiff_is_decoded_whole_and_exact(tmp_path):
    pixels = noise(130, 170)
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="rgb")
    with open_slide(tmp_path / "a.tif") as slide:
        assert (slide.tiled, slide.level_sizes) == (False, [(170, 130)])
        np.testing.assert_array_equal(slide.read_region(20, 30, 100, 90), pixels[30:120, 20:120])


def test_large_plain_image_is_not_refused(tmp_path):
    """A plain image beyond Pillow's decompression-bomb limit opens (the limit is lifted locally only)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # as if the image were a 10k x 10k H&E under the default limit
    try:
        Image.fromarray(noise(100, 100)).save(tmp_path / "a.png")
        with open_slide(tmp_path / "a.png") as slide:
            assert slide.size == (100, 100)
        assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# ---------------------------------------------------------------- tiled pyramids


@pytest.mark.parametrize("subifds", [False, True], ids=["pages", "subifds"])
def test_tiled_pyramid_levels_and_regions(tmp_path, subifds):
    pixels = smooth(1101, 1301)
    pyramid = write_pyramid(tmp_path / "a.tif", pixels, subifds=subifds)
    with open_slide(tmp_path / "a.tif") as slide:
        assert slide.tiled and slide.size == (1301, 1101)
        assert slide.level_sizes == [(1301, 1101), (650, 550), (325, 275)]
        assert mad(slide.read_region(300, 250, 224, 224), pixels[250:474, 300:524]) < JPEG_MEAN_TOLERANCE
        region = slide.read_region(400, 200, 448, 448, level=1)
        assert region.shape == (224, 224, 3)
        assert mad(region, pyramid[1][100:324, 200:424]) < JPEG_MEAN_TOLERANCE
        border = slide.read_region(1200, 1000, 224, 224)  # crosses the right and bottom edges
        assert (border[101:] == 255).all() and (border[:, 101:] == 255).all()
        assert mad(border[:101, :101], pixels[1000:, 1200:]) < JPEG_MEAN_TOLERANCE


def test_tiled_lossless_regions_are_exact(tmp_path):
    pixels = noise(700, 600)
    pyramid = write_pyramid(tmp_path / "a.tif", pixels, levels=2, compression="zlib")
    with open_slide(tmp_path / "a.tif") as slide:
        np.testing.assert_array_equal(slide.read_region(250, 240, 300, 300), pixels[240:540, 250:550])
        np.testing.assert_array_equal(slide.read_region(100, 60, 200, 100, level=1), pyramid[1][30:80, 50:150])
        region = slide.read_region(-20, 650, 100, 100)
        np.testing.assert_array_equal(region[:50, 20:], pixels[650:, :80])
        assert (region[50:] == 255).all() and (region[:, :20] == 255).all()
        # 0.25 um/px: a 448-px box is 224 level-1 px, read as is (snapped to whole level pixels)
        patch = cut_patch(slide, 301, 300, PatchGeometry(112, 224, 0.25))
        np.testing.assert_array_equal(np.asarray(patch), pyramid[1][38:262, 39:263])


def test_svs_style_file_skips_thumbnail_and_label_pages(tmp_path):
    """Tiled level 0, an untiled thumbnail of the same aspect, a tiled level, an untiled label of another aspect."""
    pixels = smooth(512, 768)
    with tifffile.TiffWriter(tmp_path / "a.tif") as writer:
        writer.write(pixels, tile=(256, 256), compression="jpeg", photometric="rgb")
        writer.write(halve(halve(halve(pixels))), photometric="rgb")  # thumbnail, untiled
        writer.write(halve(pixels), tile=(256, 256), compression="jpeg", photometric="rgb")
        writer.write(noise(200, 200), photometric="rgb")  # label
        writer.write(noise(300, 800), tile=(256, 256), compression="jpeg", photometric="rgb")  # macro
    with open_slide(tmp_path / "a.tif") as slide:
        assert slide.level_sizes == [(768, 512), (384, 256)]


def test_best_level(pyramid_tif):
    with open_slide(pyramid_tif[0]) as slide:
        assert [round(d, 3) for d in slide.downsamples] == [1.0, 2.002, 4.003]
        assert [slide.best_level(d) for d in (0.5, 1.0, 1.99, 2.0, 3.9, 4.0, 100.0)] == [0, 0, 1, 1, 1, 2, 2]


def test_thumbnail_from_the_smallest_level_that_is_large_enough(pyramid_tif):
    with open_slide(pyramid_tif[0]) as slide:
        thumb = slide.thumbnail(300)
        assert thumb.shape == (254, 300, 3)
        assert mad(thumb, np.asarray(Image.fromarray(pyramid_tif[1][2]).resize((300, 254)))) < 4
        assert slide.thumbnail(5000).shape == (1101, 1301, 3)  # never enlarged


def test_a_plain_image_preview_matches_its_thumbnail(tmp_path, pyramid_tif, monkeypatch):
    """``preview`` (the qc pictures' quick path: a whole-factor box reduction band by band, then a resize)
    gives the thumbnail's size and, to the eye, its pixels; the bands change nothing."""
    from expreg.ingest import images

    path = tmp_path / "plain.png"
    Image.fromarray(pyramid_tif[1][0]).save(path)  # level 0 of the pyramid, 1301 x 1101, as one plain image
    with open_slide(path) as slide:
        preview, thumb = slide.preview(300), slide.thumbnail(300)
        assert preview.shape == thumb.shape == (254, 300, 3) and mad(preview, thumb) < 4
        assert slide.preview(5000).shape == (1101, 1301, 3)  # never enlarged
        monkeypatch.setattr(images, "PREVIEW_BAND_ROWS", 10)  # bands of 8 rows: 2 boxes of the factor 4
        np.testing.assert_array_equal(slide.preview(300), preview)


def test_patch_from_level_1_matches_the_patch_from_level_0(pyramid_tif):
    geom = PatchGeometry(patch_um=112, patch_px=56, um_per_px=0.5)  # 224 level-0 px -> 56: downsample 4
    with open_slide(pyramid_tif[0]) as slide:
        assert slide.best_level(geom.downsample) == 2
        for x, y in [(400, 300), (777.3, 512.8), (1000, 900)]:
            patches = [np.asarray(cut_patch(slide, x, y, geom, level=level)) for level in (0, 1, 2)]
            assert all(p.shape == (56, 56, 3) for p in patches)
            assert mad(patches[1], patches[0]) < 3 and mad(patches[2], patches[0]) < 3


# ---------------------------------------------------------------- patch geometry


def test_patch_box_centring_for_even_and_odd_sides():
    even = PatchGeometry(patch_um=112, patch_px=224, um_per_px=0.5)  # 224 px
    assert even.side_px == 224 and patch_box(1000, 500, even) == (888, 388, 224, 224)
    odd = PatchGeometry(patch_um=112.5, patch_px=224, um_per_px=0.5)  # 225 px: 112 either side
    assert patch_box(1000, 500, odd) == (888, 388, 225, 225)
    assert patch_box(1000.5, 499.49, even) == (889, 387, 224, 224)  # centre rounded half up
    c2 = PatchGeometry(patch_um=112, patch_px=224, um_per_px=100 / 145.3281)  # side 162.77 -> 163
    assert patch_box(6931, 3510, c2) == (6931 - 81, 3510 - 81, 163, 163)
    with pytest.raises(ValueError):
        PatchGeometry(patch_um=0)


def test_inside():
    assert inside((100, 80), (0, 0, 100, 80))
    assert not inside((100, 80), (-1, 0, 10, 10)) and not inside((100, 80), (91, 0, 10, 10))
    assert not inside((100, 80), (0, 71, 10, 10))
    assert inside((100, 80), (-1, 0, 10, 10), max_outside=0.1) and not inside((100, 80), (-2, 0, 10, 10), 0.1)
    assert not inside((100, 80), (200, 200, 10, 10), max_outside=0.99)


def test_cut_patch_size_filters_and_exact_copy(tmp_path):
    pixels = noise(600, 600)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as slide:
        exact = cut_patch(slide, 300, 300, PatchGeometry(112, 224, 0.5))
        np.testing.assert_array_equal(np.asarray(exact), pixels[188:412, 188:412])  # no resampling
        for um_per_px in (0.25, 0.3, 0.7, 1.3):  # downsampling (LANCZOS) and enlarging (BICUBIC)
            patch = cut_patch(slide, 300.4, 299.6, PatchGeometry(112, 224, um_per_px))
            assert patch.mode == "RGB" and patch.size == (224, 224)
        half = np.asarray(cut_patch(slide, 300, 300, PatchGeometry(112, 112, 0.5)))
        reference = Image.fromarray(pixels[188:412, 188:412]).resize((112, 112), Image.Resampling.LANCZOS)
        assert mad(half, reference) < 2  # same filter; only the margin outside the box differs


def test_iter_patches_order_and_reasons(pyramid_tif):
    geom = PatchGeometry(patch_um=112, patch_px=56, um_per_px=0.5)
    xs, ys = [400, 50, float("nan"), 1000, 1290], [300, 500, 10, 900, 600]
    with open_slide(pyramid_tif[0]) as slide:
        results = list(iter_patches(slide, xs, ys, geom, progress=False))
        assert [r[0] for r in results] == [0, 1, 2, 3, 4]
        assert [r[2] for r in results] == [None, OUTSIDE, NO_POSITION, None, OUTSIDE]
        assert np.array_equal(np.asarray(results[3][1]), np.asarray(cut_patch(slide, 1000, 900, geom)))
        assert [r[2] for r in iter_patches(slide, [50], [500], geom, progress=False, max_outside=0.5)] == [None]


# ---------------------------------------------------------------- bad files


def test_bad_files_raise_slide_error_naming_the_file(tmp_path):
    (tmp_path / "text.tif").write_text("not an image at all\n")
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.fromarray(smooth(400, 400)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    for name, words in [
        ("text.tif", "not an image"),
        ("text.png", "not an image"),
        ("empty.jpg", "not an image"),
        ("truncated.jpg", "truncated"),
        ("fake.tif", "not a readable TIFF"),
    ]:
        with pytest.raises(SlideError, match=words) as info:
            open_slide(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    assert issubclass(SlideError, ValueError)
    with pytest.raises(FileNotFoundError):
        open_slide(tmp_path / "missing.png")


def test_unreadable_tile_names_the_file_level_and_region(tmp_path):
    write_pyramid(tmp_path / "a.tif", smooth(600, 600), levels=2)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        offset, count = tif.pages[1].dataoffsets[0], tif.pages[1].databytecounts[0]
    data = bytearray((tmp_path / "a.tif").read_bytes())
    data[offset : offset + count] = b"\x00" * count
    (tmp_path / "a.tif").write_bytes(bytes(data))
    with open_slide(tmp_path / "a.tif") as slide:
        slide.read_region(0, 0, 64, 64)  # level 0 is intact
        with pytest.raises(SlideError, match=r"level 1 region x 0\.\.32, y 0\.\.32") as info:
            slide.read_region(0, 0, 64, 64, level=1)
        assert str(tmp_path / "a.tif") in str(info.value)
        geom = PatchGeometry(112, 56, 0.5)
        assert [r[2] for r in iter_patches(slide, [120], [120], geom, progress=False)] == ["unreadable image region"]


def test_reading_a_region_does_not_decode_the_whole_level(tmp_path):
    size = 3072  # a 27 MB level
    with tifffile.TiffWriter(tmp_path / "big.tif") as writer:
        tiles = (noise(256, 256, seed=i % 7) for i in range((size // 256) ** 2))
        writer.write(tiles, shape=(size, size, 3), dtype=np.uint8, tile=(256, 256), compression="jpeg")
    with open_slide(tmp_path / "big.tif") as slide:
        slide.read_region(0, 0, 8, 8)  # opens the level's zarr array
        tracemalloc.start()
        try:
            slide.read_region(1500, 1700, 224, 224)
            _, region_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            slide.read_region(0, 0, size, 1024)  # the tracer does see tile decoding
            _, strip_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    level_bytes = size * size * 3
    assert strip_peak > level_bytes / 4
    assert region_peak < level_bytes / 20, f"{region_peak / 1e6:.1f} MB for a 224-px region"


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not HER2ST_ST.is_dir(), reason="her2st_st data not present")
def test_c2_patches_from_the_jpeg_and_the_pyramidal_tiff_agree():
    spatial = HER2ST_ST / "visium/C2/outs/spatial"
    scale = json.loads((spatial / "scalefactors_json.json").read_text())
    geom = PatchGeometry(patch_um=112, patch_px=224, um_per_px=100 / scale["spot_diameter_fullres"])
    with open(spatial / "tissue_positions.csv") as handle:
        rows = list(csv.DictReader(handle))[:5]
    spots = [(float(r["pxl_col_in_fullres"]), float(r["pxl_row_in_fullres"])) for r in rows]
    with open_slide(HER2ST_ST / "visium/C2/C2_fullres.jpg") as jpeg, open_slide(HER2ST_ST / "hest/wsis/C2.tif") as tif:
        assert jpeg.size == tif.size and tif.tiled and len(tif.level_sizes) == 4
        for x, y in spots:
            assert inside(jpeg.size, patch_box(x, y, geom))
            a, b = np.asarray(cut_patch(jpeg, x, y, geom)), np.asarray(cut_patch(tif, x, y, geom))
            assert a.shape == b.shape == (224, 224, 3)
            assert mad(a, b) < 6, (x, y)
            assert not math.isclose(a.std(), 0)  # tissue, not blank
