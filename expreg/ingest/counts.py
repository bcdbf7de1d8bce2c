"""Count matrices of Space Ranger / Cell Ranger: the 10x HDF5 (``filtered_feature_bc_matrix.h5``) and the MEX
folder (``barcodes.tsv.gz``, ``features.tsv.gz``, ``matrix.mtx.gz``) -> CSR spots x features with barcodes,
names, ids and feature types. Every unreadable or inconsistent input is an ``IngestError`` naming the file
and the item.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from expreg.ingest.errors import IngestError


def read_10x_h5(path: Path):
    """A 10x HDF5 (group ``matrix``: CSC features x barcodes) -> (CSR barcodes x features, barcodes, names, ids,
    feature types or None)."""
    item = "the file"
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise IngestError(
                    f"{path}: no group 'matrix' (not a Cell Ranger / Space Ranger >= 3 feature-barcode h5)"
                )
            group = f["matrix"]
            for item in ("data", "indices", "indptr", "shape", "barcodes", "features/id", "features/name"):
                if item not in group:
                    raise IngestError(f"{path}: no 'matrix/{item}'")
            item = "matrix/barcodes and features"
            barcodes = _decode(group["barcodes"][...])
            ids, names = _decode(group["features/id"][...]), _decode(group["features/name"][...])
            kinds = _decode(group["features/feature_type"][...]) if "features/feature_type" in group else None
            item = "matrix/data, indices, indptr"
            data, indices, indptr = (group[k][...] for k in ("data", "indices", "indptr"))
            shape = tuple(int(s) for s in group["shape"][...])
    except IngestError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise IngestError(f"{path}: unreadable 10x HDF5 ({item}): {first_line(err)}") from err
    if shape != (len(ids), len(barcodes)) or len(names) != len(ids):
        raise IngestError(
            f"{path}: matrix/shape {shape} disagrees with its {len(ids)} features and {len(barcodes)} barcodes"
        )
    if len(indptr) != shape[1] + 1 or len(indices) != len(data) or (len(data) and indptr[-1] != len(data)):
        raise IngestError(f"{path}: matrix/data, indices and indptr disagree with shape {shape} (truncated?)")
    try:
        counts = sp.csc_matrix((data, indices, indptr), shape=shape).T.tocsr()
    except ValueError as err:
        raise IngestError(f"{path}: matrix is not a valid CSC matrix: {first_line(err)}") from err
    return counts, barcodes, [str(n) for n in names], [str(i) for i in ids], kinds


def read_mex(folder: Path):
    """A MEX folder (barcodes.tsv[.gz], features.tsv[.gz] or genes.tsv, matrix.mtx[.gz]) -> like ``read_10x_h5``
    (feature types from the third column of features.tsv, when there is one)."""
    barcodes_file = _mex_file(folder, "barcodes.tsv")
    features_file = _mex_file(folder, "features.tsv", "genes.tsv")
    matrix_file = _mex_file(folder, "matrix.mtx")
    barcodes = _read_tsv(barcodes_file)[0].to_numpy(dtype=object)
    features = _read_tsv(features_file)
    ids = features[0].to_numpy(dtype=object)
    names = features[1].to_numpy(dtype=object) if features.shape[1] > 1 else ids
    kinds = features[2].to_numpy(dtype=object) if features.shape[1] > 2 else None
    try:
        with _open(matrix_file) as handle:
            matrix = sp.csr_matrix(scipy.io.mmread(handle))
    except (OSError, EOFError, ValueError, TypeError, IndexError) as err:
        raise IngestError(f"{matrix_file}: unreadable Matrix Market file: {first_line(err)}") from err
    if matrix.shape != (len(ids), len(barcodes)):
        raise IngestError(
            f"{matrix_file}: the matrix is {matrix.shape[0]} x {matrix.shape[1]}, but {features_file.name} lists "
            f"{len(ids)} features and {barcodes_file.name} {len(barcodes)} barcodes"
        )
    return matrix.T.tocsr(), barcodes, [str(n) for n in names], [str(i) for i in ids], kinds


def _mex_file(folder: Path, *names: str) -> Path:
    for name in names:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    raise IngestError(f"{folder}: Space Ranger MEX folder without {names[0]}.gz")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        with _open(path) as handle:
            table = pd.read_csv(handle, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as err:
        raise IngestError(f"{path}: unreadable TSV: {first_line(err)}") from err
    return table


def _decode(values: np.ndarray) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
