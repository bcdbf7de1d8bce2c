"""Patches inside Parquet shards: ``expreg.prepare --store shards`` writes them, training reads them.

A store is a folder of ``data-NNNNN-of-MMMMM.parquet`` files (a few hundred MB each). Each row is one
patch: ``image`` (the encoded PNG or JPEG bytes and the patch's ``path``: HuggingFace's ``Image``
feature) with every column of ``metadata.csv`` beside it, rows in ``metadata.csv`` order. In a
notebook::

    from datasets import load_dataset
    ds = load_dataset("parquet", data_files="data/cohort/patches/*.parquet", split="train")
    ds[0]["image"]  # a PIL image

and ``ds.push_to_hub(...)`` publishes it as a dataset.

Training never unpacks it. The recipe key ``data.patches`` (``expreg.predict --patches``) names the
store and ``use_store`` registers it. A stored ``path`` is relative to the store's parent folder
(``expreg.prepare``'s output, where ``metadata.csv`` is), so it stands for the absolute path a
metadata CSV anywhere resolves to, and ``expreg.data.transforms.load_image`` reads any such path from
the store instead of the file system: the splits, the image cache, the embedding store and every
prediction file see the same paths as with image files. The registered stores are also named in the
environment (``EXPREG_PATCH_STORES``), so DataLoader workers started by ``spawn`` or ``forkserver``
open them too. For random access the shards are converted once to Arrow by ``datasets`` (in its
cache, ``HF_DATASETS_CACHE``, as ``load_dataset`` does: a second run converts nothing; the copy is as
large as the store) and memory-mapped, so DataLoader workers share the pages.

Owns the store's layout (``ShardWriter``, ``shard_schema``) and its reading (``PatchStore``,
``use_store``, ``read_bytes``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from expreg.data.paths import find_row, hash_index

SHARD_BYTES = 256 * 2**20  # a shard is closed once its images pass this size
ROW_GROUP_ROWS = 100  # rows per Parquet row group (as datasets' push_to_hub writes image data)
SHARD_GLOB = "data-*.parquet"
_SHARD_NAME = re.compile(r"data-(\d{5})-of-(\d{5})\.parquet")
ENV = "EXPREG_PATCH_STORES"  # the registered stores, for worker processes that start afresh


class PatchStoreError(ValueError):
    """A patch store that cannot be read, or a path it does not hold."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def shard_schema(columns):
    """The shards' Arrow schema: ``image`` as ``datasets.Image`` then the metadata's columns.

    ``columns`` is a ``pyarrow.Schema`` of the metadata columns; the schema carries datasets'
    feature metadata, so ``load_dataset("parquet")`` decodes ``image`` as a picture.
    """
    import datasets
    import pyarrow as pa

    features = datasets.Features.from_arrow_schema(pa.schema(list(columns)))
    return datasets.Features({"image": datasets.Image(), **features}).arrow_schema


class ShardWriter:
    """Rows (a metadata table slice + the images' bytes) in, ``data-*.parquet`` shards out, in order."""

    def __init__(self, folder: Path, schema, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.schema, self.shard_bytes = Path(folder), schema, shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[Path] = []
        self._writer = None
        self._size = 0

    def write(self, table, images) -> None:
        """Append ``table``'s rows (metadata columns) with their encoded images (a binary Arrow array, same order)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        paths = table.column("path").cast(pa.string()).combine_chunks()
        image = pa.StructArray.from_arrays([images, paths], names=["bytes", "path"])
        rows = pa.Table.from_arrays([image, *table.columns], names=["image", *table.column_names]).cast(self.schema)
        for start in range(0, rows.num_rows, ROW_GROUP_ROWS):
            if self._writer is None:
                self._open()
            self._writer.write_table(rows.slice(start, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
            self._size += pc.sum(pc.binary_length(images.slice(start, ROW_GROUP_ROWS))).as_py()
            if self._size >= self.shard_bytes:
                self._close()

    def _open(self) -> None:
        import pyarrow.parquet as pq

        self.parts.append(self.folder / f".part-{len(self.parts):05d}.parquet")
        self._writer = pq.ParquetWriter(str(self.parts[-1]), self.schema)
        self._size = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> list[Path]:
        """Close the last shard and give every shard its final name ``data-NNNNN-of-MMMMM.parquet``."""
        self._close()
        total = len(self.parts)
        final = [self.folder / f"data-{i:05d}-of-{total:05d}.parquet" for i in range(total)]
        for part, name in zip(self.parts, final):
            part.rename(name)
        return final


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def shard_files(folder) -> list[Path]:
    """The store's shards, in order; an error naming the folder when it holds none or an incomplete set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PatchStoreError(
            f"data.patches {folder}: no such folder (a patch store written by expreg.prepare --store shards)"
        )
    files = sorted(folder.glob(SHARD_GLOB))
    if not files:
        raise PatchStoreError(f"data.patches {folder}: no {SHARD_GLOB} shards in it (expreg.prepare --store shards)")
    names = [_SHARD_NAME.fullmatch(f.name) for f in files]
    total = {int(m.group(2)) for m in names if m}
    if len(total) != 1 or sorted(int(m.group(1)) for m in names if m) != list(range(next(iter(total)))):
        raise PatchStoreError(
            f"data.patches {folder}: an incomplete set of shards ({', '.join(f.name for f in files[:4])}"
            f"{' ...' if len(files) > 4 else ''}); expected data-00000-of-NNNNN.parquet up to NNNNN - 1: copy the "
            "whole folder"
        )
    return files


def signature(files: list[Path]) -> str:
    """A short digest of the shards' names, sizes and modification times (a rewritten store differs)."""
    text = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class PatchStore:
    """Random access to a store's images by absolute path (Arrow, memory-mapped; see the module docstring).

    Args:
        folder: The store (a folder of ``data-*.parquet`` shards); its paths are relative to its parent.
    """

    def __init__(self, folder) -> None:
        self.folder = _absolute(folder)
        files = shard_files(self.folder)
        self.signature = signature(files)  # what the image cache's fingerprint records for a stored image
        table = _arrow_table(self.folder, files)
        self._root = str(self.folder.parent)
        self._paths = table.column("path")
        self._hashes, self._rows = self._hash_index()
        images = table.column("image")
        self._chunks = [chunk.field("bytes") for chunk in images.chunks]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    def _key(self, row: int) -> str:
        return os.path.normpath(os.path.join(self._root, self._paths[row].as_py()))

    def _hash_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's absolute path hashed, sorted, with the rows in that order: 16 bytes a row instead of a
        dict of path strings (~200 bytes a row, in every process that opens the store)."""
        keys = (os.path.normpath(os.path.join(self._root, p)) for p in self._paths.to_pylist())
        hashes, rows = hash_index(keys, len(self._paths))
        starts = np.flatnonzero(np.diff(hashes, prepend=hashes[:1] - 1, append=hashes[-1:] + 1) != 0)
        for start, end in zip(starts[:-1], starts[1:]):
            if end - start > 1:  # the same hash: the same path, or a rare collision
                keys = [self._key(int(r)) for r in rows[start:end]]
                twice = next((int(r) for r, k in zip(rows[start:end], keys) if keys.count(k) > 1), None)
                if twice is not None:
                    path = self._paths[twice].as_py()
                    raise PatchStoreError(f"data.patches {self.folder}: the path {path!r} appears twice")
        return hashes, rows

    def row(self, path: str) -> int | None:
        """The store's row holding the image at ``path`` (absolute, normalised), or None."""
        return find_row((self._hashes, self._rows), path, self._key)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path: str) -> bool:
        return self.row(path) is not None

    def example(self) -> str:
        """One path the store holds (for error messages)."""
        return self._key(0) if len(self) else "(none)"

    def read(self, path: str) -> bytes:
        """The encoded image stored for ``path`` (an absolute path, as the metadata resolves it)."""
        row = self.row(path)
        if row is None:
            raise KeyError(path)
        return self.read_row(row)

    def read_row(self, row: int) -> bytes:
        """The encoded image of the store's row ``row``."""
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._chunks[chunk][row - self._starts[chunk]].as_py()


def _absolute(folder) -> Path:
    """The store folder with its parent's symbolic links resolved (as metadata CSV paths are), not its own."""
    folder = Path(folder).absolute()
    return folder.parent.resolve() / folder.name


def _arrow_table(folder: Path, files: list[Path]):
    """The shards' ``path`` and ``image`` columns as one memory-mapped Arrow table (converted once)."""
    import datasets
    from datasets.utils import logging as ds_logging

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" is not our user's business
    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity_error()
    try:
        ds = datasets.Dataset.from_parquet([str(f) for f in files], columns=["path", "image"])
    except Exception as err:  # noqa: BLE001 - a broken shard, a full disk under datasets' cache, ...
        raise PatchStoreError(
            f"data.patches {folder}: cannot read the shards into datasets' cache "
            f"({os.environ.get('HF_DATASETS_CACHE', '~/.cache/huggingface/datasets')}): {type(err).__name__}: {err}"
        ) from err
    finally:
        ds_logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()
    return ds.data.table


_STORES: dict[Path, PatchStore] = {}


def use_store(folder) -> PatchStore:
    """Register the store at ``folder``: ``read_bytes`` serves its images from now on (in this process, and
    in worker processes it starts). A store rewritten since it was registered is opened again."""
    folder = _absolute(folder)
    store = _STORES.get(folder)
    if store is None or store.signature != signature(shard_files(folder)):
        _STORES[folder] = store = PatchStore(folder)
        os.environ[ENV] = json.dumps(sorted(str(f) for f in _STORES))
    return store


def _stores():
    """The registered stores (a fresh worker process opens those its parent registered)."""
    if not _STORES and os.environ.get(ENV):
        for folder in json.loads(os.environ[ENV]):
            use_store(folder)
    return _STORES.values()


def _holder(path: str) -> PatchStore | None:
    for store in _stores():
        if path in store:
            return store
    return None


def read_bytes(path: str) -> bytes | None:
    """The encoded image a registered store holds for ``path``, or None (then it is a file)."""
    for store in _stores():
        row = store.row(path)
        if row is not None:
            return store.read_row(row)
    return None


def stamp(path: str) -> str | None:
    """What identifies a stored image's bytes (its store's shards and its row), or None for a file."""
    store = _holder(path)
    return None if store is None else f"{store.signature}:{store.row(path)}"


def image_exists(path: str) -> bool:
    """``path`` is an image file or a registered store holds it."""
    return _holder(path) is not None or os.path.isfile(path)


def store_beside(csv_path) -> Path | None:
    """A store written by ``expreg.prepare --store shards`` beside a metadata CSV (for error messages)."""
    folder = Path(csv_path).resolve().parent / "patches"
    return folder if folder.is_dir() and any(folder.glob(SHARD_GLOB)) else None
