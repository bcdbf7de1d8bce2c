"""The dataset object: metadata + split file -> ``datasets.DatasetDict``, and train-only target statistics.

Two lines in a notebook::

    from expreg.data import load_expression_dataset
    ds = load_expression_dataset("data/example_metadata.csv", "splits/example.csv")

Rows carry ``image`` (decoded lazily by ``datasets.Image``), ``labels`` (float32, length K, in
expression units), ``group_id``, ``path`` and the CSV's extra columns. Nothing is downloaded and the dataset is
not cached between runs: each split is converted from the validated table to an Arrow file
in a temporary folder (``$TMPDIR/expreg-arrow-<host>-<pid>-*``, removed when the process exits, or by
the next run on the same machine if it was killed) and memory-mapped.

Owns ``load_expression_dataset`` and ``build_split_datasets`` (metadata -> split -> ``DatasetDict``),
``build_dataset_dict`` and its Arrow temporary folders, what a built dataset records
(``image_files``, ``dataset_gene_names``) and ``TargetStats``. Which row goes to which split is
decided in ``expreg.data.splits``; images are decoded and transformed in ``expreg.data.transforms``
and batched in ``expreg.data.loaders``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from expreg.data.arrow_files import new_path, space_error
from expreg.data.metadata import CONTEXT_COLUMN, Metadata, MetadataError, read_metadata
from expreg.data.splits import SPLIT_NAMES, RowSplit, split_rows

if TYPE_CHECKING:
    from datasets import DatasetDict

INFO_KEY = "expreg"


# ---------------------------------------------------------------------------------------------
# Dataset object
# ---------------------------------------------------------------------------------------------


def load_expression_dataset(
    metadata_csv: str | os.PathLike,
    split_csv: str | os.PathLike | None = None,
    *,
    gene_names_file: str | os.PathLike | None = None,
    num_genes: int | None = None,
    fold: int | None = None,
    seed: int = 42,
    val_frac: float = 0.2,
    check_images: str = "exists",
    patches: str | os.PathLike | None = None,
):
    """Load a metadata CSV (and a split file) as a ``datasets.DatasetDict``.

    Args:
        metadata_csv: The metadata CSV (see ``data/metadata_schema.md``).
        split_csv: A split file (``split`` column) or fold file (``fold`` column) made by
            ``expreg.splits``. When None, a group-aware train/validation split is made in memory
            from ``seed`` and ``val_frac``.
        gene_names_file: Gene names for ``y0..``; a ``genes.txt`` beside the CSV is used when None.
        num_genes: Expected K, checked against the CSV.
        fold: With a fold file: the fold held out as ``test``. The other folds' groups are split
            into ``train`` and ``validation`` (``val_frac``, ``seed``), so that model selection
            never looks at the test fold.
        seed: Seed of any split made here.
        val_frac: Validation fraction of any split made here.
        check_images: ``"exists"``, ``"decode"`` or ``"none"`` (see ``expreg.data.metadata``).
        patches: A patch store holding the images (``expreg.prepare --store shards``: ``<out_dir>/patches``).

    Returns:
        ``DatasetDict`` with ``train``, ``validation`` and, where present, ``test``.
    """
    metadata = read_metadata(metadata_csv, gene_names_file, num_genes, check_images, patches=patches)
    datasets_dict, _ = build_split_datasets(metadata, split_csv, fold=fold, seed=seed, val_frac=val_frac)
    return datasets_dict


def build_split_datasets(
    metadata: Metadata,
    split_csv: str | os.PathLike | None,
    *,
    fold: int | None = None,
    seed: int = 42,
    val_frac: float = 0.2,
) -> tuple[DatasetDict, RowSplit]:
    """Split a validated table (``split_rows``) and build its ``DatasetDict`` (``build_dataset_dict``).

    Arguments as ``load_expression_dataset``. Returns ``(DatasetDict, RowSplit)``; the ``RowSplit``
    carries the split table and its summary when the split was made here (``split_csv`` None).
    """
    row_split = split_rows(metadata, split_csv, fold=fold, seed=seed, val_frac=val_frac)
    return build_dataset_dict(metadata, row_split.names, split_csv=split_csv, fold=fold), row_split


ARROW_CHUNK_ROWS = 50_000  # rows converted to Arrow at a time (the conversion's temporaries stay this small)


def build_dataset_dict(metadata: Metadata, assignment: np.ndarray, split_csv=None, fold=None, context: bool = False):
    """Build the ``DatasetDict`` from a validated table and per-row split names.

    Each split is converted to Arrow in ``ARROW_CHUNK_ROWS``-row record batches (the targets go
    over as float32 arrays, not as one Python float per value), written to a temporary file and
    memory-mapped (``datasets.Dataset.from_file``), so DataLoader workers share its pages
    instead of copying the table. ``context``: a ``context`` column holds each row's context patch
    (absolute path, from the metadata's ``context_path``), for a multiscale model.
    """
    import datasets
    import pyarrow as pa

    features = _features(metadata, context)
    description = json.dumps(
        {
            INFO_KEY: {
                "gene_names": metadata.gene_names,
                "target_columns": metadata.target_columns,
                "metadata_csv": str(metadata.csv_path),
                "split_csv": None if split_csv is None else str(Path(split_csv).resolve()),
                "fold": fold,
            }
        }
    )
    schema = features.arrow_schema
    if context:
        require_context_paths(metadata)
    folder = new_path("build")
    parts = {}
    for name in SPLIT_NAMES:
        rows = np.flatnonzero(assignment == name)
        if len(rows) == 0:
            continue
        arrow_file = folder / f"{name}.arrow"
        try:
            folder.mkdir(exist_ok=True)
            with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for start in range(0, len(rows), ARROW_CHUNK_ROWS):
                    chunk = rows[start : start + ARROW_CHUNK_ROWS]
                    writer.write_batch(_record_batch(metadata, chunk, schema, context))
        except OSError as err:
            raise space_error(arrow_file, err, len(rows) * (metadata.num_genes * 4 + 200) / 1e6) from err
        info = datasets.DatasetInfo(description=description, features=features)
        parts[name] = datasets.Dataset.from_file(str(arrow_file), info=info, split=name, in_memory=False)
    if "train" not in parts:
        raise MetadataError(f"{split_csv or metadata.csv_path}: no rows assigned to train")
    return datasets.DatasetDict(parts)


def _features(metadata: Metadata, context: bool):
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "labels": datasets.List(datasets.Value("float32"), length=metadata.num_genes),
            "group_id": datasets.Value("string"),
            "path": datasets.Value("string"),
            **({"context": datasets.Value("string")} if context else {}),
            **{c: datasets.Value("string") for c in metadata.extra_columns},
        }
    )


def require_context_paths(metadata: Metadata) -> None:
    """A multiscale model's rows need their context patches: an error saying how to make them when there are none."""
    if CONTEXT_COLUMN not in metadata.frame.columns:
        raise MetadataError(
            f"{metadata.csv_path}: model.context=multiscale needs a context_path column (each spot's context patch): "
            "prepare the samples with python -m expreg.prepare --context_um <um>"
        )


def _text(column):
    """A text column of the metadata frame as an Arrow array (a view of the mapped CSV where it is one)."""
    import pandas as pd
    import pyarrow as pa

    return pa.array(column if isinstance(column.dtype, pd.StringDtype) else column.astype(str), pa.string())


def _record_batch(metadata: Metadata, rows: np.ndarray, schema, context: bool):
    """Metadata rows -> one Arrow record batch in the dataset's schema (``image`` as a path-only struct); the
    rows' paths and targets made here, a chunk at a time."""
    import pyarrow as pa

    frame = metadata.frame.iloc[rows]
    paths = pa.array(metadata.image_paths(rows), pa.string())
    image = pa.StructArray.from_arrays([pa.nulls(len(rows), pa.binary()), paths], names=["bytes", "path"])
    labels = pa.FixedSizeListArray.from_arrays(pa.array(metadata.targets(rows).reshape(-1)), metadata.num_genes)
    columns = {
        "image": image,
        "labels": labels,
        "group_id": _text(frame["group_id"]),
        "path": _text(frame["path"]),
        **({"context": pa.array(metadata.context_paths(rows), pa.string())} if context else {}),
        **{c: _text(frame[c]) for c in metadata.extra_columns},
    }
    return pa.record_batch([columns[field.name].cast(field.type) for field in schema], schema=schema)


def arrow_column(dataset, name: str):
    """A column of a split as an Arrow ``ChunkedArray``, in row order (its indices mapping applied), read
    from the memory-mapped table: no Python object per row (``dataset[name]`` makes one per value)."""
    return dataset.with_format("arrow")[:].column(name)


def labels_array(dataset, num_rows: int | None = None, dtype=np.float32) -> np.ndarray:
    """The ``labels`` of a split as a ``(rows, K)`` array (``num_rows``: the first rows only), filled chunk by
    chunk from the memory-mapped table (the array itself is the only copy).

    Measured at 320,000 rows x 50 genes: 57 s and ~0.5 GB through ``dataset["labels"]`` (a Python list of
    floats per row), a fraction of a second and the array itself from Arrow."""
    column = arrow_column(dataset, "labels")
    if num_rows is not None:
        column = column.slice(0, num_rows)
    width = column.type.list_size
    out = np.empty((len(column), width), dtype=dtype)
    start = 0
    for chunk in column.chunks:
        out[start : start + len(chunk)] = _flat_values(chunk).reshape(-1, width)
        start += len(chunk)
    return out


def _flat_values(chunk) -> np.ndarray:
    """A fixed-size-list chunk's values, in row order (a view of the mapped file where Arrow allows)."""
    return chunk.flatten().to_numpy(zero_copy_only=False)


def label_columns(dataset):
    """The ``labels`` of a split one gene at a time, as float64 arrays in row order (a ``(rows, K)`` copy never
    exists: each column is gathered from the memory-mapped table's chunks)."""
    column = arrow_column(dataset, "labels")
    width = column.type.list_size
    for j in range(width):
        parts = [_flat_values(chunk)[j::width] for chunk in column.chunks]
        yield np.concatenate(parts).astype(np.float64) if parts else np.empty(0)


def string_list(dataset, name: str, num_rows: int | None = None) -> list[str]:
    """A string column (``path``, ``group_id``) of a split's first ``num_rows`` rows as a list."""
    column = arrow_column(dataset, name)
    return (column if num_rows is None else column.slice(0, num_rows)).to_pylist()


def iter_strings(dataset, name: str, num_rows: int | None = None):
    """``string_list`` one Arrow chunk at a time (a cohort's 80,000 validation paths never all Python strings)."""
    column = arrow_column(dataset, name)
    for chunk in (column if num_rows is None else column.slice(0, num_rows)).chunks:
        yield from chunk.to_pylist()


def group_names(dataset) -> list[str]:
    """The distinct ``group_id`` values of a split, sorted (counted in Arrow)."""
    return sorted(arrow_column(dataset, "group_id").unique().to_pylist())


def library_sizes(dataset, num_rows: int | None = None) -> np.ndarray | None:
    """Each row's library size (total raw count), in row order, or None where the data set has no
    ``library_size`` column (an empty cell is NaN: the depth-adjusted scores then say n/a)."""
    if "library_size" not in dataset.column_names:
        return None
    cells = iter_strings(dataset, "library_size", num_rows)
    return np.fromiter(
        (float(v) if v is not None and v.strip() not in ("", "nan", "None") else np.nan for v in cells), float
    )


def image_files(dataset) -> list[str]:
    """The absolute image paths of a split's rows, in row order (nothing is decoded)."""
    import pyarrow.compute as pc

    return pc.struct_field(arrow_column(dataset, "image"), "path").to_pylist()


def context_files(dataset) -> list[str]:
    """The absolute paths of a split's context patches (``model.context=multiscale``), or ``[]``."""
    return string_list(dataset, "context") if "context" in dataset.column_names else []


def dataset_gene_names(dataset) -> list[str]:
    """Gene names recorded in a dataset (or ``DatasetDict``) made by ``load_expression_dataset``."""
    ds = next(iter(dataset.values())) if hasattr(dataset, "values") else dataset
    return json.loads(ds.info.description)[INFO_KEY]["gene_names"]


# ---------------------------------------------------------------------------------------------
# Target normalisation (train split only)
# ---------------------------------------------------------------------------------------------


@dataclass
class TargetStats:
    """Per-gene mean and standard deviation of the training targets (z-score normalisation).

    Genes with zero standard deviation in training get std 1 so that they pass through unscaled.
    Targets that were not measured (NaN, ``data.allow_unmeasured_genes``) are left out.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_labels(cls, labels) -> TargetStats:
        """Mean and std of each column of a ``(rows, K)`` array, in float64 one column at a time."""
        labels = np.asarray(labels)
        return cls.from_columns(np.asarray(labels[:, j], dtype=np.float64) for j in range(labels.shape[1]))

    @classmethod
    def from_columns(cls, columns) -> TargetStats:
        """Mean and std of each float64 column of an iterable, one held at a time."""
        mean, std = [], []
        for c in columns:
            missing = np.isnan(c).any()
            mean.append(np.nanmean(c) if missing else c.mean())
            std.append(np.nanstd(c) if missing else c.std())
        mean, std = np.array(mean, dtype=np.float64), np.array(std, dtype=np.float64)
        return cls(mean=mean, std=np.where(std > 0, std, 1.0))

    @classmethod
    def identity(cls, num_genes: int) -> TargetStats:
        return cls(mean=np.zeros(num_genes), std=np.ones(num_genes))

    def normalize(self, y):
        return (y - self.mean.astype(np.float32)) / self.std.astype(np.float32)

    def denormalize(self, z):
        return z * self.std.astype(np.float32) + self.mean.astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TargetStats:
        return cls(mean=np.asarray(d["mean"], dtype=np.float64), std=np.asarray(d["std"], dtype=np.float64))


def compute_target_stats(train_dataset, normalize: bool = True) -> TargetStats:
    """Target statistics from the **training** split only (identity when ``normalize`` is False)."""
    if not normalize:
        return TargetStats.identity(arrow_column(train_dataset, "labels").type.list_size)
    return TargetStats.from_columns(label_columns(train_dataset))  # float32 values, statistics in float64
