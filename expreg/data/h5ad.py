"""AnnData ``.h5ad`` files read and written with ``h5py`` alone (``anndata`` needs pandas < 3).

Owns ``read_h5ad`` (X, obs, var names, obsm and uns of any AnnData file: the current encoded
layout, dense or CSR/CSC ``X``, plus the pre-0.7 compound-dataset ``obs``/``var``; every array of
``uns`` is read whatever its size, and an item of an encoding this reader does not know is named in
``H5ad.skipped`` and logged as a warning, never dropped without a word) and ``write_h5ad``, which writes the layout and the
``encoding-type``/``encoding-version`` attributes exactly as anndata 0.10-0.12 does, so that
``anndata.read_h5ad`` and scanpy read the file: ``X`` a ``csr_matrix`` group, ``obs``/``var``
``dataframe`` groups (strings as variable-length UTF-8 ``string-array``, numbers and booleans as
``array``, pandas categoricals and strings with missing values as ``categorical``), ``obsm`` a
``dict`` of arrays, ``uns`` a ``dict`` of ``string``/``numeric-scalar``/arrays/dicts, and the empty
``layers``/``obsp``/``varm``/``varp`` groups anndata always writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from expreg.data.metadata import MetadataError

logger = logging.getLogger("expreg")
_ENCODINGS = {
    "anndata": "0.1.0",
    "dict": "0.1.0",
    "csr_matrix": "0.1.0",
    "dataframe": "0.2.0",
    "array": "0.2.0",
    "string-array": "0.2.0",
    "categorical": "0.2.0",
    "string": "0.2.0",
    "numeric-scalar": "0.2.0",
}
_STR = h5py.string_dtype(encoding="utf-8")


class H5adError(MetadataError):
    """An ``.h5ad`` file cannot be read or written as expected; the message names the file and the item."""


@dataclass
class H5ad:
    """What ingestion needs of an AnnData file (``var`` holds the var columns, index = ``var_names``)."""

    X: sp.csr_matrix
    obs: pd.DataFrame
    var_names: list[str]
    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    uns: dict = field(default_factory=dict)
    var: pd.DataFrame | None = None
    skipped: list[str] = field(default_factory=list)  # items of an encoding this reader does not know


# ----------------------------------------------------------------------------------------- reading


def read_h5ad(path) -> H5ad:
    """Read ``path``; an ``H5adError`` naming the file (and the item) when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise H5adError(f"{path}: no such file (expected an AnnData .h5ad file)")
    item, skipped = "the file", []
    try:
        with h5py.File(path, "r") as f:
            if "X" not in f:
                raise H5adError(f"{path}: no 'X' (the expression matrix) in this .h5ad file")
            item = "X"
            X = _read_matrix(f["X"], path)
            item = "obs"
            obs = (
                _read_dataframe(f["obs"], path, skipped)
                if "obs" in f
                else pd.DataFrame(index=_range_index(X.shape[0]))
            )
            item = "var"
            var = (
                _read_dataframe(f["var"], path, skipped)
                if "var" in f
                else pd.DataFrame(index=_range_index(X.shape[1]))
            )
            item = "obsm"
            obsm = _read_obsm(f["obsm"], skipped) if "obsm" in f else {}
            item = "uns"
            uns = _read_uns(f["uns"], skipped) if "uns" in f else {}
    except H5adError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise H5adError(f"{path}: unreadable .h5ad ({item}): {reason}") from err
    if obs.shape[0] != X.shape[0] or var.shape[0] != X.shape[1]:
        raise H5adError(
            f"{path}: X is {X.shape[0]} x {X.shape[1]} but obs has {obs.shape[0]} rows and var {var.shape[0]} rows"
        )
    if skipped:
        logger.warning(
            f"{path}: {len(skipped)} item(s) of an encoding expreg does not read were left out: "
            f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}"
        )
    return H5ad(X=X, obs=obs, var_names=[str(v) for v in var.index], obsm=obsm, uns=uns, var=var, skipped=skipped)


def _range_index(n: int) -> pd.Index:
    return pd.Index([str(i) for i in range(n)])


def _encoding(obj) -> str | None:
    value = obj.attrs.get("encoding-type")
    return value.decode() if isinstance(value, bytes) else value


def _strings(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[...], dtype=object)
    return ds[...].astype(str).astype(object)


def _read_matrix(obj, path: Path) -> sp.csr_matrix:
    """X as CSR: an encoded csr/csc group, a legacy ``h5sparse_format`` group or a dense dataset."""
    if isinstance(obj, h5py.Dataset):
        return sp.csr_matrix(np.atleast_2d(obj[...]))
    kind = _encoding(obj) or obj.attrs.get("h5sparse_format")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    shape = obj.attrs.get("shape", obj.attrs.get("h5sparse_shape"))
    if kind not in ("csr_matrix", "csc_matrix", "csr", "csc") or shape is None:
        raise H5adError(f"{path}: X is a group of unknown encoding {kind!r} (expected csr_matrix or csc_matrix)")
    for name in ("data", "indices", "indptr"):
        if name not in obj:
            raise H5adError(f"{path}: X has no '{name}'")
    shape = tuple(int(s) for s in shape)
    parts = (obj["data"][...], obj["indices"][...], obj["indptr"][...])
    major = shape[0] if kind.startswith("csr") else shape[1]
    if len(parts[2]) != major + 1 or len(parts[0]) != len(parts[1]) or parts[2][-1] != len(parts[0]):
        raise H5adError(f"{path}: X ({kind}, shape {shape}) has inconsistent data/indices/indptr lengths")
    matrix = sp.csr_matrix(parts, shape=shape) if kind.startswith("csr") else sp.csc_matrix(parts, shape=shape)
    return matrix.tocsr()


def _read_dataframe(obj, path: Path, skipped: list[str]) -> pd.DataFrame:
    """An encoded ``dataframe`` group (columns of unknown encoding are left out) or a legacy compound dataset."""
    if isinstance(obj, h5py.Dataset):  # anndata < 0.7: one structured array with an "index" field
        table = pd.DataFrame.from_records(obj[...])
        table = table.apply(lambda c: c.str.decode("utf-8") if c.dtype == object else c)
        return table.set_index("index").rename_axis(None) if "index" in table else table
    index_key = obj.attrs.get("_index", "_index")
    index = pd.Index(_strings(obj[index_key]).astype(str)) if index_key in obj else None
    order = obj.attrs.get("column-order", [])
    columns = {}
    for name in [str(c) for c in np.atleast_1d(order)]:
        if name in obj:
            value = _read_column(obj[name])
            if value is None:
                skipped.append(f"{obj.name}/{name} ({_encoding(obj[name]) or obj[name].__class__.__name__})")
            else:
                columns[name] = value
    table = pd.DataFrame(columns, index=index)
    if index is None:
        table.index = _range_index(len(table))
    return table


def _read_column(obj):
    kind = _encoding(obj)
    if isinstance(obj, h5py.Dataset):
        if h5py.check_string_dtype(obj.dtype) is not None:
            return _strings(obj)
        return obj[...] if obj.dtype.kind in "biuf" else None
    if kind == "categorical":
        categories = obj["categories"]
        values = _strings(categories) if h5py.check_string_dtype(categories.dtype) else categories[...]
        ordered = bool(obj.attrs.get("ordered", False))
        return pd.Categorical.from_codes(obj["codes"][...], categories=values, ordered=ordered)
    if kind in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        values = _strings(obj["values"]) if kind == "nullable-string-array" else obj["values"][...]
        dtype = {"nullable-integer": "Int64", "nullable-boolean": "boolean"}.get(kind, "string")
        array = pd.array(values, dtype=dtype)
        array[obj["mask"][...].astype(bool)] = pd.NA
        return array
    return None


def _read_obsm(group, skipped: list[str]) -> dict[str, np.ndarray]:
    found = {}
    for name, obj in group.items():
        if isinstance(obj, h5py.Dataset):
            found[name] = obj[...]
        else:  # a sparse matrix or a data frame in obsm
            skipped.append(f"{obj.name} ({_encoding(obj)})")
    return found


def _read_uns(group, skipped: list[str]) -> dict:
    """Scalars, strings and string lists, numeric lists (1-D) and arrays (images), of any size (a list of
    12,000 genes a sample did not measure is as much a record as a list of 3), and nested dicts of
    ``uns``; anything else is named in ``skipped``."""
    out = {}
    for name, obj in group.items():
        if isinstance(obj, h5py.Group):
            if _encoding(obj) in (None, "dict"):
                out[name] = _read_uns(obj, skipped)
            else:
                skipped.append(f"{obj.name} ({_encoding(obj)})")
            continue
        if h5py.check_string_dtype(obj.dtype) is not None:
            value = obj.asstr()[()]
            out[name] = value if obj.shape == () else [str(v) for v in np.ravel(value)]
        elif obj.dtype.kind in "biuf":
            value = obj[()]
            out[name] = value.item() if obj.shape == () else value.tolist() if obj.ndim == 1 else np.asarray(value)
        else:
            skipped.append(f"{obj.name} (dtype {obj.dtype})")
    return out


# ----------------------------------------------------------------------------------------- writing


def write_h5ad(path, X, obs: pd.DataFrame, var_names, obsm=None, uns=None, var: pd.DataFrame | None = None) -> None:
    """Write an AnnData file anndata 0.10-0.12 reads; the file appears whole or not at all.

    Args:
        path: Where to write (a ``.tmp`` sibling is written first, then renamed).
        X: Spots x genes: a scipy sparse matrix (stored as CSR) or a dense array (stored dense), with its dtype.
        obs: One row per spot; the index (as str) becomes the obs names.
        var_names: One name per gene (column of ``X``).
        obsm: Optional name -> array with one row per spot (e.g. ``"spatial"``: x, y).
        uns: Optional dict of str/number/bool/list/array/dict values.
        var: Optional columns of ``var`` (e.g. ``gene_ids``), one row per gene, in ``var_names`` order.
    """
    path = Path(path)
    dense = not sp.issparse(X)
    X = np.atleast_2d(np.asarray(X)) if dense else sp.csr_matrix(X)
    var_names = [str(v) for v in var_names]
    if X.shape != (len(obs), len(var_names)):
        raise ValueError(
            f"X is {X.shape[0]} x {X.shape[1]} but obs has {len(obs)} rows and {len(var_names)} var names"
        )
    if var is not None and len(var) != len(var_names):
        raise ValueError(f"var has {len(var)} rows for {len(var_names)} var names")
    for name, value in (obsm or {}).items():
        if np.asarray(value).shape[0] != len(obs):
            raise ValueError(f"obsm['{name}'] has {np.asarray(value).shape[0]} rows, obs {len(obs)}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            _set_encoding(f, "anndata")
            if dense:
                _write_array(f, "X", X)
            else:
                _write_csr(f, "X", X)
            _write_dataframe(f, "obs", obs)
            columns = {} if var is None else {c: var[c].to_numpy() for c in var.columns}
            _write_dataframe(f, "var", pd.DataFrame(columns, index=pd.Index(var_names)))
            obsm_group = _dict_group(f, "obsm")
            for name, value in (obsm or {}).items():
                _write_array(obsm_group, str(name), np.asarray(value))
            for name in ("layers", "obsp", "varm", "varp"):
                _dict_group(f, name)
            _write_uns(_dict_group(f, "uns"), uns or {})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_encoding(obj, kind: str) -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = _ENCODINGS[kind]


def _dict_group(parent, name: str) -> h5py.Group:
    group = parent.create_group(name)
    _set_encoding(group, "dict")
    return group


def _write_csr(parent, name: str, X: sp.csr_matrix) -> None:
    group = parent.create_group(name)
    _set_encoding(group, "csr_matrix")
    group.attrs["shape"] = np.asarray(X.shape, dtype=np.int64)
    for key in ("data", "indices", "indptr"):  # resizable (hence chunked) like anndata's
        group.create_dataset(key, data=getattr(X, key), maxshape=(None,))


def _write_array(parent, name: str, value: np.ndarray) -> None:
    if value.dtype.kind in "OUS":
        parent.create_dataset(name, data=value.astype(str).astype(object), dtype=_STR)
        _set_encoding(parent[name], "string-array")
    else:
        parent.create_dataset(name, data=value)
        _set_encoding(parent[name], "array")


def _write_dataframe(parent, name: str, table: pd.DataFrame) -> None:
    group = parent.create_group(name)
    _set_encoding(group, "dataframe")
    group.attrs["_index"] = "_index"
    columns = [str(c) for c in table.columns]
    if "_index" in columns or len(set(columns)) != len(columns):
        raise ValueError(f"{name}: column names must be unique and not '_index': {columns}")
    group.attrs["column-order"] = columns  # an empty list is stored as an empty float64 array, as anndata does
    _write_array(group, "_index", np.asarray([str(i) for i in table.index], dtype=object))
    for column, key in zip(table.columns, columns):
        _write_column(group, key, table[column])


def _write_column(group, key: str, column: pd.Series) -> None:
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        _write_categorical(group, key, column.cat.codes.to_numpy(), column.cat.categories.to_numpy(), dtype.ordered)
    elif pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
        missing = bool(column.isna().any())  # nullable ints/bools with missing values: NaN floats
        _write_array(
            group, key, column.to_numpy(dtype=np.float64 if missing else getattr(dtype, "numpy_dtype", dtype))
        )
    else:
        values = column.astype(object)
        if values.isna().any():  # a string-array cannot hold a missing value; a categorical's code -1 can
            labels = pd.Categorical(values.map(lambda v: None if pd.isna(v) else str(v)))
            _write_categorical(group, key, labels.codes, np.asarray(labels.categories, dtype=object), False)
        else:
            _write_array(group, key, np.asarray([str(v) for v in values], dtype=object))


def _write_categorical(group, key: str, codes: np.ndarray, categories: np.ndarray, ordered: bool) -> None:
    sub = group.create_group(key)
    _set_encoding(sub, "categorical")
    sub.attrs["ordered"] = bool(ordered)
    _write_array(sub, "codes", np.asarray(codes))
    _write_array(sub, "categories", np.asarray(categories))


def _write_uns(group, uns: dict) -> None:
    for name, value in uns.items():
        name = str(name)
        if isinstance(value, dict):
            _write_uns(_dict_group(group, name), value)
        elif isinstance(value, str):
            group.create_dataset(name, data=value, dtype=_STR)
            _set_encoding(group[name], "string")
        elif isinstance(value, (bool, int, float, np.number, np.bool_)):
            group.create_dataset(name, data=np.asarray(value))
            _set_encoding(group[name], "numeric-scalar")
        elif isinstance(value, (list, tuple, np.ndarray)):
            _write_array(group, name, np.asarray(value))
        else:
            raise ValueError(f"uns['{name}']: cannot store a {type(value).__name__}")
