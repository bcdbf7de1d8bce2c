"""Writes tests/data/old_expreg_writer.h5ad with the h5py-only writer expreg used before it read and
wrote every .h5ad through anndata (expreg/data/h5ad.py at commit a63662f, given as argv[1]), so that
tests keep reading the files older expreg versions wrote:

    git show a63662f:expreg/data/h5ad.py > /tmp/old_h5ad.py
    python tests/data/make_old_expreg_h5ad.py /tmp/old_h5ad.py
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

spec = importlib.util.spec_from_file_location("old_h5ad", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules["old_h5ad"] = old
spec.loader.exec_module(old)

X = sp.csr_matrix(np.array([[0, 3, 0, 1], [2, 0, 0, 0], [0, 0, 5, 7]], dtype=np.float32))
obs = pd.DataFrame(
    {
        "sample_id": ["S1", "S1", "S2"],
        "group_id": pd.Categorical(["P1", "P1", "P2"]),
        "x_px": [10.5, 20.5, 30.5],
        "in_tissue": [1, 1, 0],
        "gap": ["x", None, "y"],
    },
    index=["S1:AAA-1", "S1:CCC-1", "S2:GGG-1"],
)
var = pd.DataFrame({"gene_ids": ["ENSG01", "ENSG02", "ENSG03", "ENSG04"], "gene_symbols": ["A", "B", "C", "C"]})
uns = {
    "patch_um": 112.0,
    "expreg_prepare": "raw counts",
    "genes_not_measured": {"S1": [], "S2": ["C", "C-1"]},
    "spatial": {"S1": {"scalefactors": {"tissue_hires_scalef": 0.25, "spot_diameter_fullres": 80.0}}},
}
old.write_h5ad(
    Path(__file__).with_name("old_expreg_writer.h5ad"),
    X,
    obs,
    ["A", "B", "C", "C-1"],
    obsm={"spatial": np.array([[10.5, 1.0], [20.5, 2.0], [30.5, 3.0]])},
    uns=uns,
    var=var,
)
