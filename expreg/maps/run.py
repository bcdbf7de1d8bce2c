"""A planned map, made: tiles and measured spots predicted in one sharded loop, outputs written whole.

Tiles are read by DataLoader workers (``SlideTiles``) and predicted by ``expreg.inference``'s one
loop: under several processes every process predicts its shard and ``gather_for_metrics`` returns
exactly one row per tile, in tile order, to all of them. Only the main process writes: into
``.<out_dir>.tmp-<pid>`` beside the output, moved into place when complete (``run_dir.replace_dir``),
so a failed or interrupted map leaves no half-written folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from expreg.evaluation.metrics import compute_metrics
from expreg.inference import predict_loader
from expreg.ingest.patches import patch_box
from expreg.maps import outputs
from expreg.maps.plan import MapPlan, NoTissueError
from expreg.maps.tiles import SlideTiles
from expreg.run_dir import remove_abandoned_tmp, replace_dir, write_json

logger = logging.getLogger("expreg")
DIAGNOSTIC_FILES = {"thumbnail.png", "mask.png", "no_tissue.json"}


def _predict(plan: MapPlan, x0, y0, names: list[str], accelerator, desc: str, centres=None) -> np.ndarray:
    """Predictions in expression units for the boxes ``(x0, y0, box_px, box_px)``, in their order (a multiscale
    model: with the context boxes around ``centres``, the boxes' own centres by default)."""
    from torch.utils.data import DataLoader

    from expreg.data import ImageTransform
    from expreg.data.loaders import worker_context, worker_options

    config, options = plan.model.config, plan.options
    transform = ImageTransform(config.image_size, config.image_mean, config.image_std, train=False)
    context = _context_boxes(plan, x0, y0, centres)
    tiles = SlideTiles(
        plan.slide.path,
        x0,
        y0,
        plan.geometry.box_px,
        plan.geometry.patch_px,
        plan.level,
        transform,
        names,
        plan.slide,
        context=context,
    )
    workers = options.num_workers
    if workers and worker_context(workers) is not None and not plan.slide.tiled:
        workers = 0  # a fork server's workers would each decode the whole plain image again
    loader = DataLoader(tiles, batch_size=options.batch_size, **worker_options(workers, seed=False))
    neighbourhood = _neighbourhood(plan, x0, y0, centres)
    normalised = predict_loader(
        plan.model, loader, accelerator, tta=options.tta, desc=desc, neighbourhood=neighbourhood
    )
    return plan.model.to_expression(normalised.astype(np.float64))


def _neighbourhood(plan: MapPlan, x0, y0, centres):
    """A neighbourhood model's averaging matrix over the boxes (the boxes whose centres lie within its radius of
    each other, ``centres`` or the boxes' own), or None for other models. Tiles on a grid finer than the spot
    lattice put more boxes in a neighbourhood than a section's spots, covering the same disc of tissue."""
    from expreg.data.neighbours import model_radius, neighbourhood_matrix
    from expreg.maps.plan import MapError

    try:
        radius = model_radius(plan.model.config)
    except ValueError as err:
        raise MapError(str(err)) from err
    if radius is None:
        return None
    if centres is None:
        centres = _box_centres(plan, x0, y0)
    xy_um = np.stack([np.asarray(c, dtype=np.float64) for c in centres], axis=1) * plan.geometry.um_per_px
    return neighbourhood_matrix(np.zeros(len(xy_um), dtype=np.int64), xy_um, radius)


def _context_boxes(plan: MapPlan, x0, y0, centres):
    """A multiscale model's context boxes, ``(x0s, y0s, box_px, level)``: centred as ``expreg.prepare
    --context_um`` centres them on a spot (the same level choice), or None for a single-patch model."""
    from expreg.ingest.patches import PatchGeometry, patch_box
    from expreg.maps.plan import MapError

    config = plan.model.config
    if getattr(config, "context", "none") != "multiscale":
        return None
    if getattr(config, "context_um", None) is None:
        raise MapError(
            "the model reads a context patch around each tile (context=multiscale) but does not record its size "
            "(context_um); retrain on expreg.prepare --context_um output, or set data.context_um in the recipe"
        )
    geom = PatchGeometry(config.context_um, plan.geometry.patch_px, plan.geometry.um_per_px)
    if centres is None:
        centres = _box_centres(plan, x0, y0)
    boxes = [patch_box(x, y, geom) for x, y in zip(*centres)]
    x, y = (np.array([b[i] for b in boxes], dtype=np.int64) for i in (0, 1))
    return x, y, geom.box_px, plan.slide.best_level(geom.downsample)


def _box_centres(plan: MapPlan, x0, y0) -> tuple[np.ndarray, np.ndarray]:
    """The centres of the tiles at ``(x0, y0)``: where ``patch_box`` puts a tile of this corner (odd sides too)."""
    half = plan.geometry.box_px // 2
    return np.asarray(x0) + half, np.asarray(y0) + half


def _measured_spots(plan: MapPlan) -> dict:
    """The measured spots whose patch lies inside the slide (as prepare keeps them; at least 3, checked by the plan)."""
    spots = plan.measured
    keep = plan.spot_rows
    boxes = [patch_box(spots.x_px[i], spots.y_px[i], plan.geometry) for i in keep]
    return {
        "rows": keep,
        "barcode": spots.barcodes[keep].tolist(),
        "x_px": spots.x_px[keep],
        "y_px": spots.y_px[keep],
        "x0": np.array([box[0] for box in boxes], dtype=np.int64),
        "y0": np.array([box[1] for box in boxes], dtype=np.int64),
        "dropped": len(spots.x_px) - len(keep),
    }


def _spot_comparison(plan: MapPlan, accelerator):
    """(spots, measured targets, predictions, metrics) at the measured spots, over the genes they measured."""
    spots = _measured_spots(plan)
    names = [f"spot {b}" for b in spots["barcode"]]
    centres = (spots["x_px"], spots["y_px"])
    predicted = _predict(plan, spots["x0"], spots["y0"], names, accelerator, "spots", centres=centres)
    targets, missing = plan.measured.targets(plan.genes, plan.target_transform)
    targets = targets[spots["rows"]]
    if missing:
        logger.warning(
            f"the measured section lacks {len(missing)} of the model's genes ({', '.join(missing[:5])}); "
            "they are left out of the spot metrics"
        )
    measured_cols = [k for k, g in enumerate(plan.genes) if g not in set(missing)]
    genes = [plan.genes[k] for k in measured_cols]
    depth = np.asarray(plan.measured.counts.sum(axis=1), dtype=np.float64).reshape(-1)[spots["rows"]]
    metrics = compute_metrics(predicted[:, measured_cols], targets[:, measured_cols], genes, library_size=depth)
    spots["missing_genes"] = missing
    return spots, targets[:, measured_cols], predicted[:, measured_cols], metrics


def check_out_dir(out_dir: Path, overwrite: bool, inputs=()) -> None:
    """A finished map is replaced only with ``overwrite``, never one that holds an input; a no-tissue
    diagnostic folder always may be; the folder beside it must be writable (checked before any work)."""
    from expreg.maps.plan import MapError

    for given in inputs:
        if given and Path(given).exists() and Path(given).resolve().is_relative_to(out_dir):
            raise MapError(f"--out_dir {out_dir} holds the input {given}; it would be replaced: choose another folder")
    if out_dir.exists() and not overwrite:
        if not out_dir.is_dir():
            raise MapError(f"--out_dir {out_dir} exists and is not a folder")
        contents = {p.name for p in out_dir.iterdir()}
        if contents and not contents <= DIAGNOSTIC_FILES:
            raise MapError(f"--out_dir {out_dir} exists; choose another folder or pass --overwrite")
    probe = out_dir.parent / f".{out_dir.name}.probe-{os.getpid()}"
    try:
        probe.mkdir(parents=True)
        probe.rmdir()
    except OSError as err:
        raise MapError(f"--out_dir {out_dir}: cannot write beside it ({err.strerror or err})") from err


def write_no_tissue(plan: MapPlan, out_dir: Path) -> None:
    """The thumbnail, the mask and why (a folder of their own, replacing ``out_dir``); then the ``NoTissueError``."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    outputs.write_diagnostics(tmp, plan)
    why = {
        "error": "no tile has enough tissue",
        "mask": plan.tissue.source,
        "tissue_fraction_of_slide": round(plan.tissue.fraction, 5),
        "min_tissue": plan.options.min_tissue,
        "tile_um": plan.geometry.patch_um,
    }
    write_json(tmp / "no_tissue.json", why)
    replace_dir(tmp, out_dir)
    raise NoTissueError(
        f"{plan.slide.path}: no {plan.geometry.patch_um:g} µm tile has {plan.options.min_tissue:.0%} tissue "
        f"({plan.tissue.source}, {plan.tissue.fraction:.2%} of the slide is tissue); see {out_dir}/thumbnail.png and "
        "mask.png, then lower --min_tissue or give a --mask"
    )


def make_map(plan: MapPlan, accelerator, progress: bool = True) -> dict | None:
    """Predict and write the map of ``plan`` (module docstring); the summary on the main process, else None."""
    out_dir = Path(plan.options.out_dir).resolve()
    if len(plan.grid) == 0:
        if accelerator.is_main_process:
            write_no_tissue(plan, out_dir)
        raise NoTissueError("no tissue tile")
    start = time.perf_counter()
    expression = _predict(plan, plan.grid.x0, plan.grid.y0, plan.grid.names(), accelerator, "tiles")
    seconds = time.perf_counter() - start
    comparison = _spot_comparison(plan, accelerator) if plan.measured is not None else None
    if not accelerator.is_main_process:
        return None
    summary = _summary(plan, seconds, accelerator.num_processes)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    remove_abandoned_tmp(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        outputs.write_tiles(tmp, plan, expression, _uns_info(plan))
        summary["overview_genes"] = outputs.write_pictures(tmp, plan, expression, progress)
        if comparison is not None:
            summary["measured"] = _write_comparison(tmp, plan, *comparison)
        summary["seconds_total"] = round(time.perf_counter() - start, 2)
        write_json(tmp / "summary.json", summary)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write_comparison(folder: Path, plan: MapPlan, spots, targets, predicted, metrics) -> dict:
    drawn = outputs.write_measured(folder, plan, spots, metrics, targets, predicted)
    record = {
        "what": f"measured vs predicted at the {metrics.num_samples} measured spots of {plan.measured.sample_id}",
        "source": plan.measured.source,
        **metrics.summary,
        "target_transform": plan.target_transform,
        "spots_outside_slide": spots["dropped"],
        "genes_not_measured": spots["missing_genes"],
        "drawn": [{"gene": r["gene"], "spearman": r["spearman"], "label": r["label"]} for r in drawn],
        "per_gene": metrics.per_gene_rows(),
    }
    write_json(folder / "spot_metrics.json", record)
    keys = ("what", "spearman_mean", "pearson_mean", "spearman_depth_adjusted_mean", "depth_oracle_spearman_mean")
    return {k: record[k] for k in (*keys, "num_samples", "num_genes")}


def _uns_info(plan: MapPlan) -> dict:
    g = plan.geometry
    return {
        "model": str(plan.options.model),
        "slide": str(plan.slide.path),
        "slide_size_px": list(plan.slide.size),
        "um_per_px": g.um_per_px,
        "um_per_px_source": plan.scale_source,
        "patch_um": g.patch_um,
        "patch_px": g.patch_px,
        "tile_px_level0": g.box_px,
        "stride_um": plan.stride_um,
        "level": plan.level,
        "level_downsample": float(plan.slide.downsamples[plan.level]),
        "min_tissue": plan.options.min_tissue,
        "mask": plan.tissue.source,
        "tta": plan.options.tta,
        "units": outputs.unit(plan),
    }


def _summary(plan: MapPlan, seconds: float, processes: int) -> dict:
    import expreg

    tiles = len(plan.grid)
    return {
        "tiles": tiles,
        "tissue_area_mm2": round(plan.tissue.area_mm2(plan.geometry.um_per_px), 3),
        "seconds_predict": round(seconds, 2),
        "tiles_per_s": round(tiles / seconds, 2) if seconds > 0 else None,
        "processes": processes,
        "genes": len(plan.genes),
        "maps_drawn": len(plan.drawn),
        **_uns_info(plan),
        **_neighbourhood_sizes(plan),
        "warnings": plan.warnings,
        "expreg": expreg.__version__,
    }


def _neighbourhood_sizes(plan: MapPlan) -> dict:
    """A neighbourhood model's radius and the mean number of tiles a tile's neighbourhood holds (itself included):
    tiles lie closer than the spots it was trained on, so a neighbourhood holds more of them."""
    matrix = _neighbourhood(plan, plan.grid.x0, plan.grid.y0, None)
    if matrix is None:
        return {}
    size = float(np.diff(matrix.indptr).mean())
    return {"neighbourhood_um": plan.model.config.neighbourhood_um, "mean_tiles_per_neighbourhood": round(size, 2)}
