"""Every ``.h5ad`` file expreg reads or writes goes through ``anndata``, the format's own code.

``read_h5ad`` returns an ``anndata.AnnData`` whose ``X`` is a CSR matrix (dense and CSC files are
converted; ``backed=True`` leaves ``X`` on disk, for row/column selection of large files) and turns
anndata's and h5py's many exception types into one ``H5adError`` that names the file.
``write_h5ad`` builds the AnnData from expreg's tables and writes it whole or not at all (a
temporary sibling, renamed), so that scanpy, squidpy and anndata read our outputs as their own.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from expreg.data.metadata import MetadataError


class H5adError(MetadataError):
    """An ``.h5ad`` file cannot be read or written as expected; the message names the file and the item."""


def read_h5ad(path, *, backed: bool = False):
    """``anndata.read_h5ad(path)`` with ``X`` as a CSR matrix; an ``H5adError`` naming the file when it cannot."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise H5adError(f"{path}: no such file (expected an AnnData .h5ad file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # anndata's notes about its own future defaults
            warnings.filterwarnings("ignore", message=".* names are not unique")  # expreg makes them unique itself
            adata = anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # noqa: BLE001 - anndata raises h5py, zarr, KeyError, AnnDataReadError, ...
        adata = None if backed else _read_by_item(path)
        if adata is None:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise H5adError(f"{path}: unreadable .h5ad ({type(err).__name__}: {reason})") from err
    if adata.X is None:
        raise H5adError(f"{path}: no 'X' (the expression matrix) in this .h5ad file")
    if not backed:
        adata.X = _as_csr(adata.X, path)
    return adata


def read_h5ad_tables(path):
    """``obs``, ``var`` and ``uns`` of an ``.h5ad`` as an AnnData without ``X``: the counts stay on disk
    (``expreg.data.count_rows`` streams them), and so do ``layers``, ``obsm`` and the rest. Read element by
    element (an unreadable ``uns`` item is left out, named); a file whose ``obs`` or ``var`` only anndata's
    whole-file reader understands (older layouts) is read backed, ``X`` still left on disk."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise H5adError(f"{path}: no such file (expected an AnnData .h5ad file)")
    tables = _read_by_item(path, with_x=False)
    if tables is not None:
        return tables
    backed = read_h5ad(path, backed=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".* names are not unique")
            return anndata.AnnData(obs=backed.obs.copy(), var=backed.var.copy(), uns=dict(backed.uns))
    finally:
        backed.file.close()


def _read_by_item(path: Path, with_x: bool = True):
    """The file read element by element when anndata cannot read it whole: X, obs, var and obsm (only obs
    and var without ``with_x``) must read; an ``uns`` item that cannot (an encoding this anndata does not
    know) is left out with a warning that names it. None when those cannot be read either."""
    import anndata
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keys = ("X", "obs", "var", "obsm") if with_x else ("obs", "var")
            parts = {key: read_elem(f[key]) for key in keys if key in f}
            uns, skipped = {}, []
            for key in f.get("uns", {}):
                try:
                    uns[key] = read_elem(f["uns"][key])
                except Exception as err:  # noqa: BLE001 - whatever anndata raises for an unknown encoding
                    skipped.append(f"uns/{key} ({type(err).__name__})")
            if not with_x and not {"obs", "var"} <= set(parts):
                return None
            adata = anndata.AnnData(**parts, uns=uns)
    except Exception:  # noqa: BLE001 - the caller reports anndata's own error
        return None
    if skipped:
        logging.getLogger("expreg").warning(f"{path}: left out what anndata cannot read: {', '.join(skipped)}")
    return adata


def _as_csr(X, path: Path) -> sp.csr_matrix:
    if sp.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        X = sp.csr_matrix(X)  # a scipy sparse array (anndata >= 0.11 may return one) as a matrix
    else:
        X = sp.csr_matrix(np.atleast_2d(np.asarray(X)))
    if not np.issubdtype(X.dtype, np.number) and X.dtype != np.bool_:
        raise H5adError(f"{path}: X holds {X.dtype} values, not numbers")
    return X


def write_h5ad(path, X, obs: pd.DataFrame, var_names, obsm=None, uns=None, var: pd.DataFrame | None = None) -> None:
    """Write an AnnData file with ``anndata``; the file appears whole or not at all.

    Args:
        path: Where to write (a temporary sibling is written first, then renamed).
        X: Spots x genes: a scipy sparse matrix (stored as CSR) or a dense array (stored dense), with its dtype.
        obs: One row per spot; the index (as str) becomes the obs names.
        var_names: One name per gene (column of ``X``).
        obsm: Optional name -> array with one row per spot (e.g. ``"spatial"``: x, y).
        uns: Optional dict of str/number/bool/list/array/dict values (lists of strings become string arrays).
        var: Optional columns of ``var`` (e.g. ``gene_ids``), one row per gene, in ``var_names`` order.
    """
    import anndata

    path = Path(path)
    X = sp.csr_matrix(X) if sp.issparse(X) else np.atleast_2d(np.asarray(X))
    var_names = pd.Index([str(v) for v in var_names])
    if X.shape != (len(obs), len(var_names)):
        raise ValueError(
            f"X is {X.shape[0]} x {X.shape[1]} but obs has {len(obs)} rows and {len(var_names)} var names"
        )
    if var is not None and len(var) != len(var_names):
        raise ValueError(f"var has {len(var)} rows for {len(var_names)} var names")
    for name, value in (obsm or {}).items():
        if np.asarray(value).shape[0] != len(obs):
            raise ValueError(f"obsm['{name}'] has {np.asarray(value).shape[0]} rows, obs {len(obs)}")
    obs = obs.copy()
    obs.index = pd.Index([str(i) for i in obs.index])
    columns = {} if var is None else {c: var[c].to_numpy() for c in var.columns}
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    quiet = logging.getLogger("anndata")  # "... storing 'sample_id' as categorical" for every string column
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".* names are not unique")  # the caller's names, as given
            adata = anndata.AnnData(
                X=X,
                obs=obs,
                var=pd.DataFrame(columns, index=var_names),
                obsm={str(k): np.asarray(v) for k, v in (obsm or {}).items()},
                uns=_uns(uns or {}),
            )
            adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        quiet.setLevel(level)
        tmp.unlink(missing_ok=True)


def _uns(value):
    """``uns`` as anndata writes it: dicts recursed, lists of strings as string arrays."""
    if isinstance(value, dict):
        return {str(k): _uns(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=object) if value else np.array([], dtype=object)
        return np.asarray(value)
    return value
