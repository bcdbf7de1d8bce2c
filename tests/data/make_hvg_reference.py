"""Regenerate ``hvg_scanpy_reference.json``: scanpy's own highly variable genes for ``hvg_counts.npz``.

Not run by the tests (scanpy needs anndata, which needs pandas < 3, beside expreg's pandas 3):

    python -m venv /tmp/scanpy_venv && /tmp/scanpy_venv/bin/pip install scanpy==1.11.5
    /tmp/scanpy_venv/bin/python tests/data/make_hvg_reference.py

The counts were made once with ``numpy.random.default_rng(7)`` (see ``make_counts``) and are
stored, so the reference does not depend on a random stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def make_counts() -> np.ndarray:
    rng = np.random.default_rng(7)
    spots, genes = 150, 300
    means = np.exp(rng.normal(0.0, 1.5, genes))
    dispersion = np.exp(rng.normal(-1.0, 1.0, genes))  # some genes far more variable than Poisson
    size = rng.lognormal(0.0, 0.3, spots)[:, None]
    rate = rng.gamma(1.0 / dispersion, dispersion * means * size)
    counts = rng.poisson(rate)
    counts[:, :5] = 0  # never detected
    return counts.astype(np.int32)


def main() -> None:
    import anndata
    import scanpy as sc

    path = HERE / "hvg_counts.npz"
    if not path.exists():
        np.savez_compressed(path, counts=make_counts())
    counts = np.load(path)["counts"]
    reference = {"scanpy": sc.__version__, "anndata": anndata.__version__, "cases": {}}
    for transform in ("log1p_cpm", "log1p"):
        adata = anndata.AnnData(counts.astype(np.float32))
        adata.var_names = [f"g{i}" for i in range(counts.shape[1])]
        if transform == "log1p_cpm":
            sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        detected = (counts > 0).mean(axis=0) >= 0.1  # data.min_gene_detection's default
        adata = adata[:, detected].copy()
        for k in (10, 50):
            table = sc.pp.highly_variable_genes(adata, n_top_genes=k, flavor="seurat", inplace=False)
            chosen = table.index[table["highly_variable"]].tolist()
            norm = table["dispersions_norm"].to_numpy(dtype=np.float64)
            reference["cases"][f"{transform}:{k}"] = {
                "genes": sorted(chosen),
                "dispersions_norm": [None if np.isnan(v) else float(v) for v in norm],
                "eligible": adata.var_names.tolist(),
            }
    (HERE / "hvg_scanpy_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print("wrote", HERE / "hvg_scanpy_reference.json")


if __name__ == "__main__":
    main()
