"""The files of a map, written into a temporary folder that the caller moves into place.

``predictions.h5ad`` (AnnData: ``X`` predicted expression, tiles x genes; ``obs`` tile centre
``x_px``/``y_px`` in level-0 pixels, grid row/col, tissue fraction; ``obsm["spatial"]`` = x, y;
``uns["expreg_map"]`` the model, scale, patch and stride; ``uns["spatial"]`` the thumbnail and
scale factors in Space Ranger's layout, so ``scanpy.pl.spatial`` draws the map), ``predictions.csv``,
``thumbnail.png``, ``mask.png``, ``maps/<gene>.png``, ``overview.png``; with measured spots
``measured_vs_predicted.csv``, ``spot_metrics.json``, ``per_gene_spot_metrics.csv`` and
``measured_vs_predicted.png``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from expreg.data.h5ad import write_h5ad
from expreg.maps import pictures
from expreg.progress import progress_bar
from expreg.run_dir import write_per_gene_metrics, write_table_csv

UNITS = {
    "log1p_cpm": "log1p(counts per 10k)",
    "log1p": "log1p(counts)",
    "none": "counts",
    None: "expression (the units of the training targets)",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def unit(plan) -> str:
    return UNITS.get(getattr(plan.model.config, "target_transform", None) or plan.target_transform, UNITS[None])


def map_title(plan) -> str:
    slide = Path(plan.slide.path).name
    return (
        f"{slide}: {len(plan.grid):,} tiles of {plan.geometry.patch_um:g} µm, stride {plan.stride_um:g} µm, "
        f"{plan.geometry.um_per_px:.3g} µm/px"
    )


def gene_file_name(gene: str) -> str:
    """A file-system-safe name for ``maps/<gene>.png``."""
    return _UNSAFE.sub("_", gene) or "gene"


def map_file_names(genes: list[str]) -> dict[str, str]:
    """``<gene>.png`` for each gene, file-system safe; names that collide once made safe get ``-2``, ``-3``..."""
    names, used = {}, set()
    for gene in genes:
        stem = candidate = gene_file_name(gene)
        n = 1
        while candidate.lower() in used:  # case-insensitive file systems too
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate.lower())
        names[gene] = f"{candidate}.png"
    return names


def write_tiles(folder: Path, plan, expression: np.ndarray, info: dict) -> None:
    """``predictions.h5ad`` and ``predictions.csv`` (module docstring)."""
    grid = plan.grid
    names = grid.names()
    obs = pd.DataFrame(
        {
            "x_px": grid.centre_x,
            "y_px": grid.centre_y,
            "grid_row": grid.row,
            "grid_col": grid.col,
            "tissue_fraction": np.round(grid.tissue, 4),
        },
        index=names,
    )
    spatial = np.column_stack([grid.centre_x, grid.centre_y]).astype(np.float64)
    thumb = plan.thumbnail
    library = Path(plan.slide.path).stem
    scalef = thumb.shape[1] / plan.slide.size[0]
    uns = {
        "expreg_map": info,
        "spatial": {
            library: {
                "images": {"hires": thumb},
                "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": float(grid.box_px)},
            }
        },
    }
    write_h5ad(folder / "predictions.h5ad", expression.astype(np.float32), obs, plan.genes, {"spatial": spatial}, uns)
    header = ["tile", "x_px", "y_px", *plan.genes]
    rows = ([n, x, y, *r] for n, x, y, r in zip(names, grid.centre_x.tolist(), grid.centre_y.tolist(), expression))
    write_table_csv(folder / "predictions.csv", header, rows)


def spatial_variance_order(expression: np.ndarray, genes: list[str]) -> list[str]:
    """Genes by decreasing variance of their predictions over the tiles."""
    variance = expression.var(axis=0) if len(expression) else np.zeros(len(genes))
    return [genes[k] for k in np.argsort(-variance, kind="stable")]


def write_pictures(folder: Path, plan, expression: np.ndarray, progress: bool = True) -> list[str]:
    """``thumbnail.png``, ``mask.png``, ``maps/<gene>.png`` and ``overview.png``; returns the overview's genes."""
    write_diagnostics(folder, plan)
    column = {g: k for k, g in enumerate(plan.genes)}
    args = (plan.thumbnail, plan.slide.size, plan.grid)
    (folder / "maps").mkdir(exist_ok=True)
    drawing = {"um_per_px": plan.geometry.um_per_px, "alpha": plan.options.alpha}
    maps = pictures.GeneMaps(*args, unit(plan), map_title(plan), **drawing)
    names = map_file_names(plan.drawn)
    try:
        for gene in progress_bar(plan.drawn, enabled=progress, desc="gene maps", unit="map"):
            maps.draw(folder / "maps" / names[gene], expression[:, column[gene]], gene)
    finally:
        maps.close()
    if plan.options.genes:
        chosen, why = plan.drawn[: plan.options.overview_genes], "the genes asked for (--genes)"
    else:
        chosen = spatial_variance_order(expression, plan.genes)[: plan.options.overview_genes]
        why = f"the {len(chosen)} genes with the highest predicted spatial variance"
    matrix = expression[:, [column[g] for g in chosen]]
    pictures.overview(
        folder / "overview.png", *args, matrix, chosen, unit(plan), f"{map_title(plan)}\n{why}", **drawing
    )
    return chosen


def write_diagnostics(folder: Path, plan) -> None:
    """``thumbnail.png`` with the tissue outline and ``mask.png``."""
    um_per_thumbnail_px = plan.geometry.um_per_px * plan.slide.size[0] / plan.thumbnail.shape[1]
    pictures.save_thumbnail(folder / "thumbnail.png", plan.thumbnail, plan.tissue.mask, um_per_thumbnail_px)
    pictures.save_mask(folder / "mask.png", plan.tissue.mask)


def write_measured(folder: Path, plan, spots, metrics, measured: np.ndarray, predicted: np.ndarray) -> list[dict]:
    """The spot comparison files; returns the rows drawn (3 best and 3 worst genes by Spearman)."""
    genes = list(metrics.gene_names)
    header = ["barcode", "x_px", "y_px"]
    header += [f"{kind}:{g}" for g in genes for kind in ("measured", "predicted")]
    rows = []
    for i, barcode in enumerate(spots["barcode"]):
        values = [v for k in range(len(genes)) for v in (float(measured[i, k]), float(predicted[i, k]))]
        rows.append([barcode, float(spots["x_px"][i]), float(spots["y_px"][i]), *values])
    write_table_csv(folder / "measured_vs_predicted.csv", header, rows)
    write_per_gene_metrics(folder / "per_gene_spot_metrics.csv", metrics.per_gene_rows())
    drawn = _best_and_worst(metrics)
    if not drawn:  # no gene varies at the spots (every Spearman undefined): nothing to draw
        return drawn
    pictures.measured_vs_predicted(
        folder / "measured_vs_predicted.png",
        plan.thumbnail,
        plan.slide.size,
        (spots["x_px"], spots["y_px"]),
        measured,
        predicted,
        drawn,
        unit(plan),
        plan.geometry.um_per_px,
    )
    return drawn


def _best_and_worst(metrics, n: int = 3) -> list[dict]:
    rows = [dict(r, k=k) for k, r in enumerate(metrics.per_gene_rows()) if r["spearman"] is not None]
    rows.sort(key=lambda r: -r["spearman"])
    best = [dict(r, label=f"best {i + 1}") for i, r in enumerate(rows[:n])]
    rest = rows[n:][-n:]
    worst = [dict(r, label=f"worst {len(rest) - i}") for i, r in enumerate(rest)]
    return best + worst
