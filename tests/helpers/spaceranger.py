"""Space Ranger files written by tests (shared by test_prepare.py and test_map.py)."""

from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp


def write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes, genes, kinds=None) -> None:
    """A ``filtered_feature_bc_matrix.h5``: CSC features x barcodes, i.e. the CSR spots x genes' arrays."""
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        g.create_dataset("data", data=counts.data.astype(np.int32))
        g.create_dataset("indices", data=counts.indices.astype(np.int64))
        g.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        feats = g.create_group("features")
        feats.create_dataset("id", data=np.array([f"ID{n}".encode() for n in genes]))
        feats.create_dataset("name", data=np.array([n.encode() for n in genes]))
        kinds = kinds or ["Gene Expression"] * len(genes)
        feats.create_dataset("feature_type", data=np.array([k.encode() for k in kinds]))
