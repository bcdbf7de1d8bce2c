"""Tiles read from a slide as model inputs: a map-style dataset for a DataLoader with workers.

Each process (and each DataLoader worker) opens the slide itself the first time it reads, so an
open TIFF file handle is never shared across a fork; a tiled TIFF is read region by region
(``expreg.ingest.images``), from the level the model's resolution asks for. A tile is cut exactly as
``expreg.prepare`` cuts a patch (``expreg.ingest.patches.cut_box``) and goes through the model's
own evaluation transform, so a tile at a spot and that spot's prepared patch give the same input.

A tiled slide is read through a ``BlockCache`` of decoded blocks: neighbouring tiles share the
slide's TIFF tiles, which tile-by-tile reads would decode again for every tile they touch (about
3.5 times for 224-px tiles on 256-px TIFF tiles, each read paying zarr's per-call cost; measured
in ``benchmarks/RESULTS.md``, section 8). The pixels are exactly those of direct reads.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from expreg.ingest.images import SlideError, open_slide
from expreg.ingest.patches import cut_box

BLOCK_PX = 256  # side of a cached block, in level pixels, on a grid from (0, 0) (the usual TIFF tile size)
CACHE_BYTES = 96 * 2**20  # decoded blocks kept per process and per DataLoader worker (~2.5 rows of a 50k px level)


class TileReadError(SlideError):
    """A tile whose pixels cannot be read (a corrupt tile, a truncated file); names the tile."""


class BlockCache:
    """``slide.read_level`` through a cache of decoded ``BLOCK_PX`` blocks (least recently used out).

    A block is a region of ``slide.read_level`` (white outside the level), so a region put together
    from blocks has exactly the pixels of a direct read. The blocks a read lacks are read in one
    call; if that fails (a corrupt TIFF tile in them) the region is read directly, so a read fails
    only where a direct read would. In row-major tile order within one reader every block is decoded
    once while the tiles over it are read (several DataLoader workers or processes each keep their own
    cache, so blocks at the edges of their batches are decoded by each). Offers what ``cut_box`` uses: ``level_scales``, ``level_sizes``, ``read_level``.
    """

    def __init__(self, slide, max_bytes: int | None = None):
        self.slide, self.level_scales, self.level_sizes = slide, slide.level_scales, slide.level_sizes
        self._blocks: OrderedDict = OrderedDict()
        self._capacity = (CACHE_BYTES if max_bytes is None else max_bytes) // (3 * BLOCK_PX**2)  # 0: no cache

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        b = BLOCK_PX
        keys = [
            (level, bx, by) for by in range(y // b, (y + h - 1) // b + 1) for bx in range(x // b, (x + w - 1) // b + 1)
        ]
        if len(keys) > self._capacity:
            return self.slide.read_level(level, x, y, w, h)
        try:
            self._load(level, [key for key in keys if key not in self._blocks])
        except SlideError:
            return self.slide.read_level(level, x, y, w, h)
        out = np.empty((h, w, 3), dtype=np.uint8)
        for key in keys:
            self._blocks.move_to_end(key)
            bx, by = key[1] * b, key[2] * b
            x0, y0, x1, y1 = max(x, bx), max(y, by), min(x + w, bx + b), min(y + h, by + b)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._blocks[key][y0 - by : y1 - by, x0 - bx : x1 - bx]
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)
        return out

    def _load(self, level: int, missing: list) -> None:
        """Read the ``missing`` blocks' bounding box in one call and keep each of them."""
        if not missing:
            return
        b = BLOCK_PX
        bx0, by0 = min(key[1] for key in missing), min(key[2] for key in missing)
        bx1, by1 = max(key[1] for key in missing) + 1, max(key[2] for key in missing) + 1
        region = self.slide.read_level(level, bx0 * b, by0 * b, (bx1 - bx0) * b, (by1 - by0) * b)
        for key in missing:
            x, y = (key[1] - bx0) * b, (key[2] - by0) * b
            self._blocks[key] = region[y : y + b, x : x + b].copy()


class SlideTiles:
    """``pixel_values`` of level-0 boxes ``(x0[i], y0[i], box_px, box_px)`` of ``path``, resampled to ``patch_px``.

    Args:
        path: The slide.
        x0, y0: Level-0 top-left corners.
        box_px: Box side in level-0 pixels.
        patch_px: Side of the cut patch (the training patches' pixels) before the model's transform.
        level: Pyramid level to read from.
        transform: ``transform(image, name) -> tensor`` (the model's evaluation transform).
        names: One name per box, used in errors.
        slide: The slide already opened by the caller: a plain (decoded) one is shared with forked
            DataLoader workers instead of being decoded again by each; a tiled one is reopened.
    """

    def __init__(
        self,
        path,
        x0,
        y0,
        box_px: int,
        patch_px: int,
        level: int,
        transform,
        names: list[str],
        slide=None,
        context=None,
    ):
        self.path = str(path)
        self.context = context  # a multiscale model's context boxes: (x0s, y0s, box_px, level), one per box
        self.x0, self.y0 = np.asarray(x0, dtype=np.int64), np.asarray(y0, dtype=np.int64)
        self.box_px, self.patch_px, self.level = int(box_px), int(patch_px), int(level)
        self.transform, self.names = transform, names
        self._slide, self._pid = None, None
        self._plain = slide if slide is not None and not slide.tiled else None

    def __len__(self) -> int:
        return len(self.x0)

    def _open(self):
        if self._plain is not None:  # decoded pixels, no file handle: safe to share across forks
            return self._plain
        if self._slide is None or self._pid != os.getpid():
            slide = open_slide(self.path)
            self._slide, self._pid = BlockCache(slide) if slide.tiled else slide, os.getpid()
        return self._slide

    def image(self, index: int):
        """The cut patch of box ``index`` as a PIL image (before the transform)."""
        return self._cut(index, int(self.x0[index]), int(self.y0[index]), self.box_px, self.level)

    def _cut(self, index: int, x0: int, y0: int, box_px: int, level: int):
        try:
            return cut_box(self._open(), (x0, y0, box_px, box_px), level, self.patch_px)
        except SlideError as err:
            raise TileReadError(
                f"{self.path}: cannot read {self.names[index]} (level-0 x {x0}..{x0 + box_px}, "
                f"y {y0}..{y0 + box_px}): {err}"
            ) from err

    def __getitem__(self, index: int):
        x = self.transform(self.image(index), self.names[index])
        if self.context is None:
            return x
        import torch

        cx0, cy0, box_px, level = self.context  # the context patch, transformed as its patch
        context = self._cut(index, int(cx0[index]), int(cy0[index]), box_px, level)
        return torch.cat([x, self.transform(context, self.names[index])], dim=0)

    def __getstate__(self):  # workers of a spawn/forkserver context open their own slide
        state = dict(self.__dict__)
        state["_slide"], state["_pid"], state["_plain"] = None, None, None
        return state
