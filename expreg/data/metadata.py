"""Read and validate an expreg metadata CSV (``path``, ``group_id``, ``y0..y{K-1}``).

This module is the data contract. It never writes anything and imports neither torch nor
datasets, so the command-line tools that only need the table (splits) start fast.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from expreg.data.paths import RowPaths, duplicate_paths, normalised_paths, resolve_image_path, row_chunks
from expreg.data.prepared import prepared_folder_problem, prepared_hint

REQUIRED_COLUMNS = ("path", "group_id")
CONTEXT_COLUMN = "context_path"  # optional: each spot's context patch (expreg.prepare --context_um)
IMAGE_COLUMNS = ("path", CONTEXT_COLUMN)
# Names the dataset object uses for its own columns: an extra CSV column may not take them.
RESERVED_COLUMNS = ("image", "labels", "pixel_values", "context")
TARGET_PATTERN = re.compile(r"^y(\d+)$")
CHECK_IMAGES_MODES = ("none", "exists", "decode")
MAX_LISTED_ROWS = 5


class MetadataError(ValueError):
    """A metadata, gene-list or split file breaks the data contract.

    The message names the file, the CSV line numbers (the header is line 1) and the column.
    """


@dataclass
class Metadata:
    """A validated metadata table.

    Attributes:
        csv_path: Absolute path of the CSV the table was read from.
        frame: The table, one row per sample, in file order. ``path`` and ``group_id`` are
            strings, the target columns float64, extra columns kept as read (strings).
        target_columns: ``["y0", ..., "y{K-1}"]``.
        gene_names: One name per target column (from a gene list, else the column names).
    """

    csv_path: Path
    frame: pd.DataFrame
    target_columns: list[str]
    gene_names: list[str]

    @property
    def num_genes(self) -> int:
        return len(self.target_columns)

    @property
    def extra_columns(self) -> list[str]:
        known = set(REQUIRED_COLUMNS) | set(self.target_columns)
        return [c for c in self.frame.columns if c not in known]

    def targets(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Targets as a float32 array of shape ``(num_samples, num_genes)``, or of ``rows`` only (filled column by
        column: no float64 copy of the whole table on the way)."""
        frame = self.frame if rows is None else self.frame.iloc[rows]
        out = np.empty((len(frame), len(self.target_columns)), dtype=np.float32)
        for j, column in enumerate(self.target_columns):
            out[:, j] = frame[column].to_numpy(dtype=np.float64)
        return out

    def image_paths(self, rows: np.ndarray | None = None) -> list[str]:
        """Absolute, normalised image paths (relative ones resolved against the CSV's folder), of ``rows`` only
        when given (a cohort's callers go chunk by chunk: a Python string per row costs ~100 bytes)."""
        paths = self.frame["path"] if rows is None else self.frame["path"].iloc[rows]
        return normalised_paths(self.csv_path, paths)

    def path_rows(self, column: str = "path") -> RowPaths:
        """``image_paths`` (or a ``context_path`` column's) as a ``RowPaths`` sequence: each path made when read."""
        cells = self.frame[column]
        if column != "path":
            cells = (cells if isinstance(cells.dtype, pd.StringDtype) else cells.astype(str)).str.strip()
        return RowPaths(self.csv_path, cells)

    def context_paths(self, rows: np.ndarray | None = None) -> list[str] | None:
        """The context patches' paths as ``image_paths`` gives the patches', or None without a ``context_path``."""
        if CONTEXT_COLUMN not in self.frame.columns:
            return None
        column = self.frame[CONTEXT_COLUMN] if rows is None else self.frame[CONTEXT_COLUMN].iloc[rows]
        return normalised_paths(self.csv_path, column.astype(str).str.strip())


def describe_rows(line_numbers: list[int] | np.ndarray) -> str:
    """``"line 3, 7, 9 (and 12 more; 15 rows in all)"`` for error messages."""
    lines = [int(x) for x in line_numbers]
    shown = ", ".join(str(x) for x in lines[:MAX_LISTED_ROWS])
    word = "line" if len(lines) == 1 else "lines"
    if len(lines) <= MAX_LISTED_ROWS:
        return f"{word} {shown}"
    return f"{word} {shown} (and {len(lines) - MAX_LISTED_ROWS} more; {len(lines)} rows in all)"


def _fail(csv_path: Path, column: str, line_numbers, problem: str) -> MetadataError:
    return MetadataError(f"{csv_path}: column '{column}', {describe_rows(line_numbers)}: {problem}")


def _read_table(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise MetadataError(f"{csv_path}: metadata CSV not found")
    if csv_path.stat().st_size == 0:
        raise MetadataError(f"{csv_path}: the file is empty (expected a header with path, group_id, y0..)")
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), [])
    except UnicodeDecodeError as err:
        raise MetadataError(
            f"{csv_path}: not valid UTF-8 (byte {err.start}); save the CSV as UTF-8 and try again"
        ) from err
    names = [c.strip() for c in header]
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise MetadataError(f"{csv_path}: duplicate column name(s) in the header: {', '.join(duplicates)}")
    frame = _read_with_arrow(csv_path, header)
    if frame is None:
        frame = _read_with_pandas(csv_path)
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame.columns) == 1 and ";" in frame.columns[0]:
        raise MetadataError(
            f"{csv_path}: the header has one column containing ';': the file looks semicolon-separated; "
            "expreg reads comma-separated CSV"
        )
    if frame.empty:
        raise MetadataError(f"{csv_path}: the CSV has a header but no data rows")
    return frame


def _read_with_arrow(csv_path: Path, header: list[str]) -> pd.DataFrame | None:
    """Read by Arrow into a memory-mapped file (``expreg.data.arrow_files``): the target columns as numbers
    when every cell is a finite number (else every cell as text, for ``_check_targets`` to name the bad
    ones), the other columns as text. The frame's columns are views of the mapped table (pandas' Arrow-backed
    ``str``, which pandas 3 makes the default, and ``double[pyarrow]``): no Python object per cell and no
    anonymous memory per row. None when Arrow cannot read the file (ragged rows, bad UTF-8):
    ``_read_with_pandas`` then reads it or names the problem.

    Measured (``benchmarks/bench_cohort.py --parts rss``): pandas' ``dtype=str`` made a Python string of
    every cell, 1.65 GB for 400,000 rows x 52 columns."""
    import pyarrow as pa
    from pandas.core.arrays.string_arrow import ArrowStringArrayNumpySemantics

    table = _arrow_csv(csv_path, header, numbers=True)
    if table is not None and not all(_finite(table.column(n)) for n in header if TARGET_PATTERN.match(n.strip())):
        table = None
    if table is None:
        table = _arrow_csv(csv_path, header, numbers=False)
    if table is None or table.column_names != header or any(not name.strip() for name in header):
        return None  # pandas names an empty header cell "Unnamed: N", as before
    columns = {}
    for name in header:
        column = table.column(name)
        if pa.types.is_floating(column.type):
            columns[name] = pd.Series(pd.arrays.ArrowExtensionArray(column), copy=False)
        else:
            columns[name] = pd.Series(ArrowStringArrayNumpySemantics(column), copy=False)
    return pd.DataFrame(columns, copy=False)


def _arrow_csv(csv_path: Path, header: list[str], numbers: bool):
    """The CSV as a memory-mapped Arrow table of text cells (``numbers``: target columns as float64), or None
    when Arrow cannot read it that way."""
    import pyarrow as pa

    from expreg.data.arrow_files import read_csv_mapped

    types = {name: pa.float64() if numbers and TARGET_PATTERN.match(name.strip()) else pa.string() for name in header}
    return read_csv_mapped(csv_path, types)


def _finite(column) -> bool:
    import pyarrow.compute as pc

    return column.null_count == 0 and bool(pc.all(pc.is_finite(column)).as_py() is not False)


def _read_with_pandas(csv_path: Path) -> pd.DataFrame:
    """Everything as text first: numbers are checked column by column, so that a bad cell is reported with
    its line instead of silently becoming NaN or an object column."""
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise MetadataError(
            f"{csv_path}: not valid UTF-8 (byte {err.start}); save the CSV as UTF-8 and try again"
        ) from err
    except pd.errors.ParserError as err:
        raise MetadataError(f"{csv_path}: could not parse as CSV: {err}") from err


def _target_columns(csv_path: Path, columns: list[str], num_genes: int | None) -> list[str]:
    odd = [c for c in columns if (m := TARGET_PATTERN.match(c)) and c != f"y{int(m.group(1))}"]
    if odd:
        raise MetadataError(
            f"{csv_path}: target column(s) {', '.join(odd)}: write target columns as y0, y1, ... without leading zeros"
        )
    indices = sorted(int(m.group(1)) for c in columns if (m := TARGET_PATTERN.match(c)))
    if not indices:
        raise MetadataError(
            f"{csv_path}: no target columns: expected y0, y1, ..., y{{K-1}} in the header{prepared_hint(csv_path)}"
        )
    expected = list(range(len(indices)))
    if indices != expected:
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise MetadataError(
            f"{csv_path}: inconsistent target columns: found {len(indices)} y-columns up to y{max(indices)}, "
            f"but {', '.join(f'y{i}' for i in missing[:10])} missing; targets must be y0..y{{K-1}} without gaps"
        )
    if num_genes is not None and len(indices) != num_genes:
        raise MetadataError(
            f"{csv_path}: wrong number of targets: the CSV has K={len(indices)} (y0..y{len(indices) - 1}) "
            f"but {num_genes} were expected"
        )
    return [f"y{i}" for i in expected]


def _parse_numbers(column: pd.Series) -> np.ndarray | None:
    """Fast path: the whole column parsed by Arrow (~50x faster than ``pd.to_numeric`` on text), or
    None when some cell is not a plain number (the slow path then finds and reports it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        values = pc.cast(pc.utf8_trim_whitespace(pa.array(column, pa.string())), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    if values.null_count:
        return None
    return values.to_numpy() if isinstance(values, pa.ChunkedArray) else values.to_numpy(zero_copy_only=False)


def _check_targets(csv_path: Path, frame: pd.DataFrame, target_columns: list[str]) -> None:
    for col in target_columns:
        if pd.api.types.is_float_dtype(frame[col]) and np.isfinite(frame[col].to_numpy()).all():
            continue  # read as numbers by Arrow (``_read_with_arrow``)
        values = _parse_numbers(frame[col])
        if values is not None and np.isfinite(values).all():
            frame[col] = values
            continue
        text = frame[col].str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad_text = np.isnan(values) & ~text.str.lower().isin(["nan", "-nan", "+nan"]).to_numpy()
        if bad_text.any():
            rows = np.flatnonzero(bad_text)
            examples = ", ".join(repr(v) for v in text.iloc[rows[:3]])
            raise _fail(csv_path, col, rows + 2, f"not a number (values {examples})")
        nonfinite = ~np.isfinite(values)
        if nonfinite.any():
            rows = np.flatnonzero(nonfinite)
            raise _fail(csv_path, col, rows + 2, "NaN or infinite target; targets must be finite numbers")
        frame[col] = values


LIBRARY_SIZE = "library_size"  # optional: each spot's total raw count (the depth-adjusted scores need it)


def library_size_values(frame: pd.DataFrame) -> np.ndarray | None:
    """``library_size`` as float64 (NaN where empty), parsed by Arrow (no Python object per cell); None without
    the column or when a cell is not a number (``_check_library_size`` names it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if LIBRARY_SIZE not in frame.columns:
        return None
    try:
        text = pc.utf8_trim_whitespace(pa.array(frame[LIBRARY_SIZE], pa.string()))
        cells = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        values = pc.fill_null(pc.cast(cells, pa.float64()), float("nan"))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return values.to_numpy() if isinstance(values, pa.ChunkedArray) else values.to_numpy(zero_copy_only=False)


def _check_library_size(csv_path: Path, frame: pd.DataFrame) -> None:
    """An optional ``library_size`` column: non-negative numbers, or empty where unknown (scores then say n/a)."""
    if LIBRARY_SIZE not in frame.columns:
        return
    fast = library_size_values(frame)
    if fast is not None and not (np.isinf(fast).any() or (fast < 0).any()):
        return  # the slow path below finds and names a bad cell
    text = frame[LIBRARY_SIZE].astype(str).str.strip()
    values = pd.to_numeric(text.replace("", "nan"), errors="coerce").to_numpy(dtype=np.float64)
    bad = (np.isnan(values) & (text != "").to_numpy() & ~text.str.lower().isin(["nan"]).to_numpy()) | (values < 0)
    bad |= np.isinf(values)
    if bad.any():
        rows = np.flatnonzero(bad)
        examples = ", ".join(repr(v) for v in text.iloc[rows[:3]])
        raise _fail(
            csv_path,
            LIBRARY_SIZE,
            rows + 2,
            f"not a non-negative number (values {examples}); leave a cell empty where unknown",
        )


def _check_paths_and_groups(csv_path: Path, frame: pd.DataFrame, required=REQUIRED_COLUMNS) -> None:
    for col in required:
        frame[col] = _stripped(frame[col])
        empty = (frame[col] == "").to_numpy(dtype=bool)
        if empty.any():
            raise _fail(csv_path, col, np.flatnonzero(empty) + 2, f"empty {col}")
    found = duplicate_paths(csv_path, frame["path"])
    if found is None:
        return
    rows, same = found
    texts = " and ".join(repr(frame["path"].iloc[i]) for i in same[:2])
    groups = ""
    if "group_id" in frame.columns:
        groups = " (groups " + " and ".join(repr(frame["group_id"].iloc[i]) for i in same[:2]) + ")"
    key = normalised_paths(csv_path, frame["path"].iloc[same[:1]])[0]
    raise _fail(
        csv_path,
        "path",
        rows + 2,
        f"duplicate image: lines {same[0] + 2} and {same[1] + 2} name the same file {key!r} as {texts}{groups}; "
        "each image once",
    )


def _stripped(column: pd.Series) -> pd.Series:
    """``column`` without spaces around its cells (copied only when some cell has them)."""
    if getattr(column.dtype, "storage", None) != "pyarrow":
        return column.str.strip()
    import pyarrow.compute as pc

    spaced = pc.match_substring_regex(column.array.__arrow_array__(), r"^\s|\s$")
    return column.str.strip() if pc.any(spaced).as_py() else column


def check_image_files(csv_path: Path, frame: pd.DataFrame, mode: str = "exists", patches=None) -> None:
    """Check that the images exist (``"exists"``) or also decode (``"decode"``), as files or in the patch
    store ``patches`` (registered here: ``expreg.data.patch_store``)."""
    if mode not in CHECK_IMAGES_MODES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES_MODES}, got {mode!r}")
    store = _use_patches(csv_path, patches)
    if mode == "none":
        return
    for column in [c for c in IMAGE_COLUMNS if c in frame.columns]:
        _check_column_images(csv_path, frame, column, mode, store)


def _check_column_images(csv_path: Path, frame: pd.DataFrame, column: str, mode: str, store) -> None:
    from expreg.data.patch_store import image_exists, store_beside
    from expreg.data.transforms import load_image
    from expreg.progress import progress_bar

    text = frame[column] if isinstance(frame[column].dtype, pd.StringDtype) else frame[column].astype(str)
    empty = (_stripped(text) == "").to_numpy(dtype=bool)
    if empty.any():
        raise _fail(csv_path, column, np.flatnonzero(empty) + 2, f"empty {column}")
    missing, example = [], None
    for rows in row_chunks(len(frame)):
        paths = [resolve_image_path(csv_path, p) for p in frame[column].iloc[rows.start : rows.stop]]
        found = [rows.start + i for i, p in enumerate(paths) if not image_exists(p)]
        example = example or (paths[found[0] - rows.start] if found else None)
        missing += found
    if missing:
        beside = store_beside(csv_path)
        hint = f"; its patches are in the Parquet store {beside}: set data.patches={beside}" if beside else ""
        if store is not None:
            hint = f", nor in the patch store {store.folder} (it holds e.g. {store.example()})"
        raise _fail(csv_path, column, np.asarray(missing) + 2, f"image file not found (e.g. {example}){hint}")
    if mode == "decode":
        bad, reasons = [], []
        paths = (resolve_image_path(csv_path, p) for p in frame[column])
        bar = progress_bar(
            paths, enabled=len(frame) >= 200, desc=f"checking images ({column})", unit="img", total=len(frame)
        )
        for i, p in enumerate(bar):
            image, reason = load_image(p)
            if image is None:
                bad.append(i)
                reasons.append(f"{p}: {reason}")
        if bad:
            raise _fail(csv_path, column, np.asarray(bad) + 2, f"unreadable image ({reasons[0]})")


def read_gene_names(path: str | os.PathLike, num_genes: int) -> list[str]:
    """Read one gene name per line (blank lines ignored) and check there are ``num_genes``."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: gene names file not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) != num_genes:
        raise MetadataError(
            f"{path}: {len(names)} gene names for K={num_genes} target columns; one name per line, in y-column order"
        )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise MetadataError(f"{path}: gene name {name!r} appears twice (entries {seen[name] + 1} and {i + 1})")
        seen[name] = i
    return names


def _use_patches(csv_path: Path, patches):
    """Register the patch store that holds the CSV's images; returns it (None without one)."""
    if patches is None:
        return None
    from expreg.data.patch_store import PatchStoreError, use_store

    try:
        return use_store(patches)
    except PatchStoreError as err:
        raise MetadataError(f"{csv_path}: {err}") from err


def read_metadata(
    metadata_csv: str | os.PathLike,
    gene_names_file: str | os.PathLike | None = None,
    num_genes: int | None = None,
    check_images: str = "exists",
    for_prediction: bool = False,
    targets_required: bool = True,
    patches: str | os.PathLike | None = None,
) -> Metadata:
    """Read and validate a metadata CSV.

    Args:
        metadata_csv: The CSV (comma-separated, UTF-8, an optional BOM is accepted).
        gene_names_file: One gene name per line for ``y0..``; when None, a ``genes.txt`` beside
            the CSV is used if present, else the names are ``y0, y1, ...``.
        num_genes: Expected K; a CSV with another number of target columns is an error.
        check_images: ``"exists"`` (default, cheap), ``"decode"`` (open every image) or ``"none"``.
        for_prediction: Only ``path`` is required; ``group_id`` and targets are optional (when
            targets are present they are checked as usual). Used by ``expreg.predict``.
        targets_required: False: a CSV without ``y`` columns is accepted (its targets come from an
            expression file, ``data.expression_file``).
        patches: A patch store holding the images (``data.patches``, ``expreg.data.patch_store``).

    Returns:
        The validated table.

    Raises:
        MetadataError: On any contract violation, naming file, lines and column.
    """
    csv_path = Path(metadata_csv).resolve()
    frame = _read_table(csv_path)
    required = ("path",) if for_prediction else REQUIRED_COLUMNS
    reserved = [c for c in frame.columns if c in RESERVED_COLUMNS]
    if reserved:
        raise MetadataError(
            f"{csv_path}: column(s) {', '.join(reserved)}: reserved names in expreg's dataset rows; rename them"
        )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MetadataError(
            f"{csv_path}: missing required column(s) {', '.join(missing)}; the header has: "
            f"{', '.join(list(frame.columns)[:12])}{' ...' if len(frame.columns) > 12 else ''}"
        )
    if (for_prediction or not targets_required) and not any(TARGET_PATTERN.match(c) for c in frame.columns):
        target_columns = []
    else:
        target_columns = _target_columns(csv_path, list(frame.columns), num_genes)
    if "group_id" not in frame.columns:
        frame["group_id"] = ""
    _check_paths_and_groups(csv_path, frame, required)
    _check_targets(csv_path, frame, target_columns)
    _check_library_size(csv_path, frame)
    check_image_files(csv_path, frame, check_images, patches)
    if gene_names_file is None and (csv_path.parent / "genes.txt").is_file():
        gene_names_file = csv_path.parent / "genes.txt"
    if gene_names_file is not None and target_columns:
        gene_names = read_gene_names(gene_names_file, len(target_columns))
    else:
        gene_names = list(target_columns)
    return Metadata(csv_path=csv_path, frame=frame, target_columns=target_columns, gene_names=gene_names)


def read_recipe_metadata(data) -> Metadata:
    """``read_metadata`` as a recipe's ``data`` section (``expreg.config.DataConfig``) asks: its CSV, gene
    names, K, image check and patch store; target columns optional when the targets come from counts."""
    if (problem := prepared_folder_problem(data.prepared)) is not None:
        raise MetadataError(problem)
    return read_metadata(
        data.metadata_csv,
        data.gene_names_file,
        data.num_genes,
        data.check_images,
        targets_required=not data.expression_file,
        patches=data.patches,
    )
