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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from expreg.config import TARGET_TRANSFORMS
from expreg.data.counts import transform_counts
from expreg.data.expression import read_gene_list
from expreg.data.h5ad import write_h5ad
from expreg.ingest import hest_patches, shards
from expreg.ingest.errors import IngestError
from expreg.ingest.gene_join import GeneUnion, join_genes
from expreg.ingest.geometry import check_image_size, resolve_scale
from expreg.ingest.images import image_size, open_slide
from expreg.ingest.patch_picture import save_section_picture
from expreg.ingest.patches import PatchGeometry, cut_patch, inside, patch_box
from expreg.ingest.processes import Processes, share
from expreg.ingest.readers import read_section
from expreg.ingest.samples import read_sample_sheet
from expreg.ingest.visium_hd import DEFAULT_MIN_TISSUE, describe_grid, pseudo_spots
from expreg.progress import progress_bar
from expreg.run_dir import package_versions, remove_abandoned_tmp

VERSIONED = ("numpy", "scipy", "pandas", "anndata", "h5py", "tifffile", "imagecodecs", "zarr", "Pillow")
logger = logging.getLogger("expreg")
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}
JPEG_QUALITY = 95
# zlib level of PNG patches: lossless either way; on HER2ST patches level 1 encodes in 4.3 ms (64 KB), Pillow's
# default 6 in 18.3 ms (56 KB): the default made encoding ~70 % of cutting time (benchmarks/RESULTS.md §12)
PNG_COMPRESS_LEVEL = 1
UPSAMPLING_WARNING = 1.5  # patches enlarged more than this from the image: said in the log and prepare.json
MAX_DROPPED_FRACTION = 0.5  # more spots than this outside the image: an error, not a warning
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Options:
    """The command's options (``python -m expreg.prepare --help``)."""

    patch_um: float = 112.0
    patch_px: int = 224
    spot_pitch_um: float | None = None  # None: the lattice's own (100 um Visium, 200 um ST)
    spot_diameter_um: float | None = None  # None: not used (the lattice gives the scale)
    image_format: str = "png"
    genes_file: str | None = None
    target_transform: str = "log1p_cpm"
    num_workers: int = 1  # processes cutting patches, one sample each at a time
    hd_min_tissue: float = DEFAULT_MIN_TISSUE  # Visium HD: a pseudo-spot keeps this share of a full cell's bins
    store: str = "files"  # files (patches/<sample>/<barcode>.png) or shards (Parquet, expreg.data.patch_store)
    context_um: float | None = None  # also a context patch per spot (context/<sample>/<barcode>.png), patch_px wide


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


def prepare(samples_csv, out_dir, options: Options | None = None, overwrite: bool = False, processes=None):
    """Run the whole preparation (see the module docstring); returns the content of ``prepare.json`` (None
    on the processes other than the main one of ``processes``)."""
    options = options or Options()
    processes = processes or Processes()
    out_dir = Path(out_dir).resolve()
    _check_options(options, out_dir, overwrite)
    start = time.perf_counter()
    specs = read_sample_sheet(samples_csv)
    genes = _read_gene_list(options.genes_file) if options.genes_file else None
    sections = [read_section(spec.path, spec.sample_id, spec.image, spec.bin_um) for spec in specs]
    results = [_plan(spec, section, options) for spec, section in zip(specs, sections)]
    sections = [r.section for r in results]  # Visium HD: its pseudo-spots, no longer its bins
    union = join_genes(sections)
    logger.info(f"genes: {len(union.names)} joined by {union.how}")
    for note in union.notes:
        logger.warning(f"genes: {note}")
    if genes is not None:
        _check_genes(genes, union, sections, options.genes_file)
    tmp = Path(processes.agree(out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"))
    if processes.main:
        remove_abandoned_tmp(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    processes.wait()
    try:
        _cut_shared(results, options, tmp, processes)
        if not processes.main:
            return None  # the main process writes the tables
        lost = shards.missing(tmp, results, options.store)
        if lost:
            raise IngestError(
                f"the patches of sample(s) {', '.join(lost[:5])} are not in {tmp}: with several machines, each "
                f"must see the output folder at the same path ({out_dir})"
            )
        return _finish(samples_csv, results, union, genes, options, tmp, out_dir, start)
    except BaseException:
        if processes.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cut_shared(results: list[SampleResult], options: Options, tmp: Path, processes: Processes) -> None:
    """``_cut_all`` on every process; an error on any one stops them all, each naming it (no process is
    left waiting for one that failed)."""
    if processes.count == 1:
        _cut_all(results, options, tmp, processes)
        return
    error = None
    try:
        _cut_all(results, options, tmp, processes)
    except Exception as err:  # noqa: BLE001 - told to the others, then raised here
        error = err
    reports = processes.gather(None if error is None else f"process {processes.index}: {error}")
    if error is not None:
        raise error
    failed = [r for r in reports if r]
    if failed:
        raise IngestError("; ".join(failed))


def _finish(samples_csv, results, union, genes, options: Options, tmp: Path, out_dir: Path, start: float) -> dict:
    """The tables (and the shards) into ``tmp``, then ``tmp`` into place; returns ``prepare.json``'s content."""
    summary, frame = _write_tables(results, union, genes, options, tmp)
    if options.store == "shards":
        summary["store"] = shards.pack(tmp, frame, len(results))
    summary.update(_summary(samples_csv, results, options, time.perf_counter() - start))
    (tmp / "prepare.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _move_into_place(tmp, out_dir)
    return summary


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """``tmp`` becomes ``out_dir``; an existing one (``--overwrite``) is set aside first and removed last."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _check_options(options: Options, out_dir: Path, overwrite: bool) -> None:
    if options.store not in ("files", "shards"):
        raise IngestError(f"--store {options.store!r}: choose files or shards")
    if options.image_format not in IMAGE_FORMATS:
        raise IngestError(f"--image_format {options.image_format!r}: choose png or jpeg")
    if options.target_transform not in TARGET_TRANSFORMS:
        raise IngestError(f"--target_transform {options.target_transform!r}: choose {', '.join(TARGET_TRANSFORMS)}")
    sizes = (options.patch_um, options.patch_px, options.spot_pitch_um, options.spot_diameter_um)
    if not all(v is None or (math.isfinite(v) and v > 0) for v in sizes):
        raise IngestError(
            "--patch_um, --patch_px, --spot_pitch_um and --spot_diameter_um must be positive, finite numbers"
        )
    if options.context_um is not None and not (
        math.isfinite(options.context_um) and options.context_um > options.patch_um
    ):
        raise IngestError(f"--context_um {options.context_um:g}: must exceed --patch_um ({options.patch_um:g} um)")
    if options.context_um is not None and options.store != "files":
        raise IngestError("--context_um writes context patches as files: use --store files with it")
    if not (isinstance(options.num_workers, int) and options.num_workers >= 1):
        raise IngestError(f"--num_workers {options.num_workers!r}: a whole number of processes, at least 1")
    if not 0 < options.hd_min_tissue <= 1:
        raise IngestError(f"--hd_min_tissue {options.hd_min_tissue:g}: a share of a full cell's bins, in (0, 1]")
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
    scale = resolve_scale(spec, section, options.spot_diameter_um, options.spot_pitch_um)
    section.warnings += list(scale.warnings)
    for warning in section.warnings:
        logger.warning(f"sample {spec.sample_id}: {warning}")
    logger.info(
        f"sample {spec.sample_id}: {scale.um_per_px:.4g} um/px from {scale.source}"
        + "".join(f"; checked: {check}" for check in scale.checks)
    )
    if section.layout == "visium_hd":
        section = pseudo_spots(section, scale.um_per_px, options.patch_um, options.hd_min_tissue)
        logger.info(f"sample {spec.sample_id}: {describe_grid(section)}")
    if section.image is None and options.context_um is not None:
        raise IngestError(
            f"sample {spec.sample_id} ({spec.path}): --context_um cuts context patches from the whole image, and "
            "this sample has only HEST's patches"
        )
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


def _cut_all(results: list[SampleResult], options: Options, tmp: Path, processes: Processes) -> None:
    """This process's share of the sections' patches (``share``): cut here, or with ``options.num_workers``
    worker processes, one section per worker at a time (each sample cut whole by one worker: the same
    files, byte for byte). Every result gets its patch paths, whoever cut it."""
    for result in results:
        result.files = _patch_files(result, options)
    mine = share(results, processes)
    workers = min(options.num_workers, len(mine))
    if workers <= 1:
        for index in mine:
            _cut(results[index], options, tmp, index)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    light = [replace(results[i], section=replace(results[i].section, counts=None)) for i in mine]  # no counts
    context = multiprocessing.get_context("spawn")  # no forked threads or open files
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = pool.map(_cut, light, [options] * len(light), [tmp] * len(light), mine, [False] * len(light))
        for index, _ in progress_bar(zip(mine, jobs), total=len(mine), desc="samples", unit="sample"):
            logger.info(
                f"{results[index].spec.sample_id}: {len(results[index].files)} patches (one of {workers} workers)"
            )


def _patch_files(result: SampleResult, options: Options) -> list[str]:
    """The patches' paths in the output (``patches/<sample_id>/<barcode>.<ext>``), in row order."""
    spec = result.spec
    names = [_safe_name(str(b)) for b in result.section.barcodes[result.keep]]
    if len(set(names)) != len(names):
        raise IngestError(f"sample {spec.sample_id}: barcodes collide once made file-name safe ({names[:3]} ...)")
    return [f"patches/{spec.sample_id}/{name}{IMAGE_FORMATS[options.image_format]}" for name in names]


def _cut(result: SampleResult, options: Options, tmp: Path, index: int, progress: bool = True) -> None:
    """Write the patches of one section (its ``files``, or its part of the shards: ``expreg.ingest.shards``)."""
    spec = result.spec
    ext = IMAGE_FORMATS[options.image_format]
    kwargs = {"quality": JPEG_QUALITY} if ext == ".jpg" else {"compress_level": PNG_COMPRESS_LEVEL}
    part = shards.PartWriter(shards.part_path(tmp, index), ext, kwargs) if options.store == "shards" else None
    if part is None:
        (tmp / "patches" / spec.sample_id).mkdir(parents=True, exist_ok=True)
    picture = tmp / "qc" / f"{spec.sample_id}.png"  # drawn by _patches once the last patch is cut
    patches = zip(result.files, _patches(result, options, picture), strict=True)
    bar = progress_bar(
        patches, enabled=progress, total=len(result.files), desc=f"patches {spec.sample_id}", unit="patch"
    )
    for relative, (patch, context) in bar:
        if part is None:
            patch.save(tmp / relative, **kwargs)
        else:
            part.add(relative, patch)
        if context is not None:
            (tmp / context_file(relative)).parent.mkdir(parents=True, exist_ok=True)
            context.save(tmp / context_file(relative), **kwargs)
    if part is not None:
        part.close()
    logger.info(
        f"{spec.sample_id}: {len(result.files)} patches ({result.scale.um_per_px:.4g} um/px, {result.scale.source})"
    )


def context_file(patch_file: str) -> str:
    """A patch's context patch in the output: ``patches/<sample>/<name>`` -> ``context/<sample>/<name>``."""
    return "context/" + patch_file.split("/", 1)[1]


def _patches(result: SampleResult, options: Options, picture: Path):
    """``(patch, context patch or None)`` of each kept spot, in order: cut from the image (opened once for
    both; a context patch covers ``context_um``, resized to ``patch_px``), or HEST's own patches. After the
    last one, with the image still open, ``picture``: where the patches were cut (none for HEST's patches)."""
    section = result.section
    if section.image is None:
        for patch in hest_patches.read_patches(section.patches_h5, result.h5_rows, options.patch_px):
            yield patch, None
        return
    geom = PatchGeometry(options.patch_um, options.patch_px, result.scale.um_per_px)
    wide = PatchGeometry(options.context_um, options.patch_px, result.scale.um_per_px) if options.context_um else None
    with open_slide(section.image) as slide:
        for row in result.keep:
            x, y = section.x_px[row], section.y_px[row]
            yield cut_patch(slide, x, y, geom), None if wide is None else cut_patch(slide, x, y, wide)
        try:  # runs when zip(strict=True) asks for one more
            save_section_picture(picture, result, options, slide)
        except (OSError, ValueError) as err:  # the patches stand without their picture
            logger.warning(f"sample {result.spec.sample_id}: no qc picture ({type(err).__name__}: {err})")


def _read_gene_list(path) -> list[str]:
    try:
        genes = read_gene_list(path, "--genes")
    except ValueError as err:
        raise IngestError(str(err)) from err
    if not genes:
        raise IngestError(f"--genes {path}: no gene names")
    return genes


def _check_genes(genes: list[str], union: GeneUnion, sections, path) -> None:
    """Every listed gene measured by every sample: a gene a sample never measured has no target there."""
    known = set(union.names)
    unknown = [g for g in genes if g not in known]
    if unknown:
        raise IngestError(
            f"--genes {path}: {len(unknown)} gene(s) measured by no sample: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}"
        )
    column = {g: i for i, g in enumerate(union.names)}
    problems = []
    for i, section in enumerate(sections):
        measured = union.measured(i)
        missing = [g for g in genes if not measured[column[g]]]
        if missing:
            problems.append(
                f"sample {section.sample_id} did not measure {len(missing)}: {', '.join(missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''}"
            )
    if problems:
        raise IngestError(
            f"--genes {path}: {'; '.join(problems)}. A gene a sample never measured has no target there (its zeros "
            "are not measurements): leave it out of --genes, or prepare without --genes and train with data.genes="
            "<the list> and data.allow_unmeasured_genes=true, which leaves those targets out of the loss and metrics"
        )


def _union_counts(results: list[SampleResult], union: GeneUnion) -> sp.csr_matrix:
    """Raw counts of the kept spots x the union of genes, rows in output order."""
    blocks = []
    for i, result in enumerate(results):
        counts = sp.coo_matrix(result.section.counts.tocsr()[result.keep])
        columns = union.columns[i][counts.col]
        blocks.append(sp.csr_matrix((counts.data, (counts.row, columns)), shape=(counts.shape[0], len(union.names))))
    return sp.vstack(blocks, format="csr")


def _metadata_frame(results: list[SampleResult], context: bool = False) -> pd.DataFrame:
    frames = []
    for r in results:
        section = r.section
        frames.append(
            pd.DataFrame(
                {
                    "path": r.files,
                    **({"context_path": [context_file(f) for f in r.files]} if context else {}),
                    "group_id": r.spec.group_id,
                    "sample_id": r.spec.sample_id,
                    "barcode": [str(b) for b in section.barcodes[r.keep]],
                    "x_px": section.x_px[r.keep],  # unrounded: patches are cut around these
                    "y_px": section.y_px[r.keep],
                    "um_per_px": r.scale.um_per_px,
                    **({} if section.bins_per_spot is None else {"hd_bins": section.bins_per_spot[r.keep]}),
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    return frame.astype({"hd_bins": "Int64"}) if "hd_bins" in frame else frame  # blank for other samples


def _write_tables(results, union: GeneUnion, genes, options: Options, tmp: Path) -> tuple[dict, pd.DataFrame]:
    """``metadata.csv`` (+ targets and ``genes.txt``) and ``expression.h5ad``; returns their summary and the
    metadata table."""
    frame = _metadata_frame(results, context=options.context_um is not None)
    counts = _union_counts(results, union)
    if genes is not None:
        targets = _targets(results, union, genes, options.target_transform)
        for k in range(len(genes)):
            frame[f"y{k}"] = targets[:, k]
        (tmp / "genes.txt").write_text("\n".join(genes) + "\n")
    frame.to_csv(tmp / "metadata.csv", index=False)
    obs = frame[
        ["sample_id", "group_id", "barcode", "x_px", "y_px", "path", *(["hd_bins"] if "hd_bins" in frame else [])]
    ].copy()
    obs.index = [f"{s}:{b}" for s, b in zip(frame["sample_id"], frame["barcode"])]
    spatial = frame[["x_px", "y_px"]].to_numpy(dtype=np.float64)
    uns = {
        "patch_um": options.patch_um,
        "patch_px": options.patch_px,
        "expreg_prepare": "raw counts",
        # the union's genes a sample did not measure (its zeros there are not measurements)
        "genes_not_measured": {
            r.spec.sample_id: [g for g, m in zip(union.names, union.measured(i)) if not m]
            for i, r in enumerate(results)
        },
        "genes_joined_by": union.how,
    }
    var = pd.DataFrame({"gene_symbols": union.symbols}, index=union.names)
    if union.ids is not None:
        var.insert(0, "gene_ids", union.ids)
    write_h5ad(tmp / "expression.h5ad", counts, obs, union.names, obsm={"spatial": spatial}, uns=uns, var=var)
    return {
        "spots": len(frame),
        "genes_measured": len(union.names),
        "genes_joined_by": union.how,
        "gene_join_notes": union.notes,
        "target_genes": len(genes) if genes else None,
    }, frame


def _targets(results, union: GeneUnion, genes: list[str], kind: str) -> np.ndarray:
    """The transformed targets of ``genes`` for every kept spot (every sample measured them: ``_check_genes``)."""
    column = {g: i for i, g in enumerate(union.names)}
    parts = []
    for i, r in enumerate(results):
        own = {int(c): j for j, c in enumerate(union.columns[i])}
        columns = [own.get(column[g], -1) for g in genes]
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
            **({"context_um": options.context_um} if options.context_um is not None else {}),
        },
        "samples": [_sample_summary(r) for r in results],
        "seconds": round(seconds, 1),
        "versions": {"expreg": expreg.__version__, **package_versions(VERSIONED)},
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
        "scale_checks": list(r.scale.checks),
        "spots_kept": len(r.keep),
        "spots_dropped": r.dropped,
        "genes_measured": len(section.gene_names),
        "warnings": list(section.warnings),
        **({"pseudo_spots": section.pseudo_spot_grid} if section.pseudo_spot_grid else {}),
    }
