"""A synthetic Visium cohort for the cohort-scale benchmarks: N Space Ranger sections with tiled pyramidal
JPEG TIFFs and sparse raw counts, plus a sample sheet ``expreg.prepare`` reads.

    python benchmarks/make_cohort.py --out /tmp/cohort --sections 100 [--spots 3000] [--genes 18000]
        [--um_per_px 2.0] [--sections_per_patient 3] [--workers 2] [--seed 0]

Each section (seeded by ``--seed`` and its index, so any subset is reproducible on its own):

- a hexagonal Visium lattice (100 µm pitch, ``array_row + array_col`` even) under an elliptical
  piece of tissue holding about ``--spots`` spots;
- three smooth hidden fields over the section (stain, cellularity, nucleus size) that draw the H&E
  (background colour, density and size of nuclei) and drive expression: a planted image ->
  expression signal a model can learn, plus noise and a per-patient offset;
- raw counts: library sizes from about 1,000 to 30,000 (they follow cellularity, as on real arrays),
  gene proportions log-normal (most genes rare: ~90-95 % zeros), Poisson sampled, written as a
  gzip-compressed ``filtered_feature_bc_matrix.h5`` with Ensembl-like ids; about 1 % of the genes
  are missing from each section's feature list (not measured there) and a few symbols name two
  ids (as in real annotations);
- ``outs/spatial/tissue_positions.csv``, ``scalefactors_json.json`` (``spot_diameter_fullres`` =
  65 µm, ``tissue_hires_scalef``), ``tissue_hires_image.png``, and the full-resolution image
  ``<id>.tif`` beside ``outs/`` (tiled 512 px JPEG, 3 levels).

``--um_per_px`` sets the image resolution and so the disk size (2 µm/px: a 3,500 px square image,
~3 MB; 0.5 µm/px is real Visium's, 16x the pixels). The last line states the cohort's size.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PITCH_UM = 100.0
SPOT_UM = 65.0
GRID_ROWS, GRID_COLS = 78, 128  # a Visium capture area: 6.5 mm x 6.5 mm
DUPLICATED_SYMBOLS = 20


def gene_table(genes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every section's gene ids, symbols (a few repeated), log proportions and image loadings (3 x genes)."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"ENSG{g:011d}" for g in range(genes)])
    symbols = np.array([f"GENE{g}" for g in range(genes)], dtype=object)
    twins = rng.choice(genes - 1, DUPLICATED_SYMBOLS, replace=False)
    symbols[twins + 1] = symbols[twins]  # one symbol, two ids
    log_share = rng.normal(0, 2.0, genes)
    loadings = rng.normal(0, 0.15, (3, genes))
    signal = rng.choice(genes, min(500, genes), replace=False)
    loadings[:, signal] = rng.normal(0, 0.8, (3, len(signal)))  # the genes the image tells about
    return ids, symbols.astype(str), log_share, loadings


def smooth_fields(rng, shape: tuple[int, int], bumps: int = 12) -> np.ndarray:
    """Three fields in [0, 1] over ``shape`` (rows, cols): sums of random Gaussian bumps."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    fields = np.zeros((3, *shape))
    for k in range(3):
        for cy, cx, width, height in rng.uniform([0, 0, 0.05, -1], [1, 1, 0.25, 1], (bumps, 4)):
            fields[k] += height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        fields[k] = (fields[k] - fields[k].min()) / (np.ptp(fields[k]) + 1e-9)
    return fields


def render(rng, fields: np.ndarray, tissue: np.ndarray, size: int, um_per_px: float) -> np.ndarray:
    """The H&E: background colour from stain, nuclei (density, size) from the other two fields; glass outside."""
    from PIL import Image

    def up(field):
        return np.asarray(Image.fromarray(field.astype(np.float32)).resize((size, size), Image.BILINEAR))

    stain, density, nucleus = (up(f) for f in fields)
    inside = up(tissue.astype(np.float32)) > 0.5
    eosin, haem = np.array([236.0, 170, 200]), np.array([150.0, 90, 170])
    image = (1 - 0.6 * stain[..., None]) * eosin + 0.6 * stain[..., None] * haem
    image += rng.normal(0, 5, (size, size, 1))
    area_um2 = (size * um_per_px) ** 2
    count = int(area_um2 / 120.0)  # candidate nuclei, thinned by density below
    centres = rng.uniform(0, size, (count, 2)).astype(np.int64)
    keep = rng.uniform(0, 1, count) < density[centres[:, 0], centres[:, 1]] * inside[centres[:, 0], centres[:, 1]]
    centres = centres[keep]
    radius = np.maximum(1, (3.0 + 3.0 * nucleus[centres[:, 0], centres[:, 1]]) / um_per_px).astype(np.int64)
    for r in np.unique(radius):
        dy, dx = np.nonzero(np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r)
        pick = centres[radius == r]
        rows = np.clip(pick[:, :1] + dy[None] - r, 0, size - 1)
        cols = np.clip(pick[:, 1:] + dx[None] - r, 0, size - 1)
        image[rows, cols] = [70, 40, 120]
    image[~inside] = [242, 242, 244]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_matrix(path: Path, counts, barcodes, ids, symbols) -> None:
    """Space Ranger's ``filtered_feature_bc_matrix.h5`` (features x barcodes, CSC), gzip-compressed."""
    import h5py

    csc = counts.tocsr()  # spots x genes CSR = genes x spots CSC
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        for name, values in (("data", csc.data.astype(np.int32)), ("indices", csc.indices.astype(np.int64))):
            g.create_dataset(name, data=values, compression="gzip", compression_opts=1)
        g.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        features = g.create_group("features")
        features.create_dataset("id", data=np.array([i.encode() for i in ids]))
        features.create_dataset("name", data=np.array([s.encode() for s in symbols]))
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(ids)))


def make_section(args: tuple) -> dict:
    """One section (module docstring); returns its sheet row and sizes."""
    import scipy.sparse as sp
    import tifffile
    from PIL import Image

    index, out, spots, genes, um_per_px, per_patient, seed = args
    rng = np.random.default_rng([seed, index])
    sid, patient = f"S{index:03d}", f"P{index // per_patient:03d}"
    ids, symbols, log_share, loadings = gene_table(genes, seed)
    rows, cols = np.mgrid[0:GRID_ROWS, 0:GRID_COLS]
    on = (rows + cols) % 2 == 0
    rows, cols = rows[on], cols[on]
    y_um, x_um = 200 + rows * PITCH_UM * math.sqrt(3) / 2, 200 + cols * PITCH_UM / 2
    extent_um = 400 + GRID_COLS * PITCH_UM / 2
    size = int(extent_um / um_per_px)
    fields = smooth_fields(rng, (64, 64))
    half = math.sqrt(spots / (math.pi * len(rows))) * rng.uniform(0.95, 1.05)  # an ellipse holding ~spots
    centre = extent_um / 2
    tissue_spot = ((x_um - centre) / (half * 1.25 * extent_um)) ** 2 + (
        (y_um - centre) / (half * 0.8 * extent_um)
    ) ** 2
    under = tissue_spot <= 1
    grid = (np.mgrid[0:64, 0:64] + 0.5) / 64 * extent_um
    tissue = ((grid[1] - centre) / (half * 1.25 * extent_um)) ** 2 + (
        (grid[0] - centre) / (half * 0.8 * extent_um)
    ) ** 2 <= 1.05
    cell = np.clip((np.column_stack([y_um, x_um]) / extent_um * 64).astype(np.int64), 0, 63)
    factors = fields[:, cell[:, 0], cell[:, 1]].T[under]  # (spots, 3)
    library = np.exp(rng.normal(np.log(1000) + 3.0 * factors[:, 1], 0.35)).clip(800, 30000)
    logits = (
        log_share[None]
        + (factors - 0.5) @ loadings
        + 0.3 * np.random.default_rng([seed, index // per_patient]).normal(size=genes)
    )
    share = np.exp(logits - logits.max(axis=1, keepdims=True))
    share /= share.sum(axis=1, keepdims=True)
    counts = sp.csr_matrix(rng.poisson(library[:, None] * share).astype(np.int32))
    measured = np.sort(rng.choice(genes, genes - genes // 100, replace=False))  # ~1 % not measured here
    counts = counts[:, measured]
    barcodes = [f"{sid}_{r:03d}x{c:03d}-1" for r, c in zip(rows[under], cols[under])]
    root = out / sid
    (root / "outs" / "spatial").mkdir(parents=True, exist_ok=True)
    write_matrix(root / "outs" / "filtered_feature_bc_matrix.h5", counts, barcodes, ids[measured], symbols[measured])
    x_px, y_px = x_um / um_per_px, y_um / um_per_px
    lines = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]  # 0.01 px, as 10x
    for barcode, k in zip(barcodes, np.flatnonzero(under)):
        lines.append(f"{barcode},1,{rows[k]},{cols[k]},{y_px[k]:.2f},{x_px[k]:.2f}")
    (root / "outs" / "spatial" / "tissue_positions.csv").write_text("\n".join(lines) + "\n")
    image = render(rng, fields, tissue, size, um_per_px)
    hires_scalef = min(1.0, 2000 / size)
    hires = Image.fromarray(image).resize((round(size * hires_scalef), round(size * hires_scalef)))
    hires.save(root / "outs" / "spatial" / "tissue_hires_image.png")
    scalefactors = {"spot_diameter_fullres": SPOT_UM / um_per_px, "tissue_hires_scalef": hires_scalef}
    (root / "outs" / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    with tifffile.TiffWriter(root / f"{sid}.tif") as tif:
        level = image
        for k in range(3):
            options = {"tile": (512, 512), "compression": "jpeg", "photometric": "rgb"}
            tif.write(level, subfiletype=1 if k else 0, **options)
            level = np.asarray(Image.fromarray(level).resize((level.shape[1] // 2, level.shape[0] // 2)))
    return {"sample_id": sid, "group_id": patient, "path": sid, "spots": int(under.sum()), "nnz": int(counts.nnz)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", type=int, default=100)
    parser.add_argument("--spots", type=int, default=3000, help="spots under tissue per section (about)")
    parser.add_argument("--genes", type=int, default=18_000)
    parser.add_argument("--um_per_px", type=float, default=2.0)
    parser.add_argument("--sections_per_patient", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "samples.csv").exists():
        raise SystemExit(f"{out}: holds samples.csv already; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [
        (i, out, args.spots, args.genes, args.um_per_px, args.sections_per_patient, args.seed)
        for i in range(args.sections)
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        made = list(pool.map(make_section, jobs))
    lines = ["sample_id,group_id,path"] + [f"{m['sample_id']},{m['group_id']},{m['path']}" for m in made]
    (out / "samples.csv").write_text("\n".join(lines) + "\n")
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    spots, nnz = sum(m["spots"] for m in made), sum(m["nnz"] for m in made)
    print(
        f"{len(made)} sections, {spots:,} spots, {args.genes:,} genes ({1 - nnz / (spots * args.genes):.1%} zeros), "
        f"{disk / 1e9:.2f} GB in {out} ({time.perf_counter() - start:.0f} s); sheet: {out / 'samples.csv'}"
    )


if __name__ == "__main__":
    main()
