"""Slides: one interface over every image a section can have (``open_slide(path) -> Slide``).

Owns opening an image file, its pyramid levels, region reads (white outside the image), the
choice of a level for a wanted downsample, thumbnails, and ``SlideError``:

- plain JPEG / PNG / BMP / untiled TIFF: decoded once per open with Pillow (tifffile when Pillow
  cannot read a TIFF, e.g. BigTIFF) and kept in memory as one uint8 RGB level; Pillow's
  decompression-bomb limit (a module global) is lifted during the decode only, and
  ``PLAIN_MAX_PIXELS`` applies instead;
- tiled (pyramidal) TIFF (generic, SubIFD pyramids, successive pages as in HEST-1k, SVS): each
  level read region by region with ``zarr.open(page.aszarr(), mode="r")[y0:y1, x0:x1]``, which
  decodes only the tiles the region touches. Levels are the levels tifffile finds for the first
  series (SubIFDs, SVS, OME) or else the other tiled pages with the level-0 aspect ratio, largest
  first; untiled pages (SVS thumbnails) and pages of another aspect (labels, macros) are skipped.

Every read returns uint8 RGB: greyscale is repeated, 16-bit is scaled (/257), alpha is composited
onto white. EXIF orientation is ignored: spot coordinates refer to the stored pixel grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PLAIN_MAX_PIXELS = 1_500_000_000  # a plain image is decoded whole: ~4.5 GB of RGB at this size
LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than wanted still counts (odd sizes halve inexactly)
THUMBNAIL_REDUCE = 4  # from this reduction on, a tiled level is block-averaged by half of it (then resized)
THUMBNAIL_BAND_BYTES = 32 * 2**20  # uint8 RGB pixels read at once by that reduction
PREVIEW_BAND_ROWS = 1024  # rows of a plain image reduced at once by Slide.preview (a band of 9,000-px rows: ~37 MB)
ASPECT_TOLERANCE = 0.01  # relative, plus 2 px of rounding, for a page to count as a pyramid level
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class SlideError(ValueError):
    """An image file that cannot be read: not an image, truncated, unsupported layout, unreadable tile."""


def _round(value: float) -> int:
    """Round half up (not to even): the one rounding of level coordinates."""
    return math.floor(value + 0.5)


class Slide:
    """An opened image: level-0 size, pyramid levels and region reads; a context manager.

    Attributes:
        path: The file.
        size: Level-0 ``(width, height)`` in pixels.
        level_sizes: ``(width, height)`` of every level, level 0 first (one entry for a plain image).
        tiled: Whether regions are read tile by tile from the file (tiled TIFF) rather than from memory.
    """

    def __init__(self, path: str, level_sizes: list[tuple[int, int]], tiled: bool):
        self.path = str(path)
        self.level_sizes = [(int(w), int(h)) for w, h in level_sizes]
        self.size = self.level_sizes[0]
        self.tiled = tiled
        width, height = self.size
        self.level_scales = [(width / w, height / h) for w, h in self.level_sizes]

    @property
    def downsamples(self) -> list[float]:
        """Downsample of every level relative to level 0 (the mean of its x and y factors)."""
        return [(sx + sy) / 2 for sx, sy in self.level_scales]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB ``(h, w, 3)`` of the box ``[x, x+w) x [y, y+h)`` in ``level``'s own pixels; white outside."""
        if not 0 <= level < len(self.level_sizes):
            raise ValueError(f"{self.path}: level {level} does not exist ({len(self.level_sizes)} levels)")
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: empty region {w} x {h} px")
        width, height = self.level_sizes[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return self._read(level, x0, y0, x1, y1)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(level, x0, y0, x1, y1)
        return out

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """uint8 RGB of the level-0 box ``[x, x+w) x [y, y+h)`` read from ``level``; white outside the image.

        On a level of downsample ``(sx, sy)`` the box's edges become ``x / sx`` and ``(x + w) / sx``
        (likewise for y) rounded half up, so the result is about ``(h / sy, w / sx)`` (at least 1 px).
        """
        if level == 0:
            return self.read_level(0, int(x), int(y), int(w), int(h))
        sx, sy = self.level_scales[level]
        lx0, ly0 = _round(x / sx), _round(y / sy)
        lx1, ly1 = max(_round((x + w) / sx), lx0 + 1), max(_round((y + h) / sy), ly0 + 1)
        return self.read_level(level, lx0, ly0, lx1 - lx0, ly1 - ly0)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (within ``LEVEL_TOLERANCE``); 0 if none."""
        best = 0
        for level, factor in enumerate(self.downsamples):
            if factor <= downsample * (1 + LEVEL_TOLERANCE):
                best = level
        return best

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole image with its longer side ``max_side`` (never enlarged), from the smallest level >= it.

        A tiled level at least twice the thumbnail's side (a slide without a deep pyramid) is read in
        bands of rows, each block-averaged by a whole factor as it comes (half the reduction from
        ``THUMBNAIL_REDUCE`` on, so that the final resize still filters), so memory stays at one band
        of ``THUMBNAIL_BAND_BYTES`` and its float32 copies (about 9x that) plus the result, never the
        whole level.
        """
        from PIL import Image

        level = 0
        for candidate, (w, h) in enumerate(self.level_sizes):
            if max(w, h) >= max_side:
                level = candidate
        w, h = self.level_sizes[level]
        factor = max_side / max(w, h)
        reduce = int(1 / factor) if factor < 1 else 1
        if self.tiled and reduce >= 2:
            pixels = self._reduced_level(level, reduce // 2 if reduce >= THUMBNAIL_REDUCE else reduce)
        else:
            pixels = self.read_level(level, 0, 0, w, h)
        if factor >= 1:
            return pixels
        size = (max(1, _round(w * factor)), max(1, _round(h * factor)))
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))

    def preview(self, max_side: int) -> np.ndarray:
        """The whole image with its longer side about ``max_side``, for pictures: ``thumbnail`` here; a plain
        image is box-reduced by a whole factor band by band (never copied whole), then resized."""
        return self.thumbnail(max_side)

    def _reduced_level(self, level: int, block: int) -> np.ndarray:
        """``level`` block-averaged by ``block`` (edge blocks averaged over the pixels they have), band by band."""
        w, h = self.level_sizes[level]
        rows = max(block, THUMBNAIL_BAND_BYTES // (3 * w) // block * block)
        out_w = -(-w // block)
        bands = []
        for y in range(0, h, rows):
            band = self.read_level(level, 0, y, w, min(rows, h - y)).astype(np.float32)
            bh = band.shape[0]
            padded = np.zeros((-(-bh // block) * block, out_w * block, 3), dtype=np.float32)
            padded[:bh, :w] = band
            weight = np.zeros(padded.shape[:2], dtype=np.float32)
            weight[:bh, :w] = 1
            shape = (padded.shape[0] // block, block, out_w, block)
            total = padded.reshape(*shape, 3).sum(axis=(1, 3))
            count = weight.reshape(shape).sum(axis=(1, 3))[:, :, None]
            bands.append(np.clip(total / count + 0.5, 0, 255).astype(np.uint8))
        return np.concatenate(bands)

    def close(self) -> None:
        """Release the file (a closed slide cannot be read)."""

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "tiled" if self.tiled else "plain"
        return f"{type(self).__name__}({self.path!r}, {kind}, levels={self.level_sizes})"


class PlainSlide(Slide):
    """A plain image decoded into memory once (one level)."""

    def __init__(self, path: str, pixels: np.ndarray):
        super().__init__(path, [(pixels.shape[1], pixels.shape[0])], tiled=False)
        self._pixels = pixels

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._pixels is None:
            raise ValueError(f"{self.path}: the slide is closed")
        return np.array(self._pixels[y0:y1, x0:x1])

    def preview(self, max_side: int) -> np.ndarray:
        from PIL import Image

        if self._pixels is None:
            raise ValueError(f"{self.path}: the slide is closed")
        height, width = self._pixels.shape[:2]
        factor = max(width, height) // max_side
        if factor > 1:  # in bands of rows (a whole number of boxes each): one band copied at a time
            band = factor * max(1, PREVIEW_BAND_ROWS // factor)
            rows = (Image.fromarray(self._pixels[y : y + band]).reduce(factor) for y in range(0, height, band))
            image = Image.fromarray(np.concatenate([np.asarray(part) for part in rows]))
        else:
            image = Image.fromarray(self._pixels)
        if max(image.size) > max_side:
            size = [max(1, _round(side * max_side / max(image.size))) for side in image.size]
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image)

    def close(self) -> None:
        self._pixels = None


class TiledSlide(Slide):
    """A tiled (pyramidal) TIFF read region by region through ``zarr`` (one array per level, opened when first read)."""

    def __init__(self, path: str, tif, pages: list):
        super().__init__(path, [(p.imagewidth, p.imagelength) for p in pages], tiled=True)
        self._tif, self._pages = tif, pages
        self._arrays: dict[int, object] = {}

    def _array(self, level: int):
        if self._tif is None:
            raise ValueError(f"{self.path}: the slide is closed")
        if level not in self._arrays:
            import zarr

            self._arrays[level] = zarr.open(self._pages[level].aszarr(), mode="r")
        return self._arrays[level]

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        array, planar = self._array(level), self._pages[level].axes.startswith("S")
        try:
            region = array[:, y0:y1, x0:x1] if planar else array[y0:y1, x0:x1]
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read level {level} region x {x0}..{x1}, y {y0}..{y1}: a tile is "
                f"corrupt or the file is truncated ({type(exc).__name__}: {exc})"
            ) from exc
        return array_to_rgb(np.moveaxis(region, 0, -1) if planar else region, self.path)

    def close(self) -> None:
        if self._tif is not None:
            self._arrays.clear()
            self._tif.close()
            self._tif = None


def array_to_rgb(array: np.ndarray, path: str = "") -> np.ndarray:
    """uint8 RGB ``(h, w, 3)`` from a ``(h, w)`` or ``(h, w, 1..4)`` array (grey, grey+alpha, RGB, RGBA).

    16-bit (any integer wider than 8 bits) is scaled by 1/257 after clipping to 0..65535, floats are
    taken as 0..1; alpha is composited onto white.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise SlideError(f"{path}: unsupported image layout, shape {array.shape} (want height x width x 1-4)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.nan_to_num(array) * 255 + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise SlideError(f"{path}: unsupported pixel type {array.dtype}")
        array = ((np.clip(array, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    channels = array.shape[2]
    if channels in (2, 4):
        colour, alpha = array[:, :, : channels - 1].astype(np.uint16), array[:, :, channels - 1 :].astype(np.uint16)
        array = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _pil_to_rgb(image, path: str) -> np.ndarray:
    """uint8 RGB of a loaded Pillow image (any mode; transparency onto white)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale
        pixels = np.asarray(image)
        if mode == "F" or (mode == "I" and pixels.max(initial=0) > 65535):
            raise SlideError(f"{path}: unsupported image mode {mode} (want 8- or 16-bit greyscale, RGB or RGBA)")
        return array_to_rgb(pixels, path)
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise SlideError(f"{path}: unsupported image mode {mode} ({exc})") from exc


def _decode_plain(path: str) -> np.ndarray:
    """The whole image as uint8 RGB, decoded with Pillow (the pixel limit lifted for this call only)."""
    from PIL import Image, UnidentifiedImageError

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            if image.width * image.height > PLAIN_MAX_PIXELS:
                raise SlideError(
                    f"{path}: {image.width} x {image.height} px is too large to decode as a plain "
                    f"{image.format} image (limit {PLAIN_MAX_PIXELS:,} px); convert it to a tiled pyramidal TIFF"
                )
            image.load()
            return _pil_to_rgb(image, path)
    except UnidentifiedImageError as exc:
        raise SlideError(
            f"{path}: not an image (Pillow does not recognise the format; starts {_head(path)!r})"
        ) from exc
    except SlideError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise SlideError(f"{path}: cannot decode the image; the file is truncated or corrupt ({exc})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _head(path: str, n: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def _page_size(page) -> tuple[int, int]:
    return int(page.imagewidth), int(page.imagelength)


def _same_aspect(base: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether ``size`` is ``base`` scaled by one factor (within rounding)."""
    factor = base[0] / size[0]
    expected = base[1] / factor
    return abs(expected - size[1]) <= ASPECT_TOLERANCE * expected + 2


def pyramid_pages(tif, path: str = "") -> list:
    """The pages of a TIFF's levels, level 0 first (see the module docstring); ``[]`` if level 0 is not tiled."""
    if not tif.series:
        raise SlideError(f"{path}: not a readable TIFF (tifffile finds no image in it; truncated or corrupt?)")
    series = tif.series[0]
    pages = [level.keyframe for level in series.levels]
    base = pages[0]
    if base is None or not base.is_tiled:
        return []
    if len(pages) == 1:
        size = _page_size(base)
        pages += [
            page
            for page in tif.pages[1:]
            if getattr(page, "is_tiled", False)
            and page.samplesperpixel == base.samplesperpixel
            and _page_size(page)[0] < size[0]
            and _same_aspect(size, _page_size(page))
        ]
    unique = {}
    for page in sorted(pages, key=lambda p: -_page_size(p)[0]):
        unique.setdefault(_page_size(page), page)
    return list(unique.values())


def _check_page(page, path: str) -> None:
    if page.imagedepth > 1 or page.axes.lstrip("S") not in ("YX", "YXS"):
        raise SlideError(f"{path}: unsupported TIFF layout (axes {page.axes}, shape {page.shape})")
    if page.samplesperpixel > 4 or page.photometric.name in (
        "MINISWHITE",
        "PALETTE",
        "SEPARATED",
        "CIELAB",
        "ICCLAB",
        "ITULAB",
    ):
        raise SlideError(
            f"{path}: unsupported TIFF photometric {page.photometric.name} with {page.samplesperpixel} samples"
        )


def _open_tiff(path: str) -> Slide:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    try:
        pages = pyramid_pages(tif, path)
        for page in pages:
            _check_page(page, path)
    except SlideError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise SlideError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if pages:
        return TiledSlide(path, tif, pages)
    tif.close()
    return PlainSlide(path, _decode_untiled_tiff(path))


def _decode_untiled_tiff(path: str) -> np.ndarray:
    """An untiled TIFF decoded whole: Pillow first (palettes, 1-bit, CMYK), tifffile for what Pillow cannot read."""
    try:
        return _decode_plain(path)
    except SlideError as pillow_error:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                _check_page(page, path)
                pixels = page.asarray()
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{pillow_error}; tifffile: {type(exc).__name__}: {exc}") from exc
        return array_to_rgb(np.moveaxis(pixels, 0, -1) if page.axes.startswith("S") else pixels, path)


def open_slide(path) -> Slide:
    """Open an image file as a ``Slide`` (tiled TIFF: regions from the file; anything else: decoded once).

    Raises:
        FileNotFoundError: No such file.
        SlideError: Not an image, truncated or corrupt, or an unsupported layout (the message names the file).
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if _head(path, 4) in _TIFF_MAGIC:
        return _open_tiff(path)
    return PlainSlide(path, _decode_plain(path))


def image_size(path) -> tuple[int, int]:
    """Level-0 ``(width, height)`` of an image, from its header (nothing is decoded).

    For checks before any work (a plain 10k x 10k JPEG takes seconds to decode); the pixels are
    read, and their errors raised, by ``open_slide``.
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if _head(path, 4) in _TIFF_MAGIC:
        with _open_tiff(path) as slide:
            return tuple(slide.size)
    from PIL import Image, UnidentifiedImageError

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a whole-section H&E is large, not a bomb
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SlideError(
            f"{path}: not a readable image ({type(err).__name__}: {err}; first bytes {_head(path)!r})"
        ) from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous
