"""The tiles of a map: a regular grid over the slide, kept where there is tissue.

Tiles are squares of the model's patch size (``box_px`` level-0 pixels, as ``expreg.prepare`` cuts
them) whose top-left corners lie ``stride_px`` apart; the grid is centred on the slide and every
tile lies wholly inside it. A tile is kept when at least ``min_tissue`` of its area is tissue in the
mask (measured on the mask's pixels with a summed-area table). Tiles are numbered row by row, top
to bottom, left to right; that order is the order of every output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from expreg.maps.tissue import TissueMask


@dataclass
class TileGrid:
    """The kept tiles (one entry per tile, row-major) and the grid they come from.

    Attributes:
        x0, y0: Level-0 top-left corner of every kept tile (int64).
        row, col: Grid row and column of every kept tile.
        tissue: Tissue fraction of every kept tile.
        box_px: Tile side in level-0 pixels.
        stride_px: Distance between neighbouring tiles' corners in level-0 pixels.
        shape: ``(rows, cols)`` of the whole grid (tissue or not).
        origin: Level-0 ``(x, y)`` of grid cell (0, 0)'s top-left corner.
    """

    x0: np.ndarray
    y0: np.ndarray
    row: np.ndarray
    col: np.ndarray
    tissue: np.ndarray
    box_px: int
    stride_px: float
    shape: tuple[int, int]
    origin: tuple[float, float]

    def __len__(self) -> int:
        return len(self.x0)

    @property
    def centre_x(self) -> np.ndarray:
        """Level-0 x of every tile's centre pixel, placed as ``expreg.prepare`` places a spot in its patch.

        That is ``x0 + box_px // 2`` (the middle pixel; for an even side the one right of the
        middle), so ``expreg.ingest.patches.patch_box(centre_x, centre_y, geometry)`` gives back
        the tile's box exactly.
        """
        return self.x0 + self.box_px // 2

    @property
    def centre_y(self) -> np.ndarray:
        """Level-0 y of every tile's centre pixel (as ``centre_x``)."""
        return self.y0 + self.box_px // 2

    def names(self) -> list[str]:
        """``tile_<row>_<col>`` of every kept tile (the obs names of ``predictions.h5ad``)."""
        return [f"tile_{r}_{c}" for r, c in zip(self.row.tolist(), self.col.tolist())]

    def raster(self, values: np.ndarray) -> np.ndarray:
        """``values`` (one per kept tile) on the ``shape`` grid, NaN where no tile was kept."""
        out = np.full(self.shape, np.nan, dtype=np.float64)
        out[self.row, self.col] = values
        return out


def _axis(length: int, box: int, stride: float) -> np.ndarray:
    """Top-left coordinates of the tiles along one side: as many as fit, the run centred."""
    if length < box:
        return np.zeros(0, dtype=np.int64)
    count = math.floor((length - box) / stride + 1e-9) + 1
    offset = (length - box - (count - 1) * stride) / 2
    return np.floor(offset + np.arange(count) * stride + 0.5).astype(np.int64)


def _summed_area(mask: np.ndarray) -> np.ndarray:
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return table


def _mask_span(start: np.ndarray, box: int, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask-pixel range ``[a, b)`` (at least one pixel) of level-0 spans ``[start, start + box)``."""
    a = np.clip(np.floor(start / scale + 0.5).astype(np.int64), 0, limit - 1)
    b = np.clip(np.floor((start + box) / scale + 0.5).astype(np.int64), a + 1, limit)
    return a, b


def tissue_fractions(mask: TissueMask, x0: np.ndarray, y0: np.ndarray, box: int) -> np.ndarray:
    """Tissue fraction of the level-0 boxes ``(x0, y0, box, box)`` on ``mask``."""
    rows, cols = mask.mask.shape
    xa, xb = _mask_span(x0, box, mask.scale[0], cols)
    ya, yb = _mask_span(y0, box, mask.scale[1], rows)
    table = _summed_area(mask.mask)
    inside = table[yb, xb] - table[ya, xb] - table[yb, xa] + table[ya, xa]
    return inside / ((xb - xa) * (yb - ya))


def make_grid(
    slide_size: tuple[int, int], box_px: int, stride_px: float, mask: TissueMask, min_tissue: float
) -> TileGrid:
    """The tiles of a ``slide_size`` slide with at least ``min_tissue`` of tissue (module docstring)."""
    if box_px < 1 or not stride_px > 0:
        raise ValueError(f"tile side {box_px} px and stride {stride_px} px must be positive")
    xs, ys = _axis(slide_size[0], box_px, stride_px), _axis(slide_size[1], box_px, stride_px)
    row, col = (g.ravel() for g in np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij"))
    x0, y0 = xs[col], ys[row]
    fraction = tissue_fractions(mask, x0, y0, box_px) if len(x0) else np.zeros(0)
    keep = fraction >= min_tissue - 1e-12
    origin = (float(xs[0]) if len(xs) else 0.0, float(ys[0]) if len(ys) else 0.0)
    return TileGrid(
        x0[keep], y0[keep], row[keep], col[keep], fraction[keep], box_px, float(stride_px), (len(ys), len(xs)), origin
    )
