"""Everything a map needs, read and checked before any tile is predicted or any file written.

``plan_map(options) -> MapPlan``: the model and its geometry, the slide and its scale, the
measured spots (``--measured``), the tissue mask and the tiles. Every problem with the inputs is a
``MapError`` (exit code 2 in the command) raised here, so a map that starts also finishes unless a
tile turns out to be unreadable, and that is reported with the tile's position.

Scale (µm per level-0 pixel), in this order: ``--um_per_px``; the scale the measured spots were
prepared with (``--measured``); the slide's own tags (``expreg.ingest.resolution``). A scale from a
later source that disagrees with the one used by more than ``SCALE_TOLERANCE`` is a warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from expreg.ingest.images import Slide, SlideError, open_slide
from expreg.ingest.patches import PatchGeometry, inside, patch_box
from expreg.ingest.resolution import tiff_um_per_px
from expreg.maps.grid import TileGrid, make_grid
from expreg.maps.measured import MeasuredError, MeasuredSpots, read_measured
from expreg.maps.tissue import MaskError, TissueMask, detect_tissue, read_mask

logger = logging.getLogger("expreg")
SCALE_TOLERANCE = 0.02
UPSAMPLING_WARNING = 1.5
MIN_SPOTS = 3  # measured spots inside the slide needed for a comparison
MAX_THUMBNAIL_PX = 8192  # the thumbnail (mask, pictures) is held in memory whole
MAX_GRID_TILES = 20_000_000  # grid positions (tissue or not) held in memory while choosing tiles


class MapError(ValueError):
    """Inputs a map cannot be made from; the message says what to pass or fix."""


class NoTissueError(MapError):
    """The mask holds no tile with enough tissue (the thumbnail and mask are written for a look)."""


@dataclass
class MapOptions:
    """The command's options (``python -m expreg.map --help``)."""

    model: str
    slide: str
    out_dir: str
    um_per_px: float | None = None
    stride_um: float | None = None
    genes: list[str] | None = None
    measured: str | None = None
    sample_id: str | None = None
    spot_pitch_um: float | None = None
    bin_um: float | None = None  # Visium HD --measured: the bin size read (None: 8)
    hd_min_tissue: float = 0.5  # and the pseudo-spots kept
    spot_diameter_um: float | None = None
    target_transform: str | None = None
    mask: str | None = None
    min_tissue: float = 0.5
    tta: bool = False
    batch_size: int = 64
    num_workers: int = 2
    thumbnail_px: int = 2048
    overview_genes: int = 12
    overwrite: bool = False
    alpha: float = 0.9  # opacity of the predicted tiles over the H&E in the pictures


@dataclass
class MapPlan:
    """The checked inputs of one map."""

    options: MapOptions
    model: object
    genes: list[str]  # all the model's genes (the columns of every output)
    drawn: list[str]  # the genes drawn as maps/<gene>.png (--genes, default all)
    slide: Slide
    geometry: PatchGeometry
    scale_source: str
    level: int
    thumbnail: object
    tissue: TissueMask
    grid: TileGrid
    stride_um: float
    measured: MeasuredSpots | None = None
    target_transform: str | None = None
    warnings: list[str] = field(default_factory=list)
    spot_rows: np.ndarray | None = None  # the measured spots whose patch lies inside the slide


def _model_geometry(model, source: str) -> tuple[float, int]:
    config = model.config
    patch_um = getattr(config, "patch_um", None)
    if patch_um is None:
        raise MapError(
            f"{source}: the model does not record the physical size of its training patches (patch_um), so "
            "tiles of the right size cannot be cut; retrain on expreg.prepare output, or set data.patch_um in "
            "the recipe for hand-made patches"
        )
    return float(patch_um), int(getattr(config, "patch_px", None) or config.image_size)


def _drawn_genes(requested, genes: list[str]) -> list[str]:
    if not requested:
        return list(genes)
    unknown = [g for g in requested if g not in genes]
    if unknown:
        raise MapError(
            f"--genes: the model does not predict {', '.join(unknown)} (it predicts {len(genes)} genes: "
            f"{', '.join(genes[:8])}{' ...' if len(genes) > 8 else ''})"
        )
    return list(dict.fromkeys(requested))


def _scale(options: MapOptions, slide: Slide, measured: MeasuredSpots | None) -> tuple[float, str, list[str]]:
    """µm per level-0 pixel and its source (module docstring), plus warnings about disagreeing sources."""
    candidates = []
    if options.um_per_px is not None:
        candidates.append((float(options.um_per_px), "--um_per_px"))
    if measured is not None:
        candidates.append((measured.um_per_px, measured.scale_source))
    tagged, why = tiff_um_per_px(slide.path)
    if tagged is not None:
        candidates.append((tagged, f"{slide.path}: {why}"))
    if not candidates:
        raise MapError(
            f"{slide.path}: the slide's scale is unknown ({why}); pass --um_per_px (µm per level-0 pixel) or "
            "--measured with the section's Space Ranger / HEST / expreg.prepare folder"
        )
    value, source = candidates[0]
    warnings = [
        f"{other_source} gives {other:.4g} µm/px, but {value:.4g} from {source} is used"
        for other, other_source in candidates[1:]
        if abs(other / value - 1) > SCALE_TOLERANCE
    ]
    return value, source, warnings


def _target_transform(options: MapOptions, model) -> str | None:
    if options.measured is None:
        return None
    recorded = getattr(model.config, "target_transform", None)
    if options.target_transform and recorded and options.target_transform != recorded:
        raise MapError(
            f"--target_transform {options.target_transform}: the model records that its targets were "
            f"{recorded}; the measured counts must be transformed the same way (leave the flag out)"
        )
    kind = options.target_transform or recorded
    if kind is None:
        raise MapError(
            "--measured: the model does not record how its targets were made from counts (it was trained on "
            "targets given in a CSV); pass --target_transform log1p_cpm, log1p or none, as they were made"
        )
    return kind


def _tissue(options: MapOptions, slide: Slide) -> tuple[object, TissueMask]:
    try:
        thumbnail = slide.thumbnail(options.thumbnail_px)
    except SlideError as err:  # a corrupt tile on the level the thumbnail is read from
        raise MapError(f"--slide {err} (while reading the thumbnail)") from err
    scale = (slide.size[0] / thumbnail.shape[1], slide.size[1] / thumbnail.shape[0])
    if options.mask:
        return thumbnail, read_mask(options.mask, thumbnail.shape[:2], slide.size)
    return thumbnail, detect_tissue(thumbnail, scale)


def _open(options: MapOptions) -> Slide:
    try:
        return open_slide(options.slide)
    except FileNotFoundError as err:
        raise MapError(f"--slide {err}") from err
    except SlideError as err:
        raise MapError(
            f"--slide {err}. Supported: JPEG, PNG, plain or tiled pyramidal TIFF (SVS and other TIFF-based "
            "formats); convert other vendor formats to a pyramidal TIFF (e.g. with vips or bfconvert)"
        ) from err


def check_options(options: MapOptions) -> None:
    """Option values that are wrong whatever the inputs."""
    positive = {
        "--um_per_px": options.um_per_px,
        "--stride_um": options.stride_um,
        "--spot_pitch_um": options.spot_pitch_um,
        "--spot_diameter_um": options.spot_diameter_um,
        "--bin_um": options.bin_um,
    }
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise MapError(f"{flag} must be a positive number, got {value}")
    if not 0 < options.hd_min_tissue <= 1:
        raise MapError(f"--hd_min_tissue must be in (0, 1], got {options.hd_min_tissue}")
    if not 0 <= options.min_tissue <= 1:
        raise MapError(f"--min_tissue must be in [0, 1], got {options.min_tissue}")
    if options.batch_size < 1 or options.num_workers < 0 or options.overview_genes < 1:
        raise MapError("--batch_size and --overview_genes must be >= 1, --num_workers >= 0")
    if not 64 <= options.thumbnail_px <= MAX_THUMBNAIL_PX:
        raise MapError(f"--thumbnail_px must be in [64, {MAX_THUMBNAIL_PX}], got {options.thumbnail_px}")
    if options.target_transform is not None and options.measured is None:
        raise MapError("--target_transform only applies with --measured")


def plan_map(options: MapOptions, model) -> MapPlan:
    """Read and check every input of the map (module docstring); ``model`` is the loaded ``ExpRegModel``."""
    check_options(options)
    patch_um, patch_px = _model_geometry(model, options.model)
    genes = list(model.config.gene_names)
    drawn = _drawn_genes(options.genes, genes)
    kind = _target_transform(options, model)
    slide = _open(options)
    try:
        return _plan_on_slide(options, model, slide, (patch_um, patch_px), genes, drawn, kind)
    except BaseException:
        slide.close()
        raise


def _measured(options: MapOptions, slide: Slide, genes: list[str], patch_um: float) -> MeasuredSpots | None:
    if not options.measured:
        return None
    try:
        measured = read_measured(
            options.measured,
            slide.path,
            slide.size,
            options.sample_id,
            options.spot_diameter_um,
            options.spot_pitch_um,
            patch_um=patch_um,
            hd=(options.bin_um, options.hd_min_tissue),
        )
    except MeasuredError as err:
        raise MapError(str(err)) from err
    if not set(genes) & set(measured.gene_names):
        raise MapError(
            f"--measured {measured.source}: it measured none of the model's {len(genes)} genes "
            f"({', '.join(genes[:5])}{' ...' if len(genes) > 5 else ''}), so there is nothing to compare"
        )
    return measured


def spots_inside(measured: MeasuredSpots, slide_size, geometry: PatchGeometry) -> np.ndarray:
    """Rows of the measured spots whose patch lies wholly inside the slide (as ``expreg.prepare`` keeps them)."""
    boxes = (patch_box(x, y, geometry) for x, y in zip(measured.x_px, measured.y_px))
    return np.array([i for i, box in enumerate(boxes) if inside(slide_size, box)], dtype=np.int64)


def _spots_inside_or_error(measured: MeasuredSpots, slide: Slide, geometry: PatchGeometry) -> np.ndarray:
    rows = spots_inside(measured, slide.size, geometry)
    kept = len(rows)
    if kept < MIN_SPOTS:
        raise MapError(
            f"--measured {measured.source}: only {kept} of {len(measured.x_px)} spots have their "
            f"{geometry.patch_um:g} µm patch inside the {slide.size[0]} x {slide.size[1]} px slide (at "
            f"{geometry.um_per_px:.4g} µm/px); at least {MIN_SPOTS} are needed to compare"
        )
    return rows


def _plan_on_slide(options, model, slide, patch, genes, drawn, kind) -> MapPlan:
    measured = _measured(options, slide, genes, patch[0])
    um_per_px, source, warnings = _scale(options, slide, measured)
    geometry = PatchGeometry(patch[0], patch[1], um_per_px)
    spot_rows = _spots_inside_or_error(measured, slide, geometry) if measured is not None else None
    stride_um = options.stride_um or patch[0]
    upsampling = um_per_px / (patch[0] / patch[1])
    if upsampling > UPSAMPLING_WARNING:
        warnings.append(
            f"the slide ({um_per_px:.3g} µm/px) is coarser than the model's patches: tiles are enlarged {upsampling:.1f}x"
        )
    try:
        thumbnail, tissue = _tissue(options, slide)
    except MaskError as err:
        raise MapError(str(err)) from err
    stride_px = stride_um / um_per_px
    positions = (slide.size[0] / stride_px + 1) * (slide.size[1] / stride_px + 1)
    if positions > MAX_GRID_TILES:
        raise MapError(
            f"--stride_um {stride_um:g}: {positions:,.0f} grid positions on this slide; choose a larger stride"
        )
    grid = make_grid(slide.size, geometry.box_px, stride_px, tissue, options.min_tissue)
    for warning in warnings + (measured.warnings if measured else []):
        logger.warning(warning)
    return MapPlan(
        options,
        model,
        genes,
        drawn,
        slide,
        geometry,
        source,
        slide.best_level(geometry.downsample),
        thumbnail,
        tissue,
        grid,
        stride_um,
        measured,
        kind,
        warnings,
        spot_rows,
    )
