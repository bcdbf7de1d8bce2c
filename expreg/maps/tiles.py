"""Tiles read from a slide as model inputs: a map-style dataset for a DataLoader with workers.

Each process (and each DataLoader worker) opens the slide itself the first time it reads, so an
open TIFF file handle is never shared across a fork; a tiled TIFF is read region by region
(``expreg.ingest.images``), from the level the model's resolution asks for. A tile is cut exactly as
``expreg.prepare`` cuts a patch (``expreg.ingest.patches.cut_box``) and goes through the model's
own evaluation transform, so a tile at a spot and that spot's prepared patch give the same input.
"""

from __future__ import annotations

import os

import numpy as np

from expreg.ingest.images import SlideError, open_slide
from expreg.ingest.patches import cut_box


class TileReadError(SlideError):
    """A tile whose pixels cannot be read (a corrupt tile, a truncated file); names the tile."""


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
    """

    def __init__(self, path, x0, y0, box_px: int, patch_px: int, level: int, transform, names: list[str]):
        self.path = str(path)
        self.x0, self.y0 = np.asarray(x0, dtype=np.int64), np.asarray(y0, dtype=np.int64)
        self.box_px, self.patch_px, self.level = int(box_px), int(patch_px), int(level)
        self.transform, self.names = transform, names
        self._slide, self._pid = None, None

    def __len__(self) -> int:
        return len(self.x0)

    def _open(self):
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
        return self._slide

    def image(self, index: int):
        """The cut patch of box ``index`` as a PIL image (before the transform)."""
        x0, y0 = int(self.x0[index]), int(self.y0[index])
        try:
            return cut_box(self._open(), (x0, y0, self.box_px, self.box_px), self.level, self.patch_px)
        except SlideError as err:
            raise TileReadError(
                f"{self.path}: cannot read {self.names[index]} (level-0 x {x0}..{x0 + self.box_px}, "
                f"y {y0}..{y0 + self.box_px}): {err}"
            ) from err

    def __getitem__(self, index: int):
        return self.transform(self.image(index), self.names[index])

    def __getstate__(self):  # workers of a spawn/forkserver context open their own slide
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None
        return state
