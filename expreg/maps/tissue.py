"""Where the tissue is: a mask on the slide's thumbnail (Otsu on saturation, or the user's ``--mask``).

H&E tissue is coloured and the glass around it is white or grey, so the saturation
``(max - min) / max`` of each thumbnail pixel separates them; Otsu's threshold picks the cut
between the two modes of its histogram. The threshold is never below ``MIN_SATURATION``: on a
slide without tissue Otsu would split the noise of the glass. The raw mask is cleaned with a
closing (joins the lumen-broken edges of a section), hole filling and the removal of specks
smaller than ``MIN_OBJECT_FRACTION`` of the largest piece (dust, pen dots). A mask file given by
the user is used as is: any image with the slide's aspect ratio, non-zero (or non-black) = tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SATURATION = 0.05  # the lowest threshold Otsu may pick (~13 of 255): pale glass stays background
DARK_VALUE = 0.12  # pixels darker than this (scanner borders, black marker) are never tissue
MIN_OBJECT_FRACTION = 0.01  # pieces smaller than 1 % of the largest piece are removed
ASPECT_TOLERANCE = 0.02


class MaskError(ValueError):
    """A ``--mask`` that cannot be used (unreadable, another aspect ratio)."""


@dataclass
class TissueMask:
    """A boolean tissue mask over the whole slide, at thumbnail resolution.

    Attributes:
        mask: ``(rows, cols)`` bool, ``True`` = tissue.
        scale: Level-0 pixels per mask pixel, ``(sx, sy)``.
        source: How the mask was made (for logs and ``summary.json``).
        threshold: The saturation threshold (Otsu's), or None for a given mask.
    """

    mask: np.ndarray
    scale: tuple[float, float]
    source: str
    threshold: float | None = None

    @property
    def fraction(self) -> float:
        """Share of the slide that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_mm2(self, um_per_px: float) -> float:
        """Tissue area in mm² for a slide of ``um_per_px`` µm per level-0 pixel."""
        return float(self.mask.sum()) * self.scale[0] * self.scale[1] * um_per_px**2 / 1e6


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of a uint8 RGB image, in 0..1 (0 where the pixel is black)."""
    pixels = rgb.astype(np.float32)
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in 0..1: the cut maximising the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 1.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean_below = np.cumsum(hist * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    m0 = np.divide(mean_below[:-1], w0, out=np.zeros_like(w0), where=w0 > 0)
    m1 = np.divide(mean_below[-1] - mean_below[:-1], w1, out=np.zeros_like(w1), where=w1 > 0)
    between = w0 * w1 * (m0 - m1) ** 2
    if not between.any():
        return 1.0
    return float(edges[1:][:-1][int(np.argmax(between))])


def _clean(raw: np.ndarray, radius: int) -> np.ndarray:
    """Closing, hole filling and the removal of small pieces (module docstring)."""
    from scipy import ndimage

    mask = raw
    if radius > 0:  # padded with the edge, so tissue running off the slide is not eroded at the border
        structure = np.ones((2 * radius + 1, 2 * radius + 1), dtype=bool)
        padded = np.pad(raw, radius, mode="edge")
        mask = ndimage.binary_closing(padded, structure=structure, border_value=0)[radius:-radius, radius:-radius]
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_OBJECT_FRACTION * sizes.max()) + 1
    return np.isin(labels, keep)


def detect_tissue(thumbnail: np.ndarray, scale: tuple[float, float], close_px: int = 2) -> TissueMask:
    """The tissue of a uint8 RGB thumbnail (Otsu on saturation, cleaned: module docstring)."""
    sat = saturation(thumbnail)
    value = thumbnail.max(axis=2) / 255.0
    usable = value >= DARK_VALUE
    threshold = max(otsu_threshold(sat[usable]) if usable.any() else 1.0, MIN_SATURATION)
    raw = (sat > threshold) & usable
    mask = _clean(raw, close_px) if raw.any() else raw
    return TissueMask(mask, scale, f"Otsu on saturation (threshold {threshold:.3f})", threshold)


def read_mask(path, shape: tuple[int, int], slide_size: tuple[int, int]) -> TissueMask:
    """A mask image resized (nearest) to ``shape`` ``(rows, cols)``; it must have the slide's aspect ratio."""
    from PIL import Image, UnidentifiedImageError

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a level-0-sized mask is large, not a bomb
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            grey = image.convert("L")
    except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError) as err:
        raise MaskError(f"--mask {path}: not a readable image ({type(err).__name__}: {err})") from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    slide_aspect, mask_aspect = slide_size[0] / slide_size[1], size[0] / size[1]
    if abs(mask_aspect / slide_aspect - 1) > ASPECT_TOLERANCE:
        raise MaskError(
            f"--mask {path}: {size[0]} x {size[1]} px has aspect {mask_aspect:.3f}, the slide "
            f"({slide_size[0]} x {slide_size[1]} px) {slide_aspect:.3f}: not a mask of this slide"
        )
    rows, cols = shape
    mask = np.asarray(grey.resize((cols, rows), Image.Resampling.NEAREST)) > 0
    return TissueMask(mask, (slide_size[0] / cols, slide_size[1] / rows), f"--mask {path}")


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of ``mask`` (tissue pixels with a background 4-neighbour)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)
