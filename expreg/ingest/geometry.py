"""The physical scale of a section's image, stated and recorded, and the check that the image is the one
the spots were placed on.

The physical constant of a spot array is its lattice, not its spots' printed size: Visium spots sit
100 µm centre to centre on a hexagonal grid (``array_row + array_col`` is always even; neighbours
in a row are ``array_col`` ± 2 apart), the original Spatial Transcriptomics (ST) arrays are a square
grid at 200 µm. ``fit_lattice`` fits each spot's pixel position against its array position (least
squares over the spots under tissue, refitted without outliers; rotation, flips and missing spots
do not matter) and gives µm per full-resolution pixel from the pitch.

µm per full-resolution pixel, in this order (``resolve_scale``):

1. the sample sheet's ``um_per_px``;
2. the sample's own record: ``microns_per_pixel`` in ``scalefactors_json.json`` (Visium HD, Space
   Ranger >= 3) or HEST-1k's ``pixel_size_um_estimated``;
3. what the sheet's row states, then what a flag states for every sample: a pitch (``spot_pitch_um``,
   then ``--spot_pitch_um``) scales the lattice; a spot diameter (``spot_diameter_um``, then
   ``--spot_diameter_um``) is divided by Space Ranger's ``spot_diameter_fullres`` (kept for users
   who pass it; the log says it won); in the order sheet pitch, sheet diameter, flag pitch, flag
   diameter;
4. the lattice with the pitch of its kind (100 µm hexagonal Visium, 200 µm square ST).

Whatever wins is cross-checked: against the lattice, and ``spot_diameter_fullres`` against the
reference diameter of the lattice's kind (10x define it as a *theoretical 65 µm* spot on Visium,
0.65 of the pitch; it measured 0.65-0.70 of the pitch on real Visium runs; 100 µm spots, half the
pitch, on ST arrays). A disagreement of
more than ``CROSS_CHECK_TOLERANCE`` is a warning (log and ``prepare.json``). An image whose size
disagrees with the scale factors (``tissue_hires_image.png`` size / ``tissue_hires_scalef``) or with
HEST's ``fullres_px_width/height`` is an error: its spot coordinates would land in the wrong places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from expreg.ingest.errors import IngestError

SIZE_TOLERANCE = 0.01  # relative; plus the rounding of the hires image to whole pixels
CROSS_CHECK_TOLERANCE = 0.10  # relative disagreement between two scale sources that is said out loud
ANISOTROPY_TOLERANCE = 0.05  # the lattice's two axes disagree by more: not square pixels, or not this lattice
PITCH_UM = {"hexagonal": 100.0, "square": 200.0}  # Visium; original ST arrays
# what spot_diameter_fullres measures, as a fraction of the pitch: 65 um of 100 (Visium), 100 um of 200 (ST)
# Visium HD bins ("bins"): a square grid at the bin size, spot_diameter_fullres = one bin
REFERENCE_DIAMETER = {"hexagonal": 0.65, "square": 0.5, "bins": 1.0}
LATTICE_NAMES = {"hexagonal": "hexagonal Visium lattice", "square": "square ST lattice", "bins": "Visium HD bin grid"}
MIN_LATTICE_SPOTS = 3


@dataclass(frozen=True)
class Lattice:
    """A fitted spot lattice: its kind, pitch and the µm per pixel they give."""

    kind: str  # "hexagonal" or "square"
    pitch_um: float
    pitch_px: float  # centre-to-centre distance of neighbours, in full-resolution pixels
    um_per_px: float
    spots: int  # spots the fit used (after leaving out outliers)
    outliers: int
    anisotropy: float  # relative difference of the µm/px along the two array axes
    residual_px: float  # median distance of a spot from its fitted position

    def describe(self, pitch_source: str) -> str:
        return (
            f"{LATTICE_NAMES[self.kind]}: {pitch_source} {self.pitch_um:g} um pitch / {self.pitch_px:.4g} px fitted "
            f"over {self.spots} spots"
        )


@dataclass(frozen=True)
class Scale:
    """µm per full-resolution pixel, where the number came from, and what cross-checking it found."""

    um_per_px: float
    source: str
    checks: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def lattice_kind(array_row: np.ndarray, array_col: np.ndarray) -> str:
    """``"hexagonal"`` when every spot has an even ``array_row + array_col`` (Visium), else ``"square"``."""
    rows, cols = np.asarray(array_row, np.float64), np.asarray(array_col, np.float64)
    whole = np.all(rows == np.round(rows)) and np.all(cols == np.round(cols))
    return "hexagonal" if whole and np.all((rows + cols) % 2 == 0) else "square"


def fit_lattice(
    array_row, array_col, x_px, y_px, pitch_um: float | None = None, kind: str | None = None
) -> Lattice | str:
    """The lattice of the spots (module docstring), or a sentence saying why it cannot be fitted.

    Args:
        array_row, array_col: Each spot's array position (Space Ranger's ``array_row``, ``array_col``).
        x_px, y_px: Its centre in full-resolution pixels.
        pitch_um: The centre-to-centre distance of neighbours; default: that of the lattice's kind.
        kind: The lattice's kind when the positions' parity cannot say it (``"bins"``: Visium HD, with
            ``pitch_um`` its bin size); default: from the parity (``lattice_kind``).
    """
    rows, cols = np.asarray(array_row, np.float64), np.asarray(array_col, np.float64)
    x, y = np.asarray(x_px, np.float64), np.asarray(y_px, np.float64)
    finite = np.isfinite(rows) & np.isfinite(cols) & np.isfinite(x) & np.isfinite(y)
    rows, cols, x, y = rows[finite], cols[finite], x[finite], y[finite]
    if len(rows) < MIN_LATTICE_SPOTS or len(np.unique(rows)) < 2 or len(np.unique(cols)) < 2:
        return f"{len(rows)} spot(s) on {len(np.unique(rows))} array row(s) and {len(np.unique(cols))} column(s)"
    design = np.column_stack([np.ones_like(rows), cols, rows])
    if np.linalg.matrix_rank(design) < 3:
        return f"the {len(rows)} spots' array positions lie on one line"
    kind = kind or lattice_kind(rows, cols)
    if pitch_um is None and kind not in PITCH_UM:
        return f"a {LATTICE_NAMES[kind]} has no standard pitch"
    pitch = float(pitch_um) if pitch_um is not None else PITCH_UM[kind]
    # µm per step of array_col and of array_row
    col_um, row_um = (pitch / 2, pitch * math.sqrt(3) / 2) if kind == "hexagonal" else (pitch, pitch)
    keep = np.ones(len(rows), dtype=bool)
    for _ in range(3):  # refit without the spots far from the lattice (a few misplaced positions)
        coef, *_ = np.linalg.lstsq(design[keep], np.column_stack([x, y])[keep], rcond=None)
        residual = np.hypot(*(design @ coef - np.column_stack([x, y])).T)
        step_px = min(np.hypot(*coef[1]), np.hypot(*coef[2]))
        limit = max(5 * float(np.median(residual[keep])), 0.05 * step_px)
        new_keep = residual <= limit
        if np.linalg.matrix_rank(design[new_keep]) < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    col_px, row_px = float(np.hypot(*coef[1])), float(np.hypot(*coef[2]))
    if not (col_px > 0 and row_px > 0):
        return "the spots' pixel positions do not change with their array positions"
    along_col, along_row = col_um / col_px, row_um / row_px
    um_per_px = math.sqrt(along_col * along_row)
    return Lattice(
        kind=kind,
        pitch_um=pitch,
        pitch_px=pitch / um_per_px,
        um_per_px=um_per_px,
        spots=int(keep.sum()),
        outliers=int((~keep).sum()),
        anisotropy=abs(along_col / along_row - 1),
        residual_px=float(np.median(residual[keep])),
    )


def section_lattice(section, pitch_um: float | None = None) -> Lattice | str:
    """``fit_lattice`` over a section's spots, or why not (no array positions, too few spots)."""
    if getattr(section, "array_row", None) is None or getattr(section, "array_col", None) is None:
        return "the sample has no array_row/array_col (spot positions on the array)"
    kind = getattr(section, "lattice_kind", None)
    if kind is not None:  # Visium HD bins: their pitch is the bin size, whatever spot pitch was stated
        pitch_um = section.lattice_pitch_um
    return fit_lattice(section.array_row, section.array_col, section.x_px, section.y_px, pitch_um, kind)


def resolve_scale(spec, section, spot_diameter_um: float | None = None, spot_pitch_um: float | None = None) -> Scale:
    """The scale of ``section``'s full-resolution pixels (see the module docstring).

    Args:
        spec: The sample's ``SampleSpec`` (sheet row).
        section: The ``Section`` read from its files.
        spot_diameter_um: ``--spot_diameter_um`` (None: not given; used when the sheet gives none).
        spot_pitch_um: ``--spot_pitch_um`` (None: not given; the sheet's ``spot_pitch_um`` wins).
    """
    stated = _stated(spec, spot_diameter_um, spot_pitch_um)
    pitch = stated[1] if stated and stated[0] == "pitch" else None
    lattice = section_lattice(section, pitch)
    fitted = lattice if isinstance(lattice, Lattice) else None
    value, source = _chosen(spec, section, stated, lattice)
    checks, warnings = _cross_checks(value, source, spec, section, fitted, pitch is not None)
    return Scale(value, source, tuple(checks), tuple(warnings))


def _stated(spec, spot_diameter_um, spot_pitch_um) -> tuple[str, float, str] | None:
    """The pitch or diameter a user stated for this sample: ``(kind, µm, where)``; the sheet's row first."""
    for kind, value, where in (
        ("pitch", getattr(spec, "spot_pitch_um", None), f"sample sheet spot_pitch_um (line {spec.line})"),
        ("diameter", spec.spot_diameter_um, f"sample sheet spot_diameter_um (line {spec.line})"),
        ("pitch", spot_pitch_um, "--spot_pitch_um"),
        ("diameter", spot_diameter_um, "--spot_diameter_um"),
    ):
        if value is not None:
            return kind, float(value), where
    return None


def _chosen(spec, section, stated, lattice) -> tuple[float, str]:
    """The winning (µm/px, source) of the module docstring's order."""
    if spec.um_per_px is not None:
        return spec.um_per_px, f"sample sheet um_per_px (line {spec.line})"
    if section.um_per_px is not None:
        where = section.um_per_px_source or "the sample's metadata"
        return _positive(section.um_per_px, spec, where), where
    fullres = (section.scalefactors or {}).get("spot_diameter_fullres")
    if stated is not None and stated[0] == "pitch":
        if not isinstance(lattice, Lattice):
            raise IngestError(
                f"sample {spec.sample_id} ({spec.path}): {stated[2]} {stated[1]:g} needs the spot lattice, but it "
                f"cannot be fitted ({lattice}); give um_per_px in the sample sheet instead"
            )
        return lattice.um_per_px, lattice.describe(stated[2])
    if stated is not None:
        if fullres is None:
            raise IngestError(
                f"sample {spec.sample_id} ({spec.path}): {stated[2]} {stated[1]:g} needs spot_diameter_fullres "
                "(Space Ranger's scale factors), and the sample has none; give um_per_px in the sample sheet instead"
            )
        fullres = _positive(fullres, spec, "spot_diameter_fullres in scalefactors_json.json")
        return (
            stated[1] / fullres,
            f"{stated[2]} {stated[1]:g} um / spot_diameter_fullres {fullres:g} px (scalefactors_json.json)",
        )
    if isinstance(lattice, Lattice):
        return lattice.um_per_px, lattice.describe("the standard")
    hint = (
        f"; the sample has spot_diameter_fullres {fullres}: --spot_diameter_um 65 (10x's theoretical Visium spot) "
        "or 100 (ST) would use it, to about 10 %"
        if fullres is not None
        else ""
    )
    raise IngestError(
        f"sample {spec.sample_id} ({spec.path}): the image scale is unknown (the spot lattice cannot be fitted: "
        f"{lattice}; no microns_per_pixel, no HEST metadata); add a um_per_px column (µm per full-resolution "
        f"pixel) to the sample sheet, line {spec.line}{hint}"
    )


def _cross_checks(value: float, source: str, spec, section, lattice: Lattice | None, pitch_given: bool):
    """What the scale was checked against, and the disagreements beyond ``CROSS_CHECK_TOLERANCE``."""
    checks, warnings = [], []
    if lattice is not None:
        if lattice.anisotropy > ANISOTROPY_TOLERANCE:
            warnings.append(
                f"the {LATTICE_NAMES[lattice.kind]} gives µm/px differing by {100 * lattice.anisotropy:.0f} % along "
                "its two axes: the pixels are not square, or the array is not this lattice"
            )
        if lattice.outliers:
            checks.append(f"{lattice.outliers} spot(s) far from the fitted lattice left out of the fit")
        if not source.startswith(LATTICE_NAMES[lattice.kind]):
            which = "the stated pitch" if pitch_given else f"its {lattice.pitch_um:g} um pitch"
            _compare(value, lattice.um_per_px, f"the {LATTICE_NAMES[lattice.kind]} ({which})", checks, warnings)
    fullres = (section.scalefactors or {}).get("spot_diameter_fullres")
    if lattice is not None and fullres is not None and "spot_diameter_fullres" not in source:
        fullres = _positive(fullres, spec, "spot_diameter_fullres in scalefactors_json.json")
        reference = REFERENCE_DIAMETER[lattice.kind] * lattice.pitch_um
        what = f"spot_diameter_fullres {fullres:g} px as a {reference:g} um spot"
        _compare(value, reference / fullres, what, checks, warnings)
    return checks, warnings


def _compare(value: float, other: float, what: str, checks: list, warnings: list) -> None:
    difference = other / value - 1
    line = f"{what} gives {other:.4g} um/px ({round(100 * difference, 1) + 0.0:+.1f} %)"  # never "-0.0"
    checks.append(line)
    if abs(difference) > CROSS_CHECK_TOLERANCE:
        warnings.append(f"scale: {line} against the {value:.4g} um/px used")


def _positive(value, spec, where: str) -> float:
    """``value`` as a positive, finite float, or an error naming the sample and where it came from."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number <= 0:
        raise IngestError(f"sample {spec.sample_id} ({spec.path}): {where} is {value!r}, not a positive number")
    return number


def check_image_size(spec, section, image_size: tuple[int, int]) -> str | None:
    """Raise when the image disagrees with the size its sample records; returns what was checked (or None).

    Space Ranger: the hires image is the full-resolution one scaled by ``tissue_hires_scalef``: its
    size divided by that factor must be the full-resolution size (within 1 % and the rounding to whole
    pixels). HEST-1k: the metadata's ``fullres_px_width`` and ``fullres_px_height`` (exactly, as
    HEST's patches are cut from that image).
    """
    expected_size = getattr(section, "fullres_size", None)
    if expected_size is not None:
        return _check_recorded_size(spec, section, image_size, tuple(int(v) for v in expected_size))
    scalef = (section.scalefactors or {}).get("tissue_hires_scalef")
    if not scalef or not section.hires_image:
        return None
    from PIL import Image

    scalef = _positive(scalef, spec, "tissue_hires_scalef in scalefactors_json.json")
    try:
        with Image.open(section.hires_image) as hires:
            hires_size = hires.size
    except (OSError, ValueError, SyntaxError) as err:
        raise IngestError(f"{section.hires_image}: not a readable image ({type(err).__name__}: {err})") from err
    expected = [side / float(scalef) for side in hires_size]
    tolerance = [SIZE_TOLERANCE * e + 2.0 / float(scalef) for e in expected]
    if any(abs(actual - e) > t for actual, e, t in zip(image_size, expected, tolerance)):
        raise IngestError(
            f"sample {spec.sample_id}: image {section.image} is {image_size[0]} x {image_size[1]} px, but "
            f"{section.hires_image} ({hires_size[0]} x {hires_size[1]} px) / tissue_hires_scalef {float(scalef):g} "
            f"implies a full-resolution image of about {expected[0]:.0f} x {expected[1]:.0f} px: the image is "
            "not the full-resolution image these spot positions refer to (give the right one in the sheet's "
            f"image column, line {spec.line})"
        )
    return f"{image_size[0]} x {image_size[1]} px agrees with tissue_hires_image.png / tissue_hires_scalef"


def _check_recorded_size(spec, section, image_size, expected) -> str:
    """HEST-1k: the image must be exactly ``fullres_px_width`` x ``fullres_px_height`` of its metadata."""
    if tuple(image_size) != expected:
        raise IngestError(
            f"sample {spec.sample_id}: image {section.image} is {image_size[0]} x {image_size[1]} px, but its HEST "
            f"metadata ({section.fullres_size_source}) records fullres_px_width x fullres_px_height "
            f"{expected[0]} x {expected[1]} px: the image is not the one these spot positions refer to (cropped or "
            f"rescaled?); give the right one in the sheet's image column, line {spec.line}"
        )
    return f"{image_size[0]} x {image_size[1]} px agrees with fullres_px_width/height of the HEST metadata"
