"""The scale of a section from its spot lattice (``expreg.ingest.geometry``), its cross-checks, and the
image-size checks, on synthetic lattices (hexagonal Visium, square ST, rotated, flipped, with gaps
and misplaced spots) and on the real HER2ST sections (skipped when absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers.spaceranger import write_10x_h5
from PIL import Image

from expreg.ingest.errors import IngestError
from expreg.ingest.geometry import Lattice, check_image_size, fit_lattice, resolve_scale
from expreg.ingest.readers import Section, read_section
from expreg.ingest.samples import SampleSpec

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/her2st_st"
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


def visium_lattice(um_per_px: float, angle_deg: float = 0.0, rows: int = 12, cols: int = 24, flip=False):
    """A hexagonal Visium array (100 um pitch; even array_row + array_col) placed at ``um_per_px``, rotated."""
    array_row, array_col = np.array([(r, c) for r in range(rows) for c in range(cols) if (r + c) % 2 == 0]).T
    x_um, y_um = array_col * 50.0, array_row * 50.0 * math.sqrt(3)
    if flip:
        x_um = -x_um
    a = math.radians(angle_deg)
    x = 5000 + (math.cos(a) * x_um - math.sin(a) * y_um) / um_per_px
    y = 5000 + (math.sin(a) * x_um + math.cos(a) * y_um) / um_per_px
    return array_row, array_col, x, y


def st_lattice(um_per_px: float, angle_deg: float = 0.0, rows: int = 30, cols: int = 32):
    """A square ST array (200 um pitch, every array position) at ``um_per_px``, rotated."""
    array_row, array_col = np.array([(r, c) for r in range(rows) for c in range(cols)]).T
    a = math.radians(angle_deg)
    x_um, y_um = array_col * 200.0, array_row * 200.0
    return (
        array_row,
        array_col,
        800 + (math.cos(a) * x_um - math.sin(a) * y_um) / um_per_px,
        900 + (math.sin(a) * x_um + math.cos(a) * y_um) / um_per_px,
    )


@pytest.mark.parametrize("angle, flip", [(0.0, False), (17.0, False), (90.0, True), (-133.0, False)])
def test_a_hexagonal_visium_lattice_gives_the_scale_from_its_100_um_pitch(angle, flip):
    row, col, x, y = visium_lattice(0.2737, angle, flip=flip)
    lattice = fit_lattice(row, col, x, y)
    assert isinstance(lattice, Lattice) and lattice.kind == "hexagonal"
    assert lattice.um_per_px == pytest.approx(0.2737, rel=1e-9) and lattice.pitch_px == pytest.approx(100 / 0.2737)
    assert lattice.anisotropy < 1e-9 and lattice.outliers == 0


@pytest.mark.parametrize("angle", [0.0, 3.0, -8.0])
def test_a_square_st_lattice_gives_the_scale_from_its_200_um_pitch(angle):
    row, col, x, y = st_lattice(0.688, angle)
    lattice = fit_lattice(row, col, x, y)
    assert lattice.kind == "square" and lattice.um_per_px == pytest.approx(0.688, rel=1e-9)
    assert fit_lattice(row, col, x, y, pitch_um=100.0).um_per_px == pytest.approx(0.344, rel=1e-9)  # a stated pitch


def test_the_fit_ignores_missing_spots_jitter_and_a_few_misplaced_ones():
    rng = np.random.default_rng(0)
    row, col, x, y = visium_lattice(0.5, 25.0, rows=40, cols=60)
    keep = rng.random(len(row)) < 0.35  # an irregular tissue outline: most spots not under tissue
    row, col, x, y = (
        row[keep],
        col[keep],
        x[keep] + rng.normal(0, 3, keep.sum()),
        y[keep] + rng.normal(0, 3, keep.sum()),
    )
    x[:5] += 400  # five positions badly off (a manual alignment slip)
    lattice = fit_lattice(row, col, x, y)
    assert lattice.outliers == 5 and lattice.um_per_px == pytest.approx(0.5, rel=0.002)


def test_too_few_or_collinear_spots_are_no_lattice():
    assert "1 array row" in fit_lattice([2, 2, 2, 2], [0, 2, 4, 6], [0, 10, 20, 30], [5, 5, 5, 5])
    assert "2 spot(s)" in fit_lattice([0, 1], [0, 1], [0, 10], [0, 10])
    diagonal = np.arange(8)  # a diagonal line of hexagonal spots: no second direction to measure
    assert "lie on one line" in fit_lattice(diagonal, diagonal, 100 * diagonal, 173 * diagonal)


def _section(row, col, x, y, scalefactors=None, **kwargs) -> Section:
    n = len(x)
    return Section(
        sample_id="S",
        layout="spaceranger",
        barcodes=np.array([f"b{i}" for i in range(n)], dtype=object),
        counts=sp.csr_matrix((n, 1)),
        gene_names=["G"],
        gene_ids=None,
        x_px=np.asarray(x, np.float64),
        y_px=np.asarray(y, np.float64),
        scalefactors=scalefactors,
        array_row=np.asarray(row, np.float64),
        array_col=np.asarray(col, np.float64),
        **kwargs,
    )


def test_a_space_ranger_3_cytassist_like_sample_is_within_2_percent_of_its_pitch():
    # Space Ranger 3.0 CytAssist: spot_diameter_fullres measured 0.70 of the pitch (not 0.65): the old
    # 55 um / spot_diameter_fullres rule was 21 % off; the lattice is exact, the field only a cross-check
    row, col, x, y = visium_lattice(0.2625, 40.0)
    pitch_px = 100 / 0.2625
    section = _section(row, col, x, y, {"spot_diameter_fullres": 0.70 * pitch_px})
    scale = resolve_scale(SampleSpec("S", "P", Path("S"), line=2), section)
    assert scale.um_per_px == pytest.approx(0.2625, rel=0.02)
    assert scale.source.startswith("hexagonal Visium lattice: the standard 100 um pitch")
    assert scale.warnings == () and any("as a 65 um spot" in c for c in scale.checks)  # 7 % off: said, no warning
    old_rule = 55 / (0.70 * pitch_px)
    assert abs(old_rule / 0.2625 - 1) > 0.15


def test_scale_sources_in_order_and_disagreements_are_warnings():
    row, col, x, y = visium_lattice(0.5, 10.0)
    section = _section(row, col, x, y, {"spot_diameter_fullres": 0.5 * 200})  # 100-px spots: 0.65 um/px at 65 um
    spec = SampleSpec("S", "P", Path("S"), line=3)
    lattice = resolve_scale(spec, section)
    assert lattice.um_per_px == pytest.approx(0.5) and "lattice" in lattice.source
    assert (
        len(lattice.warnings) == 1 and "spot_diameter_fullres 100 px as a 65 um spot gives 0.65" in lattice.warnings[0]
    )
    # a stated pitch (sheet before flag) rescales the lattice
    assert resolve_scale(spec, section, spot_pitch_um=110).um_per_px == pytest.approx(0.55)
    sheet_pitch = SampleSpec("S", "P", Path("S"), line=3, spot_pitch_um=90)
    stated = resolve_scale(sheet_pitch, section, spot_pitch_um=110)
    assert stated.um_per_px == pytest.approx(0.45) and "sample sheet spot_pitch_um (line 3) 90 um" in stated.source
    # a spot diameter the user passes still works, is named as the source, and is checked against the lattice
    diameter = resolve_scale(spec, section, spot_diameter_um=55)
    assert diameter.um_per_px == pytest.approx(0.55) and diameter.source.startswith("--spot_diameter_um 55 um")
    assert any("lattice (its 100 um pitch) gives 0.5 um/px (-9.1 %)" in c for c in diameter.checks)
    assert diameter.warnings == ()  # 9 % is within the 10 % tolerance
    far = resolve_scale(spec, section, spot_diameter_um=80)
    assert any("hexagonal Visium lattice" in w and "-37.5 %" in w for w in far.warnings)
    # the sample's own record (Visium HD / Space Ranger >= 3 microns_per_pixel), then the sheet's um_per_px
    section.um_per_px, section.um_per_px_source = 0.5, "microns_per_pixel 0.5 in scalefactors_json.json"
    assert resolve_scale(spec, section, spot_pitch_um=110).source.startswith("microns_per_pixel")
    sheet = SampleSpec("S", "P", Path("S"), um_per_px=0.25, line=3)
    assert resolve_scale(sheet, section).source == "sample sheet um_per_px (line 3)"


def test_no_lattice_and_no_stated_scale_is_an_error_that_says_what_to_add():
    section = _section([0, 0, 0], [0, 2, 4], [0, 10, 20], [0, 0, 0], {"spot_diameter_fullres": 50.0})
    with pytest.raises(IngestError, match=r"scale is unknown \(the spot lattice cannot be fitted.*add a um_per_px"):
        resolve_scale(SampleSpec("S", "P", Path("S"), line=4), section)
    with pytest.raises(IngestError, match=r"--spot_pitch_um 100 needs the spot lattice"):
        resolve_scale(SampleSpec("S", "P", Path("S"), line=4), section, spot_pitch_um=100)
    assert resolve_scale(SampleSpec("S", "P", Path("S")), section, spot_diameter_um=55).um_per_px == 1.1
    with pytest.raises(IngestError, match=r"spot_diameter_fullres 50.0: --spot_diameter_um 65 .* or 100 \(ST\)"):
        resolve_scale(SampleSpec("S", "P", Path("S"), line=4), section)  # says what the sample's field allows
    # a diameter stated in the sample's row beats a pitch flag given for every sample
    row = SampleSpec("S", "P", Path("S"), spot_diameter_um=100, line=4)
    assert resolve_scale(row, section, spot_pitch_um=100).source.startswith("sample sheet spot_diameter_um (line 4)")


def write_visium(root: Path, um_per_px: float, angle: float, scalefactors: dict, image_px=(600, 500)) -> Path:
    """A Space Ranger folder whose spots are a hexagonal Visium lattice at ``um_per_px`` (no full-res image)."""
    row, col, x, y = visium_lattice(um_per_px, angle, rows=6, cols=10)
    x, y = x - x.min() + 60, y - y.min() + 60
    barcodes = [f"AAAC{i:04d}-1" for i in range(len(x))]
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", sp.csr_matrix(np.ones((len(x), 2))), barcodes, ["A", "B"])
    lines = [f"{b},1,{r},{c},{yy},{xx}" for b, r, c, xx, yy in zip(barcodes, row, col, x, y)]
    (outs / "spatial" / "tissue_positions.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    Image.new("RGB", image_px, "white").save(root / "fullres.png")
    return root


def test_prepare_and_map_read_the_same_scale_from_a_space_ranger_folder(tmp_path):
    from expreg.maps.measured import read_measured

    folder = write_visium(tmp_path / "S1", 4.0, 30.0, {"spot_diameter_fullres": 0.65 * 25})
    section = read_section(folder, "S1")
    scale = resolve_scale(SampleSpec("S1", "P", folder), section)
    spots = read_measured(folder, folder / "fullres.png", (600, 500), "S1")
    assert scale.um_per_px == pytest.approx(4.0) and spots.um_per_px == scale.um_per_px
    assert "hexagonal Visium lattice" in spots.scale_source and spots.warnings == []
    hd = write_visium(tmp_path / "HD", 4.0, 0.0, {"microns_per_pixel": 0.2738, "spot_diameter_fullres": 10.0})
    section = read_section(hd, "HD")
    assert resolve_scale(SampleSpec("HD", "P", hd), section).um_per_px == 0.2738  # stated by Space Ranger
    spots = read_measured(hd, hd / "fullres.png", (600, 500), "HD")
    assert any("lattice" in w and "4 um/px" in w for w in spots.warnings)  # and the lattice disagrees


def test_a_hest_image_of_another_size_than_its_metadata_is_an_error(tmp_path):
    section = _section([0, 1, 0], [0, 1, 2], [10, 60, 110], [10, 60, 10], fullres_size=(1000, 800))
    section.fullres_size_source, section.image = "metadata/S.json", "cropped.tif"
    spec = SampleSpec("S", "P", Path("S"), line=5)
    assert "agrees with fullres_px_width/height" in check_image_size(spec, section, (1000, 800))
    with pytest.raises(IngestError, match=r"sample S: image cropped.tif is 600 x 800 px, but .*1000 x 800 px.*line 5"):
        check_image_size(spec, section, (600, 800))


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/data/her2st_st absent")
@pytest.mark.parametrize("sample", ["A1", "C2", "C3", "C4", "C5", "C6"])
def test_real_st_sections_get_the_scale_of_100_um_spots_with_no_sheet_column(sample):
    folder = REAL / "visium" / sample
    section = read_section(folder, sample)
    scale = resolve_scale(SampleSpec(sample, "P", folder), section)
    stated = resolve_scale(SampleSpec(sample, "P", folder, spot_diameter_um=100.0), section)  # today's sheet
    assert scale.source.startswith("square ST lattice: the standard 200 um pitch")
    assert scale.um_per_px == pytest.approx(stated.um_per_px, rel=0.01) and scale.warnings == ()


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/data/her2st_st absent")
def test_real_hest_sample_agrees_with_its_lattice_and_its_image_size():
    section = read_section(REAL / "hest", "C2")
    spec = SampleSpec("C2", "C", REAL / "hest")
    scale = resolve_scale(spec, section)
    assert scale.source == "HEST metadata pixel_size_um_estimated" and scale.warnings == ()
    assert any("square ST lattice" in c for c in scale.checks)
    assert section.fullres_size == (9274, 9911)
    assert "agrees" in check_image_size(spec, section, (9274, 9911))


def test_training_on_a_set_prepared_with_the_old_55_um_rule_warns(tmp_path, caplog):
    from expreg.training.setup import patch_geometry

    old = "--spot_diameter_um 55 um / spot_diameter_fullres 80 px (scalefactors_json.json)"
    record = {"patch": {"patch_um": 112, "patch_px": 224}, "samples": [{"sample_id": "V1", "um_per_px_source": old}]}
    (tmp_path / "prepare.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="expreg"):
        assert patch_geometry(tmp_path / "metadata.csv", None) == (112.0, 224)
    assert "sample(s) V1 were prepared with the old rule" in caplog.text
    record["samples"][0]["um_per_px_source"] = "hexagonal Visium lattice: the standard 100 um pitch / 380 px"
    (tmp_path / "prepare.json").write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level("WARNING", logger="expreg"):
        patch_geometry(tmp_path / "metadata.csv", None)
    assert "old rule" not in caplog.text
