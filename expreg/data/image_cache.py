"""Decoded-image cache: every image decoded and resized once, stored as uint8 in a memory-mapped Arrow file.

Decoding JPEG/PNG patches and resizing them is the same work every epoch. With
``data.image_cache=true`` expreg does it once, before training, and the DataLoader then reads
the resized ``uint8`` pixels from an Arrow IPC file that is memory-mapped (the operating system
shares the pages between processes and workers; nothing is loaded into Python memory).
Augmentation still runs per epoch on top of the cached pixels, and the pixels are exactly
those the uncached pipeline makes (``expreg.data.transforms.decode_resized``), so a run gives the
same numbers with the cache as without.

A cache is identified by the image size and every image's absolute path, size in bytes and
modification time: change an image, add one or change ``data.image_size`` and a new cache is
built (old ones stay until you delete them; each is one folder under
``<data.image_cache_dir>/images/``, by default ``$EXPREG_CACHE`` or ``~/.cache/expreg``).
Images that cannot be decoded are recorded in the cache with the reason, and handled by
``data.bad_image_policy`` like uncached ones.

Owns building a cache (``ensure_image_cache``: fingerprint, disk-space check, atomic build,
waiting for another process's build) and reading one (``ImageCache``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from expreg.data.demo import default_cache_dir
from expreg.run_dir import process_alive

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the pixels a cache holds would change (resize method, layout, to_rgb ranges)
ROWS_PER_BATCH = 256  # rows per Arrow record batch (readers look chunks up by offset, not by this)
CACHE_FILE = "images.arrow"
INFO_FILE = "cache_info.json"
ROW_OVERHEAD_BYTES = 300  # a row's estimated bytes besides its pixels (path, error, offsets): space check
MAX_DISK_FRACTION = 0.95  # the most of the free disk space a new cache may take
_HOST = socket.gethostname().replace(".", "-")


class ImageCacheError(OSError):
    """The image cache cannot be built (not enough disk space, a folder that cannot be written)."""


def fingerprint(paths: list[str], image_size: int) -> str:
    """A digest of the image size, the Pillow version (its decoders and resize make the pixels) and
    each image's path, size and modification time (a patch store's image: its shards' and its row), in
    the order given."""
    import PIL

    digest = hashlib.sha256(f"expreg-image-cache v{FORMAT_VERSION} {image_size} Pillow {PIL.__version__}\n".encode())
    from expreg.data.patch_store import stamp

    for path in paths:
        stored = stamp(path)
        if stored is not None:  # an image of a patch store (data.patches): its shards and row
            digest.update(f"{path}\0store {stored}\n".encode())
            continue
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError as err:  # a missing file: recorded as such (decoding it fails later, by policy)
            digest.update(f"{path}\0missing {err.errno}\n".encode())
    return digest.hexdigest()


class ImageCache:
    """Read side: ``get(path) -> (uint8 tensor (3, S, S), None)`` or ``(None, reason)``.

    Pickles without the open memory map (folder, size and count only): a worker started by
    ``spawn`` re-opens the map itself; forked workers share the parent's.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        info = json.loads((self.folder / INFO_FILE).read_text())
        self.image_size = int(info["image_size"])
        self.num_images = int(info["num_images"])
        self._table = None

    def _open(self):
        import pyarrow as pa

        if self._table is None:
            source = pa.memory_map(str(self.folder / CACHE_FILE), "r")
            self._table = pa.ipc.open_file(source).read_all()  # zero-copy: the columns point into the map
            self._paths = self._table.column("path")
            self._pixels = self._table.column("pixels")
            self._errors = self._table.column("error")
            lengths = [len(chunk) for chunk in self._pixels.chunks]
            self._chunk_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return self._table

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "image_size": self.image_size, "num_images": self.num_images, "_table": None}

    @staticmethod
    def folder_for(paths: list[str], image_size: int, cache_root: str | os.PathLike | None = None) -> Path:
        """Where the cache of these (sorted, unique) paths at this size lives."""
        root = Path(cache_root) if cache_root is not None else default_cache_dir()
        return root / "images" / f"{image_size}px-{fingerprint(paths, image_size)[:20]}"

    def __len__(self) -> int:
        return self.num_images

    def unreadable(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image that could not be decoded when the cache was built."""
        import pyarrow.compute as pc

        table = self._open().filter(pc.is_valid(self._errors))
        return list(zip(table.column("path").to_pylist(), table.column("error").to_pylist()))

    def index(self, path: str) -> int:
        """Row of ``path`` (rows are sorted by path); KeyError when the cache does not hold it."""
        self._open()
        paths = _StringColumn(self._paths)
        row = bisect.bisect_left(paths, path)
        if row == len(paths) or paths[row] != path:
            raise KeyError(f"{path} is not in the image cache {self.folder}")
        return row

    def get(self, path: str):
        import torch

        row = self.index(path)
        error = self._errors[row].as_py()
        if error is not None:
            return None, error
        chunk = int(np.searchsorted(self._chunk_starts, row, side="right")) - 1
        offset = row - int(self._chunk_starts[chunk])
        array = self._pixels.chunk(chunk)
        nbytes = array.type.byte_width
        buffer = array.buffers()[1]
        start = (array.offset + offset) * nbytes
        pixels = np.frombuffer(buffer, dtype=np.uint8, count=nbytes, offset=start).copy()  # out of the read-only map
        return torch.from_numpy(pixels).view(3, self.image_size, self.image_size), None


class _StringColumn:
    """Random access to an Arrow string column as Python strings (for ``bisect``)."""

    def __init__(self, column) -> None:
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return self.column[i].as_py()


class _DecodeFiles:
    """Dataset over image files: ``(path, CHW uint8 bytes or None, error or None)``."""

    def __init__(self, paths: list[str], image_size: int) -> None:
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from expreg.data.transforms import decode_resized, load_image

        path = self.paths[i]
        image, reason = load_image(path)
        if image is None:
            return path, None, reason
        try:
            return path, decode_resized(image, self.image_size).numpy().tobytes(), None
        except Exception as err:  # noqa: BLE001 - e.g. an image mode PIL cannot convert
            return path, None, f"{type(err).__name__}: {err}"


def _as_list(rows: list) -> list:
    return rows


def _write(folder: Path, paths: list[str], image_size: int, num_workers: int, progress: bool) -> None:
    import pyarrow as pa
    import torch
    from torch.utils.data import DataLoader

    from expreg.data.loaders import worker_options
    from expreg.progress import progress_bar

    nbytes = 3 * image_size * image_size
    schema = pa.schema(
        [("path", pa.string()), ("pixels", pa.binary(nbytes)), ("error", pa.string())],
        metadata={"image_size": str(image_size), "layout": "CHW uint8 RGB"},
    )
    loader = DataLoader(
        _DecodeFiles(paths, image_size),
        batch_size=ROWS_PER_BATCH,
        collate_fn=_as_list,
        generator=torch.Generator().manual_seed(0),  # not the global RNG: a run is the same with or without a build
        **worker_options(num_workers, seed=False),
    )
    blank = bytes(nbytes)
    with pa.OSFile(str(folder / CACHE_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        bar = progress_bar(
            total=len(paths), desc=f"caching decoded images ({image_size} px)", unit="img", enabled=progress
        )
        for rows in loader:
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array([r[0] for r in rows], pa.string()),
                        pa.array([r[1] if r[1] is not None else blank for r in rows], pa.binary(nbytes)),
                        pa.array([r[2] for r in rows], pa.string()),
                    ],
                    schema=schema,
                )
            )
            bar.update(len(rows))
        bar.close()


def ensure_image_cache(
    paths: list[str],
    image_size: int,
    cache_root: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
    build: bool = True,
    poll_seconds: float = 2.0,
) -> ImageCache:
    """Open the cache of these images at this size, building it first when there is none.

    Args:
        paths: Absolute image paths (any order; duplicates are stored once).
        image_size: The side the images are resized to.
        cache_root: Folder holding the caches (``images/<size>px-<fingerprint>/``); default
            ``$EXPREG_CACHE`` or ``~/.cache/expreg``.
        num_workers: Decoding processes while building.
        progress: Show a progress bar while building.
        build: False: wait (polling every ``poll_seconds``) until another process has built it
            (the other processes of a distributed run, which must not sit in a collective
            barrier whose timeout a long build could exceed).

    Raises:
        ImageCacheError: Not enough free disk space, or the cache folder cannot be written.
    """
    paths = sorted(set(paths))
    folder = ImageCache.folder_for(paths, image_size, cache_root)
    if not build:
        return _wait_for(folder, poll_seconds)
    if (folder / INFO_FILE).is_file():
        logger.info(f"image cache: {folder} ({len(paths)} images, {image_size} px)")
        return ImageCache(folder)
    try:
        _build(folder, paths, image_size, num_workers, progress)
    except ImageCacheError:
        raise
    except OSError as err:
        raise ImageCacheError(
            f"cannot write the decoded-image cache in {folder.parent}: {err}. Set data.image_cache_dir to a "
            "writable folder with space, or data.image_cache=false"
        ) from err
    return ImageCache(folder)


def _wait_for(folder: Path, poll_seconds: float) -> ImageCache:
    """Open the cache another process is building, once it is complete (polling every ``poll_seconds``)."""
    while not (folder / INFO_FILE).is_file():
        time.sleep(poll_seconds)
    return ImageCache(folder)


def _build(folder: Path, paths: list[str], image_size: int, num_workers: int, progress: bool) -> None:
    """Build the cache in a staging folder of this process, then rename it to ``folder`` (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(folder.parent)
    needed = _check_free_space(folder.parent, len(paths), image_size)
    logger.info(f"building the decoded-image cache {folder} ({len(paths)} images, about {needed / 1e6:.0f} MB)")
    staging = folder.parent / f".{folder.name}.{_HOST}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write(staging, paths, image_size, num_workers, progress)
        info = {"format_version": FORMAT_VERSION, "image_size": image_size, "num_images": len(paths)}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(staging, folder)  # atomic: a cache folder is complete or absent
        except OSError:
            if not (folder / INFO_FILE).is_file():  # anything but "another process built it meanwhile"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_free_space(images_dir: Path, num_images: int, image_size: int) -> int:
    """The bytes the cache needs; ImageCacheError when ``images_dir``'s disk has not got them to spare."""
    needed = num_images * (3 * image_size * image_size + ROW_OVERHEAD_BYTES)
    free = shutil.disk_usage(images_dir).free
    if needed > MAX_DISK_FRACTION * free:
        raise ImageCacheError(
            f"the decoded-image cache needs about {needed / 1e9:.1f} GB in {images_dir}, which has "
            f"{free / 1e9:.1f} GB free: set data.image_cache_dir to a larger disk, or data.image_cache=false"
        )
    return needed


def _remove_abandoned_staging(images_dir: Path) -> None:
    """Delete half-built caches whose builder process is gone (killed during a build)."""
    for staging in images_dir.glob(f".*.{_HOST}.*.tmp"):  # this machine's only: pids are per machine
        pid = staging.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
