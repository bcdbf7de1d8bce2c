"""Sections -> a training set: patches at a stated physical size, ``metadata.csv``, ``expression.h5ad``,
``prepare.json`` (and, with a gene list, the targets ``y0..`` and ``genes.txt``).

Everything is read and checked before anything is written; the output is built in a temporary
folder beside ``out_dir`` and renamed into place at the end, so a failed run leaves nothing
half-written (and a finished output is never overwritten without ``overwrite``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from expreg.data.expression import TARGET_TRANSFORMS, read_gene_list, transform_counts
from expreg.data.h5ad import write_h5ad
from expreg.ingest import hest_patches
from expreg.ingest.errors import IngestError
from expreg.ingest.geometry import check_image_size, resolve_scale
from expreg.ingest.images import image_size, open_slide
from expreg.ingest.patches import PatchGeometry, cut_patch, inside, patch_box
from expreg.ingest.readers import read_section
from expreg.ingest.samples import read_sample_sheet
from expreg.progress import progress_bar
from expreg.run_dir import remove_abandoned_tmp

logger = logging.getLogger("expreg")
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}
JPEG_QUALITY = 95
UPSAMPLING_WARNING = 1.5  # patches enlarged more than this from the image: said in the log and prepare.json
MAX_DROPPED_FRACTION = 0.5  # more spots than this outside the image: an error, not a warning
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Options:
    """The command's options (``python -m expreg.prepare --help``)."""

    patch_um: float = 112.0
    patch_px: int = 224
    spot_diameter_um: float = 55.0
    image_format: str = "png"
    genes_file: str | None = None
    target_transform: str = "log1p_cpm"


@dataclass
class SampleResult:
    """What one section gave: kept spot rows, patch files, and why others were dropped."""

    spec: object
    section: object
    scale: object
    image_size: tuple[int, int]
    image_check: str | None
    keep: np.ndarray  # row indices into the section's spots
    files: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    h5_rows: np.ndarray | None = None  # HEST patches only: each kept spot's row in patches/<id>.h5


def prepare(samples_csv, out_dir, options: Options | None = None, overwrite: bool = False) -> dict:
    """Run the whole preparation (see the module docstring); returns the content of ``prepare.json``."""
    options = options or Options()
    out_dir = Path(out_dir).resolve()
    _check_options(options, out_dir, overwrite)
    start = time.perf_counter()
    specs = read_sample_sheet(samples_csv)
    genes = _read_gene_list(options.genes_file) if options.genes_file else None
    sections = [read_section(spec.path, spec.sample_id, spec.image) for spec in specs]
    results = [_plan(spec, section, options) for spec, section in zip(specs, sections)]
    union = _gene_union(sections)
    if genes is not None:
        _check_genes(genes, sections, options.genes_file)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    remove_abandoned_tmp(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for result in results:
            _cut(result, options, tmp)
        summary = _write_tables(results, union, genes, options, tmp)
        summary.update(_summary(samples_csv, results, options, time.perf_counter() - start))
        (tmp / "prepare.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """``tmp`` becomes ``out_dir``; an existing one (``--overwrite``) is set aside first and removed last."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _check_options(options: Options, out_dir: Path, overwrite: bool) -> None:
    if options.image_format not in IMAGE_FORMATS:
        raise IngestError(f"--image_format {options.image_format!r}: choose png or jpeg")
    if options.target_transform not in TARGET_TRANSFORMS:
        raise IngestError(f"--target_transform {options.target_transform!r}: choose {', '.join(TARGET_TRANSFORMS)}")
    sizes = (options.patch_um, options.patch_px, options.spot_diameter_um)
    if not all(math.isfinite(v) and v > 0 for v in sizes):
        raise IngestError("--patch_um, --patch_px and --spot_diameter_um must be positive, finite numbers")
    if out_dir.exists() and not overwrite:
        raise IngestError(f"--out_dir {out_dir} exists; choose another folder or pass --overwrite")


def _plan(spec, section, options: Options) -> SampleResult:
    """Scale, image check and the spots whose patch lies inside the image (all before writing)."""
    if section.image is None and section.patches_h5 is None:
        raise IngestError(
            f"sample {spec.sample_id} ({spec.path}): no full-resolution image found; give it in the sample "
            f"sheet's image column (line {spec.line})"
            + "".join(f"; {w}" for w in section.warnings if w.startswith("image"))
        )
    scale = resolve_scale(spec, section, options.spot_diameter_um)
    for warning in section.warnings:
        logger.warning(f"sample {spec.sample_id}: {warning}")
    if section.image is None:  # HEST patches only
        keep, h5_rows, dropped = hest_patches.patch_rows(section, options.patch_um)
        result = SampleResult(spec, section, scale, (0, 0), None, keep, dropped={**section.dropped, **dropped})
        result.h5_rows = h5_rows
        return result
    size = image_size(section.image)  # the header only: the pixels are decoded once, when cutting
    check = check_image_size(spec, section, size)
    upsampling = scale.um_per_px / (options.patch_um / options.patch_px)
    if upsampling > UPSAMPLING_WARNING:
        section.warnings.append(
            f"the image ({scale.um_per_px:.3g} um/px) is coarser than the patches ({options.patch_um / options.patch_px:.3g} "
            f"um/px): each patch is enlarged {upsampling:.1f}x and holds no finer detail"
        )
        logger.warning(f"sample {spec.sample_id}: {section.warnings[-1]}")
    geom = PatchGeometry(options.patch_um, options.patch_px, scale.um_per_px)
    boxes = [patch_box(x, y, geom) for x, y in zip(section.x_px, section.y_px)]
    keep = np.array([i for i, box in enumerate(boxes) if inside(size, box)], dtype=np.int64)
    dropped = dict(section.dropped)
    outside = len(boxes) - len(keep)
    if outside:
        dropped["patch outside the image"] = outside
    if outside > MAX_DROPPED_FRACTION * len(boxes):
        raise IngestError(
            f"sample {spec.sample_id}: {outside} of {len(boxes)} spots have their {options.patch_um:g} um patch "
            f"outside the {size[0]} x {size[1]} px image ({section.image}); the image or its scale "
            f"({scale.um_per_px:.4g} um/px from {scale.source}) is wrong"
        )
    return SampleResult(spec, section, scale, size, check, keep, dropped=dropped)


def _safe_name(barcode: str) -> str:
    return _UNSAFE.sub("_", barcode)


def _cut(result: SampleResult, options: Options, tmp: Path) -> None:
    """Write the patches of one section (``patches/<sample_id>/<barcode>.<ext>``)."""
    spec, section = result.spec, result.section
    folder = tmp / "patches" / spec.sample_id
    folder.mkdir(parents=True, exist_ok=True)
    names = [_safe_name(str(b)) for b in section.barcodes[result.keep]]
    if len(set(names)) != len(names):
        raise IngestError(f"sample {spec.sample_id}: barcodes collide once made file-name safe ({names[:3]} ...)")
    ext = IMAGE_FORMATS[options.image_format]
    kwargs = {"quality": JPEG_QUALITY} if ext == ".jpg" else {}
    patches = zip(names, _patches(result, options))
    for name, patch in progress_bar(patches, total=len(names), desc=f"patches {spec.sample_id}", unit="patch"):
        relative = f"patches/{spec.sample_id}/{name}{ext}"
        patch.save(tmp / relative, **kwargs)
        result.files.append(relative)
    logger.info(
        f"{spec.sample_id}: {len(result.files)} patches ({result.scale.um_per_px:.4g} um/px, {result.scale.source})"
    )


def _patches(result: SampleResult, options: Options):
    """The patch images of the kept spots, in order: cut from the image, or HEST's own (patches only)."""
    section = result.section
    if section.image is None:
        yield from hest_patches.read_patches(section.patches_h5, result.h5_rows, options.patch_px)
        return
    geom = PatchGeometry(options.patch_um, options.patch_px, result.scale.um_per_px)
    with open_slide(section.image) as slide:
        for row in result.keep:
            yield cut_patch(slide, section.x_px[row], section.y_px[row], geom)


def _gene_union(sections) -> list[str]:
    """Every gene measured by any section, in order of first appearance."""
    seen: dict[str, None] = {}
    for section in sections:
        seen.update(dict.fromkeys(section.gene_names))
    return list(seen)


def _read_gene_list(path) -> list[str]:
    try:
        genes = read_gene_list(path, "--genes")
    except ValueError as err:
        raise IngestError(str(err)) from err
    if not genes:
        raise IngestError(f"--genes {path}: no gene names")
    return genes


def _check_genes(genes: list[str], sections, path) -> None:
    measured = {name for section in sections for name in section.gene_names}
    unknown = [g for g in genes if g not in measured]
    if unknown:
        raise IngestError(
            f"--genes {path}: {len(unknown)} gene(s) measured by no sample: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}"
        )
    for section in sections:
        own = set(section.gene_names)
        missing = [g for g in genes if g not in own]
        if missing:
            logger.warning(
                f"sample {section.sample_id} did not measure {len(missing)} of the --genes: {', '.join(missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''}; their targets are 0 there"
            )


def _union_counts(results: list[SampleResult], union: list[str]) -> sp.csr_matrix:
    """Raw counts of the kept spots x the union of genes, rows in output order."""
    index = {g: i for i, g in enumerate(union)}
    blocks = []
    for result in results:
        counts = sp.coo_matrix(result.section.counts.tocsr()[result.keep])
        columns = np.array([index[g] for g in result.section.gene_names], dtype=np.int64)[counts.col]
        blocks.append(sp.csr_matrix((counts.data, (counts.row, columns)), shape=(counts.shape[0], len(union))))
    return sp.vstack(blocks, format="csr")


def _metadata_frame(results: list[SampleResult]) -> pd.DataFrame:
    frames = []
    for r in results:
        section = r.section
        frames.append(
            pd.DataFrame(
                {
                    "path": r.files,
                    "group_id": r.spec.group_id,
                    "sample_id": r.spec.sample_id,
                    "barcode": [str(b) for b in section.barcodes[r.keep]],
                    "x_px": section.x_px[r.keep],  # unrounded: patches are cut around these
                    "y_px": section.y_px[r.keep],
                    "um_per_px": r.scale.um_per_px,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _write_tables(results, union: list[str], genes, options: Options, tmp: Path) -> dict:
    """``metadata.csv`` (+ targets and ``genes.txt``) and ``expression.h5ad``; returns their summary."""
    frame = _metadata_frame(results)
    counts = _union_counts(results, union)
    if genes is not None:
        targets = _targets(results, genes, options.target_transform)
        for k in range(len(genes)):
            frame[f"y{k}"] = targets[:, k]
        (tmp / "genes.txt").write_text("\n".join(genes) + "\n")
    frame.to_csv(tmp / "metadata.csv", index=False)
    obs = frame[["sample_id", "group_id", "barcode", "x_px", "y_px", "path"]].copy()
    obs.index = [f"{s}:{b}" for s, b in zip(frame["sample_id"], frame["barcode"])]
    spatial = frame[["x_px", "y_px"]].to_numpy(dtype=np.float64)
    uns = {
        "patch_um": options.patch_um,
        "patch_px": options.patch_px,
        "expreg_prepare": "raw counts",
        # the union's genes a sample did not measure (its zeros there are not measurements)
        "genes_not_measured": {r.spec.sample_id: _unmeasured(r.section, union) for r in results},
    }
    write_h5ad(tmp / "expression.h5ad", counts, obs, union, obsm={"spatial": spatial}, uns=uns)
    return {"spots": len(frame), "genes_measured": len(union), "target_genes": len(genes) if genes else None}


def _unmeasured(section, union: list[str]) -> list[str]:
    own = set(section.gene_names)
    return [g for g in union if g not in own]


def _targets(results, genes: list[str], kind: str) -> np.ndarray:
    """The transformed targets of ``genes`` for every kept spot (0 where a sample did not measure a gene)."""
    parts = []
    for r in results:
        index = {g: i for i, g in enumerate(r.section.gene_names)}
        columns = [index.get(g, -1) for g in genes]
        parts.append(transform_counts(r.section.counts.tocsr()[r.keep], columns, kind))
    return np.concatenate(parts)


def _summary(samples_csv, results, options: Options, seconds: float) -> dict:
    import expreg

    return {
        "inputs": {"samples": str(Path(samples_csv).resolve()), **vars(options)},
        "patch": {
            "patch_um": options.patch_um,
            "patch_px": options.patch_px,
            "um_per_patch_px": options.patch_um / options.patch_px,
            "image_format": options.image_format,
        },
        "samples": [_sample_summary(r) for r in results],
        "seconds": round(seconds, 1),
        "versions": _versions(expreg.__version__),
    }


def _sample_summary(r: SampleResult) -> dict:
    section = r.section
    return {
        "sample_id": r.spec.sample_id,
        "group_id": r.spec.group_id,
        "path": str(r.spec.path),
        "layout": section.layout,
        "image": str(section.image),
        "image_size_px": list(r.image_size),
        "image_check": r.image_check,
        "um_per_px": r.scale.um_per_px,
        "um_per_px_source": r.scale.source,
        "spots_kept": len(r.keep),
        "spots_dropped": r.dropped,
        "genes_measured": len(section.gene_names),
        "warnings": list(section.warnings),
    }


def _versions(expreg_version: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"expreg": expreg_version}
    for name in ("numpy", "scipy", "pandas", "h5py", "tifffile", "imagecodecs", "zarr", "Pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
