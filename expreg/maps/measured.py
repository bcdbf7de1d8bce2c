"""Measured spots of the mapped section (``--measured``): positions, raw counts and the image's scale.

Two kinds of source:

- an ``expreg.prepare`` output folder (``prepare.json``, ``expression.h5ad``): the section is the
  sample whose image is the slide (the same file), else the one named by ``--sample_id``, else the
  only one; its spots are those prepare kept, its scale the one prepare used;
- a sample in any layout ``expreg.prepare`` reads (Space Ranger, Visium HD, HEST-1k, ``.h5ad``): read with the
  same reader and scale rules as ``expreg.prepare`` (``expreg.ingest.geometry.resolve_scale``: the
  spot lattice, ``--spot_pitch_um`` / ``--spot_diameter_um`` when given), its cross-checks among the warnings.

The section's image must be the slide: its size (from prepare.json, or its file) must equal the
slide's level-0 size, or the spot positions would land in the wrong places.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from expreg.data.counts import transform_counts
from expreg.data.h5ad import H5adError, read_h5ad
from expreg.ingest.errors import IngestError


class MeasuredError(ValueError):
    """A ``--measured`` source that cannot be used for this slide and model."""


@dataclass
class MeasuredSpots:
    """One section's measured spots (row order of the source).

    Attributes:
        sample_id: The section.
        barcodes: Spot ids.
        x_px, y_px: Spot centres in level-0 pixels of the slide.
        counts: Raw counts, spots x ``gene_names`` (all genes measured).
        gene_names: The measured genes.
        um_per_px: µm per level-0 pixel of the section's image, and ``scale_source`` where it came from.
        image_size: Level-0 ``(width, height)`` of the section's image, None when unknown.
        source: What was read (for ``summary.json``).
    """

    sample_id: str
    barcodes: np.ndarray
    x_px: np.ndarray
    y_px: np.ndarray
    counts: sp.csr_matrix
    gene_names: list[str]
    um_per_px: float
    scale_source: str
    image_size: tuple[int, int] | None
    source: str
    warnings: list[str] = field(default_factory=list)

    def targets(self, genes: list[str], kind: str) -> tuple[np.ndarray, list[str]]:
        """Measured targets of ``genes`` (``kind`` as in training) and the genes this section did not measure."""
        index = {g: i for i, g in enumerate(self.gene_names)}
        columns = [index.get(g, -1) for g in genes]
        missing = [g for g, c in zip(genes, columns) if c < 0]
        return transform_counts(self.counts, columns, kind).astype(np.float64), missing


def read_measured(
    source,
    slide_path,
    slide_size,
    sample_id=None,
    spot_diameter_um: float | None = None,
    spot_pitch_um=None,
    patch_um: float | None = None,
    hd: tuple = (None, 0.5),
) -> MeasuredSpots:
    """The measured spots of ``source`` for the slide ``slide_path`` of level-0 ``slide_size`` (module docstring);
    a Visium HD sample's bins (``hd``: bin size, minimum share of a full cell) are summed into pseudo-spots of
    ``patch_um`` (the model's patch), as prepare does."""
    source = Path(source)
    if (source / "prepare.json").is_file():
        spots = _from_prepared(source, slide_path, sample_id)
    else:
        spots = _from_sample(source, sample_id, spot_diameter_um, spot_pitch_um, patch_um, hd)
    _check_size(spots, slide_path, tuple(slide_size))
    return spots


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _choose_sample(folder: Path, samples: list[dict], slide_path, sample_id) -> dict:
    names = [s["sample_id"] for s in samples]
    if sample_id is not None:
        for sample in samples:
            if sample["sample_id"] == sample_id:
                return sample
        raise MeasuredError(f"--measured {folder}: no sample {sample_id!r} (it holds {', '.join(names)})")
    same = [s for s in samples if _same_file(s.get("image", ""), slide_path)]
    if len(same) == 1:
        return same[0]
    if len(samples) == 1:
        return samples[0]
    raise MeasuredError(
        f"--measured {folder}: {len(samples)} samples ({', '.join(names)}) and none has {slide_path} as its "
        "image; say which one is this slide with --sample_id"
    )


def _from_prepared(folder: Path, slide_path, sample_id) -> MeasuredSpots:
    try:
        samples = json.loads((folder / "prepare.json").read_text())["samples"]
        sample = _choose_sample(folder, samples, slide_path, sample_id)
        um_per_px, image_size = float(sample["um_per_px"]), tuple(int(v) for v in sample["image_size_px"])
    except MeasuredError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise MeasuredError(f"{folder / 'prepare.json'}: not an expreg.prepare record ({reason})") from err
    if image_size == (0, 0):
        raise MeasuredError(
            f"--measured {folder}: sample {sample['sample_id']} was prepared from HEST patches only, without a "
            "whole-slide image, so its spots cannot be placed on a slide; give its HEST-1k folder as --measured"
        )
    try:  # backed: only this sample's rows are read from disk (a cohort's counts can be gigabytes)
        table = read_h5ad(folder / "expression.h5ad", backed=True)
    except H5adError as err:
        raise MeasuredError(str(err)) from err
    try:
        return _prepared_spots(table, folder, sample, um_per_px, image_size)
    finally:
        table.file.close()


def _prepared_spots(table, folder: Path, sample: dict, um_per_px: float, image_size) -> MeasuredSpots:
    """One sample's spots of a backed ``expression.h5ad`` (``_from_prepared``)."""
    missing = [c for c in ("sample_id", "barcode", "x_px", "y_px") if c not in table.obs.columns]
    if missing:
        raise MeasuredError(
            f"{folder / 'expression.h5ad'}: obs lacks {', '.join(missing)} (not written by expreg.prepare)"
        )
    rows = np.flatnonzero(table.obs["sample_id"].astype(str).to_numpy() == sample["sample_id"])
    if len(rows) == 0:
        raise MeasuredError(f"{folder / 'expression.h5ad'}: no spots of sample {sample['sample_id']}")
    obs = table.obs.iloc[rows]
    genes, warnings = _sample_genes(table, str(sample["sample_id"]), folder)
    columns = [i for i, g in enumerate(table.var_names) if g in genes]
    return MeasuredSpots(
        sample_id=str(sample["sample_id"]),
        barcodes=obs["barcode"].astype(str).to_numpy(),
        x_px=obs["x_px"].to_numpy(dtype=np.float64),
        y_px=obs["y_px"].to_numpy(dtype=np.float64),
        counts=sp.csr_matrix(table.X[rows])[:, columns],  # rows read from disk, ascending
        gene_names=[table.var_names[i] for i in columns],
        um_per_px=um_per_px,
        scale_source=f"{folder / 'prepare.json'} (sample {sample['sample_id']}: {sample.get('um_per_px_source')})",
        image_size=image_size,
        source=f"expreg.prepare output {folder}, sample {sample['sample_id']}",
        warnings=warnings,
    )


def _sample_genes(table, sample_id: str, folder: Path) -> tuple[set[str], list[str]]:
    """The genes this sample measured: the file's genes less those prepare recorded as not measured by it."""
    record = table.uns.get("genes_not_measured")
    if not isinstance(record, dict):
        return set(table.var_names), [
            f"{folder / 'expression.h5ad'} does not record which genes each sample measured (written by an older "
            "expreg.prepare): genes measured only by other samples count as zeros here; prepare it again to fix"
        ]
    missing = record.get(sample_id, [])
    return set(table.var_names) - {str(g) for g in np.asarray(missing).ravel().tolist()}, []


def _from_sample(
    path: Path, sample_id, spot_diameter_um, spot_pitch_um, patch_um=None, hd=(None, 0.5)
) -> MeasuredSpots:
    from expreg.ingest.geometry import check_image_size, resolve_scale
    from expreg.ingest.images import SlideError, image_size
    from expreg.ingest.readers import read_section
    from expreg.ingest.samples import SampleSpec

    name = sample_id or (path.stem if path.suffix == ".h5ad" else path.name)
    try:
        section = read_section(path, name, bin_um=hd[0])
        spec = SampleSpec(name, name, path)
        scale = resolve_scale(spec, section, spot_diameter_um, spot_pitch_um)
        if section.layout == "visium_hd":
            from expreg.ingest.visium_hd import pseudo_spots

            if patch_um is None:
                raise IngestError(f"{path}: a Visium HD sample is summed into pseudo-spots of the model's patch_um")
            section = pseudo_spots(section, scale.um_per_px, patch_um, hd[1])
        size = tuple(image_size(section.image)) if section.image else None
        if size is not None:
            check_image_size(spec, section, size)  # as expreg.prepare: hires / scalef, HEST's fullres size
    except (IngestError, SlideError, FileNotFoundError) as err:
        raise MeasuredError(f"--measured {path}: {err}") from err
    warnings = list(section.warnings) + list(scale.warnings)
    if size is None:
        warnings.append("the sample names no image, so its size could not be checked against the slide")
    return MeasuredSpots(
        sample_id=name,
        barcodes=np.asarray(section.barcodes).astype(str),
        x_px=np.asarray(section.x_px, dtype=np.float64),
        y_px=np.asarray(section.y_px, dtype=np.float64),
        counts=sp.csr_matrix(section.counts),
        gene_names=list(section.gene_names),
        um_per_px=scale.um_per_px,
        scale_source=f"--measured {path}: {scale.source}",
        image_size=size,
        source=f"{section.layout} sample {path} ({name})",
        warnings=warnings,
    )


def _check_size(spots: MeasuredSpots, slide_path, slide_size: tuple[int, int]) -> None:
    if spots.image_size is None or tuple(spots.image_size) == slide_size:
        return
    w, h = spots.image_size
    raise MeasuredError(
        f"--measured {spots.source}: its spots were placed on a {w} x {h} px image, but {slide_path} is "
        f"{slide_size[0]} x {slide_size[1]} px: the slide is not the image these spots belong to"
    )
