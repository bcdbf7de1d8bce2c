"""Visium HD: one bin size of Space Ranger's ``binned_outputs/`` read as bins, then pseudo-spots.

A Visium HD ``outs/`` folder holds ``binned_outputs/square_002um|008um|016um/``, each laid out as a
Space Ranger ``outs/`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet``,
``spatial/scalefactors_json.json`` with ``microns_per_pixel`` and ``bin_size_um``).

``read_bins`` reads the bin size the sample sheet names (``bin_um``, default ``DEFAULT_BIN_UM``):
the bins under tissue, their raw counts and positions, and their square grid (``array_row``,
``array_col`` at ``bin_size_um``) so that the scale is cross-checked against the bin lattice.

``pseudo_spots`` then sums the bins into pseudo-spots: a square grid of ``patch_um`` cells in the
full-resolution image's own frame (so each pseudo-spot is exactly the patch cut around it, also
when the image is rotated against the array), anchored at the top-left corner of the bins under
tissue; a cell holds the bins whose centres fall inside it, its raw counts are their sum, and a
cell with fewer than ``min_tissue`` of the bins a full cell holds, ``(patch_um / bin_um)^2``, is
dropped and counted. HEST-1k turns Xenium into 100 µm pseudo-spots the same way (a square grid
of transcripts summed per cell); ours follow the patch size, so a spot's counts and its patch
cover the same tissue.

Why 8 µm by default: 10x's recommended bin size for analysis; a pseudo-spot edge is placed to within
half a bin (4 µm of a 112 µm patch, where 16 µm bins would be off by up to 8 µm and fit a
patch size that is not a multiple of 16 µm less evenly); 2 µm bins are 16 times as many for no
gain at patch scale. ``bin_um = 16`` reads 4 times fewer bins where memory is short.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from expreg.ingest.errors import IngestError

DEFAULT_BIN_UM = 8
DEFAULT_MIN_TISSUE = 0.5  # a pseudo-spot keeps at least half the bins of a full cell
BINNED = "binned_outputs"


def hd_outs(path: Path) -> Path | None:
    """The Visium HD ``outs/`` folder at ``path`` (the folder itself, its parent, or one of its
    ``binned_outputs/square_<bin>um`` folders), or None."""
    if path.parent.name == BINNED and bin_of(path) is not None:
        return path.parent.parent
    for outs in (path, path / "outs"):
        if (outs / BINNED).is_dir():
            return outs
    return None


def bin_of(folder: Path) -> float | None:
    """The bin size of a ``square_<bin>um`` folder's name (None for another name)."""
    match = re.fullmatch(r"square_(\d+)um", folder.name)
    return float(match.group(1)) if match else None


def bin_folder(outs: Path, bin_um: float | None, sample_id: str) -> Path:
    """``binned_outputs/square_<bin>um``; an error listing the bin sizes present when it is not there."""
    bin_um = DEFAULT_BIN_UM if bin_um is None else bin_um
    if float(bin_um) != int(bin_um):
        raise IngestError(f"sample {sample_id}: bin_um {bin_um:g} is not a whole number of µm (Visium HD: 2, 8, 16)")
    folder = outs / BINNED / f"square_{int(bin_um):03d}um"
    if not folder.is_dir():
        present = sorted(p.name for p in (outs / BINNED).glob("square_*um"))
        raise IngestError(
            f"{outs / BINNED}: no {folder.name}/ for sample {sample_id} (bin_um {bin_um:g}); it holds "
            f"{', '.join(present) or 'no square_*um folders'}: choose one of those (the sample sheet's bin_um "
            "column for expreg.prepare, --bin_um for expreg.map)"
        )
    return folder


def check_bin_size(section, folder: Path, bin_um: float) -> float:
    """The bin size the scale factors state (``bin_size_um``), which must be the folder's."""
    stated = (section.scalefactors or {}).get("bin_size_um")
    if stated is None:
        return float(bin_um)
    try:
        stated = float(stated)
    except (TypeError, ValueError) as err:
        raise IngestError(
            f"{folder / 'spatial' / 'scalefactors_json.json'}: bin_size_um {stated!r} is not a number"
        ) from err
    if abs(stated - bin_um) > 1e-6:
        raise IngestError(
            f"{folder / 'spatial' / 'scalefactors_json.json'}: bin_size_um {stated:g} but the folder is {folder.name}"
        )
    return stated


def pseudo_spots(section, um_per_px: float, patch_um: float, min_tissue: float = DEFAULT_MIN_TISSUE):
    """``section`` (Visium HD bins, positions in full-resolution px) summed into pseudo-spots (module docstring).

    Returns the section with one row per pseudo-spot kept: barcodes ``r<row>_c<col>`` (the cell of the
    grid), centres, summed raw counts, ``bins_per_spot`` and ``dropped["pseudo-spot with too little
    tissue"]``. The grid is recorded in ``section.pseudo_spot_grid``.
    """
    side = patch_um / um_per_px  # a cell's side in full-resolution px
    bin_px = section.bin_um / um_per_px
    x0, y0 = section.x_px.min() - bin_px / 2, section.y_px.min() - bin_px / 2
    col = np.floor((section.x_px - x0) / side).astype(np.int64)
    row = np.floor((section.y_px - y0) / side).astype(np.int64)
    cells, cell_of_bin = np.unique(np.column_stack([row, col]), axis=0, return_inverse=True)
    cell_of_bin = cell_of_bin.ravel()
    assign = sp.csr_matrix(
        (np.ones(len(cell_of_bin), dtype=np.float64), (cell_of_bin, np.arange(len(cell_of_bin)))),
        shape=(len(cells), len(cell_of_bin)),
    )
    bins = np.asarray(assign.sum(axis=1)).ravel().astype(np.int64)
    full = (patch_um / section.bin_um) ** 2
    # a cell fully over tissue holds (patch/bin)^2 bin centres give or take a row (rotation, aliasing)
    keep = np.flatnonzero(bins >= min_tissue * min(full, (math.sqrt(full) - 1) ** 2))
    counts = sp.csr_matrix(assign[keep] @ section.counts.astype(np.float64))
    if np.issubdtype(section.counts.dtype, np.integer) or np.all(counts.data == np.round(counts.data)):
        counts = counts.astype(np.int64 if counts.nnz and counts.data.max() > 2**31 - 1 else np.int32)
    rows, cols = cells[keep, 0], cells[keep, 1]
    section.pseudo_spot_grid = {
        "patch_um": float(patch_um),
        "bin_um": float(section.bin_um),
        "origin_px": [float(x0), float(y0)],
        "cell_px": float(side),
        "bins_in_a_full_cell": full,
        "min_tissue": float(min_tissue),
        "bins_under_tissue": int(len(cell_of_bin)),
    }
    dropped = {f"bins {reason}": n for reason, n in section.dropped.items()}  # bins, not pseudo-spots
    if len(cells) > len(keep):
        dropped["pseudo-spot with too little tissue"] = int(len(cells) - len(keep))
    section.barcodes = np.array([f"r{r}_c{c}" for r, c in zip(rows, cols)], dtype=object)
    section.counts = counts
    section.x_px = x0 + (cols + 0.5) * side
    section.y_px = y0 + (rows + 0.5) * side
    section.array_row, section.array_col = None, None  # the bins' lattice checked the scale already
    section.bins_per_spot = bins[keep]
    section.dropped = dropped
    ratio = patch_um / section.bin_um
    if abs(ratio - round(ratio)) > 1e-6:
        section.warnings.append(
            f"the {patch_um:g} um patch is not a whole number of {section.bin_um:g} um bins: pseudo-spots hold "
            f"{int(math.floor(ratio)) ** 2}-{int(math.ceil(ratio)) ** 2} bins by grid aliasing alone (library sizes "
            "vary with it); a patch of a multiple of the bin size avoids that"
        )
    if not len(keep):
        raise IngestError(
            f"sample {section.sample_id}: no {patch_um:g} um pseudo-spot holds {min_tissue:g} of the {full:g} "
            f"bins of a full cell ({len(cell_of_bin)} bins under tissue)"
        )
    return section


def describe_grid(section) -> str:
    """One log line about a section's pseudo-spots."""
    grid = section.pseudo_spot_grid
    dropped = section.dropped.get("pseudo-spot with too little tissue", 0)
    return (
        f"{len(section.barcodes)} pseudo-spots of {grid['patch_um']:g} um from {grid['bins_under_tissue']} "
        f"{grid['bin_um']:g} um bins under tissue (median {int(np.median(section.bins_per_spot))} of "
        f"{grid['bins_in_a_full_cell']:g} bins per pseudo-spot; {dropped} with less than {grid['min_tissue']:g} "
        "of a full cell dropped)"
    )
