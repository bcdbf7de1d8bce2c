"""The image paths of a metadata table: resolved against the CSV's folder, normalised, compared.

Cohort-sized tables are handled ``CHUNK_ROWS`` rows at a time, so that a Python string per row (~100
bytes) exists only for one chunk; duplicates are found by hashing (8 bytes a row).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK_ROWS = 50_000  # rows turned into Python strings at a time by the checks (their memory stays this small)


def row_chunks(num_rows: int, size: int | None = None):
    """``range`` objects of at most ``size`` (default ``CHUNK_ROWS``) consecutive row indices covering ``num_rows`` rows."""
    size = size or CHUNK_ROWS
    return (range(start, min(start + size, num_rows)) for start in range(0, num_rows, size))


def is_plain_relative(path: str) -> bool:
    """True when joining ``path`` onto a folder needs no normalisation (no ``.``/``..`` parts, no ``//``)."""
    return not ("/." in "/" + path or "//" in path or path.endswith("/") or (os.altsep and os.altsep in path))


def resolve_image_path(csv_path: str | os.PathLike, path: str) -> str:
    """Resolve an image path from the CSV: relative paths are relative to the CSV's folder."""
    if os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(csv_path)), path))


def key_hash(key: str) -> int:
    """The index's hash of a key (this process's string hash: each process builds its own index)."""
    return hash(key)


def hash_index(keys, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted hashes, rows in that order)`` of ``count`` strings: a lookup index of 16 bytes a row instead of a
    dict of the strings (this process's string hash: each process builds its own). Used by the patch store and
    the embedding store (``find_row``)."""
    hashes = np.fromiter((key_hash(k) for k in keys), dtype=np.int64, count=count)
    order = np.argsort(hashes, kind="stable")
    return hashes[order], order


def find_row(index: tuple[np.ndarray, np.ndarray], key: str, key_of_row) -> int | None:
    """The row of ``key`` in a ``hash_index`` (``key_of_row(row)`` tells rows whose hashes meet apart), or None."""
    hashes, order = index
    h = key_hash(key)
    i = int(np.searchsorted(hashes, h))
    while i < len(hashes) and hashes[i] == h:
        if key_of_row(int(order[i])) == key:
            return int(order[i])
        i += 1
    return None


def duplicate_paths(csv_path: Path, paths: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """``(every row naming an image named twice, the rows naming the first such image)`` (as
    ``normalised_paths`` compares paths), or None.

    Each normalised path is hashed chunk by chunk (8 bytes a row, not a Python string per row); rows
    whose hashes meet are then compared as paths."""
    hashes = np.empty(len(paths), dtype=np.int64)
    for rows in row_chunks(len(paths)):
        hashes[rows.start : rows.stop] = [
            hash(p) for p in normalised_paths(csv_path, paths.iloc[rows.start : rows.stop])
        ]
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    met = np.flatnonzero(ordered[1:] == ordered[:-1])
    candidates = np.unique(np.concatenate([order[met], order[met + 1]]))
    if len(candidates) == 0:
        return None
    keys = pd.Series(normalised_paths(csv_path, paths.iloc[candidates]), index=candidates)
    twice = keys[keys.duplicated(keep=False)]
    if twice.empty:
        return None
    first = twice.index.min()
    return np.sort(twice.index.to_numpy()), np.sort(twice.index[twice == keys[first]].to_numpy())


def normalised_paths(csv_path: Path, paths: pd.Series) -> list[str]:
    """Each path as an absolute, normalised path (``./a.png``, ``a//b.png``, ``x/../a.png`` compare equal).

    Only paths that need it go through ``normpath`` (measured: the plain join is what keeps a
    1M-row CSV fast)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "")  # ends with one separator
    plain = is_plain_relative  # no "." / ".." parts, no "//": joining needs no normalisation
    return [
        (p if plain(p[1:]) else os.path.normpath(p))
        if os.path.isabs(p)
        else (folder + p if plain(p) else os.path.normpath(folder + p))
        for p in paths
    ]


class RowPaths:
    """The normalised absolute paths of a metadata column's rows, made when read (``normalised_paths``): a
    sequence of ``len`` rows that holds no Python string per row. ``paths[i]`` is one path; ``paths[mask]`` or
    ``paths[rows]`` the sequence of those rows; iterating goes ``CHUNK_ROWS`` rows at a time.

    ``expreg.cv`` keeps one for a whole cohort through every fold (400,000 paths as Python strings: ~50 MB)."""

    def __init__(self, csv_path: Path, column: pd.Series) -> None:
        self.csv_path, self.column = csv_path, column.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return normalised_paths(self.csv_path, self.column.iloc[int(index) : int(index) + 1 or None])[0]
        index = np.asarray(index)
        rows = np.flatnonzero(index) if index.dtype == bool else index
        return RowPaths(self.csv_path, self.column.iloc[rows])

    def __iter__(self):
        for rows in row_chunks(len(self)):
            yield from normalised_paths(self.csv_path, self.column.iloc[rows.start : rows.stop])
