"""The pictures of a map: the thumbnail with its tissue outline, one map per gene, the overview grid,
and measured | predicted side by side at the spots.

Every gene picture paints values over a pale copy of the thumbnail, in level-0 pixel coordinates
(so tiles and spots land where they are on the slide), with a colour bar labelled in the model's
expression units and the colour range clipped to the 1st..99th percentile (one outlying tile does
not wash out the map; the colour bar says so), and a scale bar in µm. The tiles' opacity is
``--alpha`` (the H&E shows through below 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from expreg.ingest.patch_picture import draw_scale_bar, scale_bar_um, scale_label
from expreg.maps.grid import TileGrid
from expreg.maps.tissue import outline

OUTLINE_RGB = (0, 170, 60)
CMAP = "magma"
CLIPPED = "1st-99th percentile"  # the colour range of every gene picture (_limits)


def add_scale_bar(ax, um_per_px: float, view) -> None:
    """A scale bar in µm at the lower left of an axis drawn in level-0 pixel coordinates (``view``: its box)."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    length = scale_bar_um((view[1] - view[0]) * um_per_px)
    bar = AnchoredSizeBar(
        ax.transData, length / um_per_px, scale_label(length), "lower left", pad=0.4, frameon=True, size_vertical=0
    )
    bar.patch.set_alpha(0.75)
    ax.add_artist(bar)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_thumbnail(
    path: Path, thumbnail: np.ndarray, mask: np.ndarray, um_per_thumbnail_px: float | None = None
) -> None:
    """``thumbnail`` with the outline of ``mask`` (resized to it) drawn in green, and a scale bar when the scale
    is known, as PNG."""
    from PIL import Image
    from scipy import ndimage

    if mask.shape != thumbnail.shape[:2]:
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(thumbnail.shape[1::-1], Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 0
    edge = ndimage.binary_dilation(outline(mask), iterations=max(1, max(mask.shape) // 400))
    picture = thumbnail.copy()
    picture[edge] = OUTLINE_RGB
    image = Image.fromarray(picture)
    if um_per_thumbnail_px:
        draw_scale_bar(image, um_per_thumbnail_px)
    image.save(path)


def save_mask(path: Path, mask: np.ndarray) -> None:
    """The tissue mask as a black and white PNG (white = tissue)."""
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _pale(thumbnail: np.ndarray) -> np.ndarray:
    grey = thumbnail.astype(np.float32).mean(axis=2, keepdims=True)
    return (255 - 0.45 * (255 - np.repeat(grey, 3, axis=2))).astype(np.uint8)


def _limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1, 99])
    return (float(low), float(high)) if high > low else (float(low) - 0.5, float(low) + 0.5)


def view_box(slide_size, grid: TileGrid | None = None, points=None, margin: float = 0.05) -> tuple[float, ...]:
    """Level-0 ``(left, right, top, bottom)`` around the tiles (and points), plus ``margin``, within the slide."""
    xs, ys = [], []
    if grid is not None and len(grid):
        xs += [grid.x0.min(), grid.x0.max() + grid.box_px]
        ys += [grid.y0.min(), grid.y0.max() + grid.box_px]
    if points is not None and len(points[0]):
        xs += [np.min(points[0]), np.max(points[0])]
        ys += [np.min(points[1]), np.max(points[1])]
    width, height = slide_size
    if not xs:
        return 0.0, float(width), 0.0, float(height)
    pad = margin * max(max(xs) - min(xs), max(ys) - min(ys), 1.0)
    return (
        max(0.0, min(xs) - pad),
        min(float(width), max(xs) + pad),
        max(0.0, min(ys) - pad),
        min(float(height), max(ys) + pad),
    )


def _aspect(view) -> float:
    return min(1.6, max(0.6, (view[1] - view[0]) / max(view[3] - view[2], 1.0)))


BACKGROUND_PX = 1000  # longest side of the thumbnail crop drawn under a picture


def _background(ax, thumbnail: np.ndarray, slide_size: tuple[int, int], view) -> None:
    """The pale thumbnail cropped to ``view`` (level-0 box) and reduced to ``BACKGROUND_PX``, under the data."""
    from PIL import Image

    width, height = slide_size
    sx, sy = thumbnail.shape[1] / width, thumbnail.shape[0] / height
    x0, x1 = int(view[0] * sx), min(thumbnail.shape[1], int(np.ceil(view[1] * sx)) + 1)
    y0, y1 = int(view[2] * sy), min(thumbnail.shape[0], int(np.ceil(view[3] * sy)) + 1)
    crop = Image.fromarray(_pale(thumbnail[y0:y1, x0:x1]))
    crop.thumbnail((BACKGROUND_PX, BACKGROUND_PX), Image.Resampling.LANCZOS)
    ax.imshow(np.asarray(crop), extent=(x0 / sx, x1 / sx, y1 / sy, y0 / sy), interpolation="bilinear")
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[3], view[2])
    ax.set_xticks([])
    ax.set_yticks([])


def _paint_tiles(ax, grid: TileGrid, values: np.ndarray, alpha: float = 0.9):
    """The tiles' values as squares of the stride, centred on the tiles, at opacity ``alpha``; returns the image
    (for a colour bar)."""
    rows, cols = grid.shape
    shift = (grid.box_px - grid.stride_px) / 2
    left, top = grid.origin[0] + shift, grid.origin[1] + shift
    extent = (left, left + cols * grid.stride_px, top + rows * grid.stride_px, top)
    low, high = _limits(values)
    raster = np.ma.masked_invalid(grid.raster(values))
    return ax.imshow(raster, extent=extent, cmap=CMAP, vmin=low, vmax=high, interpolation="nearest", alpha=alpha)


def _paint_spots(ax, x: np.ndarray, y: np.ndarray, values: np.ndarray, radius: float):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    low, high = _limits(values)
    circles = PatchCollection([Circle((a, b), radius) for a, b in zip(x, y)], cmap=CMAP, linewidths=0)
    circles.set_array(np.asarray(values, dtype=float))
    circles.set_clim(low, high)
    ax.add_collection(circles)
    return circles


def spot_radius(x: np.ndarray, y: np.ndarray) -> float:
    """Half the median distance to the nearest other spot (spots drawn touching, never overlapping much)."""
    from scipy.spatial import cKDTree

    points = np.column_stack([x, y])
    if len(points) < 2:
        return 50.0
    distances, _ = cKDTree(points).query(points, k=2)
    return float(np.median(distances[:, 1])) * 0.45


class GeneMaps:
    """One figure drawn once (background, colour bar) and saved per gene with its values: ``draw(path, values, gene)``."""

    def __init__(self, thumbnail, slide_size, grid: TileGrid, unit: str, title: str, um_per_px: float, alpha: float):
        plt = _pyplot()
        self.grid, self.plt = grid, plt
        view = view_box(slide_size, grid)
        self.fig, self.ax = plt.subplots(figsize=(7.0 * _aspect(view) + 1.4, 7.6), layout="constrained")
        _background(self.ax, thumbnail, slide_size, view)
        self.image = _paint_tiles(self.ax, grid, np.zeros(len(grid)), alpha)
        add_scale_bar(self.ax, um_per_px, view)
        self.bar = self.fig.colorbar(self.image, ax=self.ax, fraction=0.04, pad=0.02)
        self.bar.set_label(f"predicted {unit}, clipped to its {CLIPPED}")
        self.fig.suptitle(title, fontsize=9)

    def draw(self, path: Path, values, gene: str) -> None:
        self.image.set_data(np.ma.masked_invalid(self.grid.raster(values)))
        self.image.set_clim(*_limits(np.asarray(values, dtype=float)))
        self.ax.set_title(gene, fontsize=15, fontweight="bold")
        self.fig.savefig(path, dpi=110)

    def close(self) -> None:
        self.plt.close(self.fig)


def overview(
    path: Path,
    thumbnail,
    slide_size,
    grid: TileGrid,
    matrix,
    genes: list[str],
    unit: str,
    title: str,
    um_per_px: float,
    alpha: float,
):
    """A grid of gene maps (up to 4 per row), each with its own colour bar and a scale bar."""
    plt = _pyplot()
    cols = min(4, len(genes))
    rows = -(-len(genes) // cols)
    view = view_box(slide_size, grid)
    panel, aspect = 3.6, _aspect(view)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * (panel * aspect + 0.8), rows * panel + 1.1), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel()[len(genes) :]:
        ax.axis("off")
    for ax, gene, values in zip(axes.ravel(), genes, np.asarray(matrix).T):
        _background(ax, thumbnail, slide_size, view)
        image = _paint_tiles(ax, grid, values, alpha)
        add_scale_bar(ax, um_per_px, view)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
        ax.set_title(gene, fontsize=11, fontweight="bold")
    fig.suptitle(f"{title}\ncolour: predicted {unit}, per gene, clipped to its {CLIPPED}", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measured_vs_predicted(
    path: Path, thumbnail, slide_size, spots_xy, measured, predicted, rows: list[dict], unit, um_per_px: float
):
    """One row per gene in ``rows`` (``gene``, ``spearman``, ``pearson``, ``label``, column index ``k``):
    measured | predicted at the spots, each panel on its own colour scale."""
    plt = _pyplot()
    x, y = spots_xy
    radius = spot_radius(x, y)
    view = view_box(slide_size, points=(x, y))
    aspect = _aspect(view)
    fig, axes = plt.subplots(
        len(rows),
        2,
        figsize=(2 * (3.6 * aspect + 0.8) + 0.6, 3.6 * len(rows) + 1.2),
        squeeze=False,
        layout="constrained",
    )
    for (left, right), row in zip(axes, rows):
        for ax, values, kind in (
            (left, measured[:, row["k"]], "measured"),
            (right, predicted[:, row["k"]], "predicted"),
        ):
            _background(ax, thumbnail, slide_size, view)
            art = _paint_spots(ax, x, y, values, radius)
            add_scale_bar(ax, um_per_px, view)
            fig.colorbar(art, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
            ax.set_title(f"{row['gene']}: {kind}", fontsize=10, fontweight="bold")
        pearson = "n/a" if row["pearson"] is None else f"{row['pearson']:.3f}"
        adjusted = row.get("spearman_depth_adjusted")
        adjusted = "n/a" if adjusted is None else f"{adjusted:.3f}"
        left.set_ylabel(
            f"{row['label']}\nSpearman {row['spearman']:.3f}, Pearson {pearson}\ndepth-adjusted Spearman {adjusted}",
            fontsize=9,
        )
    fig.suptitle(
        f"Measured | predicted {unit} at {len(x)} spots; best and worst genes by Spearman\n"
        f"(each panel on its own colour scale, clipped to its {CLIPPED}: compare patterns, not levels;\n"
        "depth-adjusted: the spot's library size regressed out of both)",
        fontsize=11,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
