"""One section's spots from its files: Space Ranger (>= 2.0 and 1.x), HEST-1k or any AnnData file -> ``Section``.

Owns layout detection (``detect_layout``), the spot positions files, HEST-1k samples and ``.h5ad`` files, the join of counts and positions (spots
under tissue present in both, in matrix order; what was left out is counted in ``Section.dropped``)
and the checks of these inputs. Every bad input is an ``IngestError`` naming the file and the
item; what is odd but usable (repeated gene names, non-integer counts, no image found) goes to
``Section.warnings``. Geometry (µm per pixel) and the images themselves are handled by the caller.

Layouts, tried in this order for ``read_section(path, sample_id)``:

- ``h5ad``: ``path`` is a ``.h5ad`` file with counts in ``X`` and (x, y) full-res px in ``obsm["spatial"]``.
- ``hest``: ``path`` holds ``st/<sample_id>.h5ad`` (HEST-1k; ``wsis/<id>.tif``, ``metadata/<id>.json``,
  ``patches/<id>.h5`` beside it).
- ``visium_hd``: ``path`` is a Visium HD ``outs/`` folder or its parent (``binned_outputs/``): the
  bins of one size, read as a Space Ranger folder (``expreg.ingest.visium_hd``; pseudo-spots are made
  once the scale is known).
- ``spaceranger`` / ``spaceranger_v1``: ``path`` is an ``outs/`` folder or its parent, with
  ``spatial/tissue_positions.parquet`` (Space Ranger >= 3) or ``spatial/tissue_positions.csv`` (header,
  >= 2.0) or ``spatial/tissue_positions_list.csv`` (no header, 1.x), and ``filtered_feature_bc_matrix.h5``
  or the MEX folder ``filtered_feature_bc_matrix/``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from expreg.data.h5ad import H5adError, read_h5ad
from expreg.ingest.counts import first_line as _first_line
from expreg.ingest.counts import read_10x_h5, read_mex
from expreg.ingest.errors import IngestError
from expreg.ingest.visium_hd import bin_folder, bin_of, check_bin_size, hd_outs

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_MEX = "filtered_feature_bc_matrix"


@dataclass
class Section:
    """One section's spots kept (under tissue, with counts and a position), in matrix order."""

    sample_id: str
    layout: str  # "spaceranger", "spaceranger_v1", "hest", "h5ad"
    barcodes: np.ndarray  # str
    counts: sp.csr_matrix  # spots x genes, raw counts as stored
    gene_names: list[str]  # made unique like scanpy's var_names_make_unique
    gene_ids: list[str] | None  # feature ids (10x features/id, h5ad var gene_ids), when the files have them
    x_px: np.ndarray  # float64 spot centres, full-resolution pixels (x = column)
    y_px: np.ndarray
    image: str | None = None
    patches_h5: str | None = None
    scalefactors: dict | None = None
    hires_image: str | None = None
    um_per_px: float | None = None
    um_per_px_source: str | None = None
    spot_diameter_um: float | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> spots (only reasons that dropped some)
    warnings: list[str] = field(default_factory=list)
    array_row: np.ndarray | None = None  # each spot's position on the array (the lattice gives the scale)
    array_col: np.ndarray | None = None
    fullres_size: tuple[int, int] | None = None  # (width, height) the sample records for its image (HEST)
    fullres_size_source: str | None = None
    gene_symbols: list[str] | None = None  # the gene names as the files give them (repeats and all)
    bin_um: float | None = None  # Visium HD: the bin size read (then summed into pseudo-spots)
    bins_per_spot: np.ndarray | None = None  # Visium HD pseudo-spots: the bins each one sums
    pseudo_spot_grid: dict | None = None
    lattice_kind: str | None = None  # the array's grid when its parity does not say it ("bins": Visium HD)
    lattice_pitch_um: float | None = None  # and its pitch


def _outs(path: Path) -> Path:
    return path / "outs" if (path / "outs").is_dir() else path


def detect_layout(path, sample_id) -> str:
    """``"h5ad"``, ``"hest"``, ``"visium_hd"``, ``"spaceranger"`` or ``"spaceranger_v1"``; an ``IngestError``
    saying what is missing."""
    path = Path(path)
    if path.suffix == ".h5ad":
        if not path.is_file():
            raise IngestError(f"{path}: no such file (sample {sample_id}, AnnData layout)")
        root = path.parent.parent
        in_hest = path.parent.name == "st" and ((root / "wsis").is_dir() or (root / "metadata").is_dir())
        return "hest" if in_hest and path.stem == sample_id else "h5ad"
    if not path.is_dir():
        raise IngestError(f"{path}: no such file or folder (sample {sample_id})")
    if (path / "st").is_dir():
        if (path / "st" / f"{sample_id}.h5ad").is_file():
            return "hest"
        found = sorted(p.stem for p in (path / "st").glob("*.h5ad"))[:10]
        raise IngestError(f"{path}: HEST-1k layout expected, but st/{sample_id}.h5ad is missing (st/ holds {found})")
    if hd_outs(path) is not None:
        return "visium_hd"
    outs = _outs(path)
    spatial = outs / "spatial"
    if (spatial / "tissue_positions.parquet").is_file() or (spatial / "tissue_positions.csv").is_file():
        return "spaceranger"
    if (spatial / "tissue_positions_list.csv").is_file():
        return "spaceranger_v1"
    if (outs / f"{_MEX}.h5").is_file() or (outs / _MEX).is_dir() or spatial.is_dir():
        raise IngestError(
            f"{outs}: Space Ranger layout expected (sample {sample_id}), but none of spatial/tissue_positions.parquet "
            "(Space Ranger >= 3), spatial/tissue_positions.csv (>= 2.0) or spatial/tissue_positions_list.csv (1.x) is "
            "there"
        )
    raise IngestError(
        f"{path}: no layout recognised for sample {sample_id}: expected a Space Ranger outs/ folder (or its parent) "
        f"with spatial/tissue_positions.csv, a HEST-1k folder with st/{sample_id}.h5ad, or an .h5ad file"
    )


def read_section(path, sample_id, image=None, bin_um: float | None = None) -> Section:
    """Read one section from ``path`` (see the module docstring); ``image`` overrides the image found;
    ``bin_um``: the Visium HD bin size to read (default ``visium_hd.DEFAULT_BIN_UM``)."""
    path = Path(path)
    sample_id = str(sample_id)
    if image is not None and not Path(image).is_file():
        raise IngestError(f"{image}: no such image file (given for sample {sample_id})")
    layout = detect_layout(path, sample_id)
    if layout == "h5ad":
        section = _read_anndata(path, sample_id, layout)
    elif layout == "hest":
        section = _read_hest(path.parent.parent if path.suffix == ".h5ad" else path, sample_id)
    elif layout == "visium_hd":
        section = _read_visium_hd(hd_outs(path), sample_id, bin_um or bin_of(path))
    else:
        section = _read_spaceranger(_outs(path), sample_id, layout)
    if image is not None:
        section.image = str(image)
        section.warnings = [w for w in section.warnings if not w.startswith("image:")]
    return section


# ------------------------------------------------------------------------------------ Space Ranger


def _read_visium_hd(outs: Path, sample_id: str, bin_um: float | None) -> Section:
    """The bins under tissue of one bin size, as a Space Ranger section on the bins' square grid."""
    folder = bin_folder(outs, bin_um, sample_id)
    section = _read_spaceranger(folder, sample_id, "visium_hd")
    section.bin_um = check_bin_size(section, folder, bin_of(folder))
    section.lattice_kind, section.lattice_pitch_um = "bins", section.bin_um
    if section.image is None:  # the full-resolution image lives beside outs/, not beside binned_outputs/
        section.image, note = _image_beside(outs.parent)
        section.warnings = [w for w in section.warnings if not w.startswith("image:")] + ([note] if note else [])
    return section


def _positions_file(spatial: Path) -> Path:
    for name in ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"):
        if (spatial / name).is_file():
            return spatial / name
    return spatial / "tissue_positions.parquet"  # read_positions names it as missing


def _read_spaceranger(outs: Path, sample_id: str, layout: str) -> Section:
    positions_file = _positions_file(outs / "spatial")
    positions = read_positions(positions_file, header=positions_file.name != "tissue_positions_list.csv")
    matrix_file, (counts, barcodes, gene_names, gene_ids, kinds) = _read_counts(outs, sample_id)
    counts, gene_names, gene_ids, feature_note = _gene_expression_only(
        counts, gene_names, gene_ids, kinds, matrix_file
    )
    keep, dropped = _join(barcodes, positions, matrix_file, positions_file)
    rows = positions.loc[barcodes[keep]]
    section = Section(
        sample_id=sample_id,
        layout=layout,
        barcodes=barcodes[keep],
        counts=counts[keep],
        gene_names=gene_names,
        gene_ids=gene_ids,
        x_px=rows["pxl_col_in_fullres"].to_numpy(np.float64),
        y_px=rows["pxl_row_in_fullres"].to_numpy(np.float64),
        scalefactors=_read_json(outs / "spatial" / "scalefactors_json.json", required=False),
        dropped=dropped,
        array_row=rows["array_row"].to_numpy(np.float64),
        array_col=rows["array_col"].to_numpy(np.float64),
    )
    _scalefactors_scale(section, outs / "spatial" / "scalefactors_json.json")
    hires = outs / "spatial" / "tissue_hires_image.png"
    section.hires_image = str(hires) if hires.is_file() else None
    section.image, note = _image_beside(outs.parent)
    section.warnings += _finish(section, matrix_file) + [n for n in (feature_note, note) if n]
    return section


def _scalefactors_scale(section: Section, path: Path) -> None:
    """``microns_per_pixel`` of Visium HD / Space Ranger >= 3 scale factors: the scale, stated by Space Ranger."""
    value = (section.scalefactors or {}).get("microns_per_pixel")
    if value is None:
        return
    try:
        section.um_per_px = float(value)
    except (TypeError, ValueError) as err:
        raise IngestError(f"{path}: microns_per_pixel {value!r} is not a number") from err
    section.um_per_px_source = f"microns_per_pixel {section.um_per_px:g} in {path.name}"


def _gene_expression_only(counts, names: list[str], ids: list[str], kinds, source: Path):
    """Keep the "Gene Expression" features of a matrix that also holds others (CytAssist antibodies, CRISPR
    guides): they are not genes and must not count in a spot's library size."""
    if kinds is None:
        return counts, names, ids, None
    kinds = np.asarray([str(k) for k in kinds], dtype=object)
    genes = kinds == "Gene Expression"
    if genes.all() or not genes.any():
        return counts, names, ids, None
    others = sorted(set(kinds[~genes].tolist()))
    note = f"{source}: left out {int((~genes).sum())} feature(s) that are not genes ({', '.join(others)})"
    keep = np.flatnonzero(genes)
    return counts[:, keep], [names[i] for i in keep], [ids[i] for i in keep], note


def _read_counts(outs: Path, sample_id: str):
    """(the matrix file, (counts spots x genes, barcodes, gene names, gene ids)) from the .h5 or the MEX folder."""
    if (outs / f"{_MEX}.h5").is_file():
        return outs / f"{_MEX}.h5", read_10x_h5(outs / f"{_MEX}.h5")
    if (outs / _MEX).is_dir():
        return outs / _MEX, read_mex(outs / _MEX)
    raise IngestError(
        f"{outs}: Space Ranger layout (sample {sample_id}), but the counts are missing: neither {_MEX}.h5 nor "
        f"the {_MEX}/ folder (barcodes.tsv.gz, features.tsv.gz, matrix.mtx.gz) is there"
    )


def read_positions(path: Path, header: bool) -> pd.DataFrame:
    """A tissue positions file (CSV, or Parquet from Space Ranger >= 3) -> a table indexed by barcode with the
    10x columns (pxl_row = y, pxl_col = x)."""
    if path.suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except (OSError, ValueError) as err:
            raise IngestError(f"{path}: unreadable positions Parquet file: {_first_line(err)}") from err
        return _checked_positions(table, path)
    try:
        table = pd.read_csv(
            path,
            header=0 if header else None,
            dtype={0: str} if not header else {"barcode": str},
            float_precision="round_trip",  # exact whatever the pandas version (pandas 2 defaults to 1-ulp rounding)
        )
        if not header and len(table) and str(table.iloc[0, 0]) == "barcode":  # a header after all
            table = table.iloc[1:].reset_index(drop=True)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise IngestError(f"{path}: unreadable positions CSV: {_first_line(err)}") from err
    if not header:
        if table.shape[1] != len(POSITION_COLUMNS):
            raise IngestError(
                f"{path}: {table.shape[1]} columns; a Space Ranger 1.x positions file (no header) has 6: "
                + ", ".join(POSITION_COLUMNS)
            )
        table.columns = POSITION_COLUMNS
    return _checked_positions(table, path)


def _checked_positions(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise IngestError(f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(map(str, table.columns))})")
    table["barcode"] = table["barcode"].astype(str)
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(values.to_numpy(np.float64)))
        if len(bad):
            raise IngestError(
                f"{path}: column {column}: {len(bad)} row(s) not a number (first at data row {bad[0] + 1}: "
                f"barcode {table['barcode'].iloc[bad[0]]!r}; a truncated file?)"
            )
        table[column] = values
    _check_unique(table["barcode"].to_numpy(), path, "barcode")
    return table.set_index("barcode")[POSITION_COLUMNS[1:]]


def _join(barcodes: np.ndarray, positions: pd.DataFrame, matrix_file: Path, positions_file: Path):
    """Rows of the matrix to keep (under tissue and in both files), and reason -> spots dropped."""
    _check_unique(barcodes, matrix_file, "barcode")
    in_tissue = positions["in_tissue"] == 1
    in_matrix = pd.Index(barcodes)
    placed = in_matrix.isin(positions.index)
    under = in_matrix.isin(positions.index[in_tissue])
    dropped = {
        "not under tissue": int((placed & ~under).sum()),
        "in positions, not in the matrix": int((in_tissue & ~positions.index.isin(in_matrix)).sum()),
        "in the matrix, no position": int((~placed).sum()),
    }
    if not under.any():
        raise IngestError(
            f"no spot under tissue is in both {positions_file} ({int(in_tissue.sum())} under tissue, e.g. "
            f"{list(positions.index[in_tissue][:3])}) and {matrix_file} ({len(barcodes)} barcodes, e.g. "
            f"{list(barcodes[:3])}): do they belong to the same section?"
        )
    return np.flatnonzero(under), {k: v for k, v in dropped.items() if v}


def _image_beside(folder: Path) -> tuple[str | None, str | None]:
    """The one full-resolution image in ``folder`` (not a tissue_*_image), and a warning when none or several."""
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not _is_tissue_image(p.name)
    )
    if len(found) == 1:
        return str(found[0]), None
    if not found:
        return None, f"image: no full-resolution image (*.jpg/*.png/*.tif) beside {folder / 'outs'}"
    return None, f"image: {len(found)} candidate images beside outs/ in {folder}: {', '.join(p.name for p in found)}"


def _is_tissue_image(name: str) -> bool:
    stem = name.rsplit(".", 1)[0].lower()
    return stem.startswith("tissue_") and stem.endswith("_image")


# ---------------------------------------------------------------------------------- HEST-1k, h5ad


def _read_hest(root: Path, sample_id: str) -> Section:
    section = _read_anndata(root / "st" / f"{sample_id}.h5ad", sample_id, "hest")
    wsi = root / "wsis" / f"{sample_id}.tif"
    patches = root / "patches" / f"{sample_id}.h5"
    if wsi.is_file():
        section.image = str(wsi)
    elif patches.is_file():
        section.patches_h5 = str(patches)
    else:
        section.warnings.append(f"image: neither wsis/{sample_id}.tif nor patches/{sample_id}.h5 in {root}")
    metadata = _read_json(root / "metadata" / f"{sample_id}.json", required=False)
    if metadata is None:
        section.warnings.append(f"{root / 'metadata' / f'{sample_id}.json'}: no HEST metadata (µm per pixel unknown)")
        return section
    for key, attribute in (("pixel_size_um_estimated", "um_per_px"), ("spot_diameter", "spot_diameter_um")):
        value = metadata.get(key)
        if value is not None:
            try:
                setattr(section, attribute, float(value))
            except (TypeError, ValueError) as err:
                raise IngestError(
                    f"{root / 'metadata' / f'{sample_id}.json'}: {key} {value!r} is not a number"
                ) from err
    if section.um_per_px is not None:
        section.um_per_px_source = "HEST metadata pixel_size_um_estimated"
    size = (metadata.get("fullres_px_width"), metadata.get("fullres_px_height"))
    if None not in size:
        try:
            section.fullres_size = (int(size[0]), int(size[1]))
        except (TypeError, ValueError) as err:
            raise IngestError(
                f"{root / 'metadata' / f'{sample_id}.json'}: fullres_px_width/height {size} are not whole numbers"
            ) from err
        section.fullres_size_source = str(root / "metadata" / f"{sample_id}.json")
    return section


def _read_anndata(path: Path, sample_id: str, layout: str) -> Section:
    try:
        data = read_h5ad(path)
    except H5adError as err:
        raise IngestError(str(err)) from err
    if "spatial" not in data.obsm:
        raise IngestError(f"{path}: no obsm['spatial'] (the spot centres x, y in full-resolution pixels)")
    try:
        spatial = np.asarray(data.obsm["spatial"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise IngestError(f"{path}: obsm['spatial'] is not numeric ({err})") from err
    if spatial.ndim != 2 or spatial.shape[1] < 2 or spatial.shape[0] != data.X.shape[0]:
        raise IngestError(f"{path}: obsm['spatial'] has shape {spatial.shape}; expected ({data.X.shape[0]}, 2)")
    bad = np.flatnonzero(~np.isfinite(spatial[:, :2]).all(axis=1))
    if len(bad):
        raise IngestError(
            f"{path}: obsm['spatial'] is not finite for {len(bad)} spot(s), e.g. {data.obs.index[bad[0]]}"
        )
    barcodes = data.obs.index.to_numpy(dtype=str).astype(object)
    _check_unique(barcodes, path, "obs name (barcode)")
    keep = np.ones(len(barcodes), dtype=bool)
    if "in_tissue" in data.obs.columns:
        keep = pd.to_numeric(data.obs["in_tissue"], errors="coerce").to_numpy() == 1
    if not keep.any():
        raise IngestError(f"{path}: no spot has obs in_tissue == 1")
    var = data.var if data.var is not None else pd.DataFrame()
    ids = [str(v) for v in var["gene_ids"]] if "gene_ids" in var.columns else None
    section = Section(
        sample_id=sample_id,
        layout=layout,
        barcodes=barcodes[keep],
        counts=data.X[np.flatnonzero(keep)],
        gene_names=list(data.var_names),
        gene_ids=ids,
        x_px=spatial[keep, 0].copy(),
        y_px=spatial[keep, 1].copy(),
        dropped={"not under tissue": int((~keep).sum())} if (~keep).any() else {},
    )
    if {"array_row", "array_col"} <= set(data.obs.columns):
        section.array_row = pd.to_numeric(data.obs["array_row"], errors="coerce").to_numpy(np.float64)[keep]
        section.array_col = pd.to_numeric(data.obs["array_col"], errors="coerce").to_numpy(np.float64)[keep]
    section.scalefactors = _uns_scalefactors(data.uns)
    section.warnings += _finish(section, path)
    if layout == "h5ad":
        section.warnings.append(f"image: an .h5ad file names no image ({path}); give the sample's image")
    return section


def _uns_scalefactors(uns: dict) -> dict | None:
    """scanpy's ``uns["spatial"][library]["scalefactors"]`` when the file has exactly one library."""
    libraries = uns.get("spatial") if isinstance(uns.get("spatial"), dict) else {}
    found = [lib.get("scalefactors") for lib in libraries.values() if isinstance(lib, dict)]
    return found[0] if len(found) == 1 and isinstance(found[0], dict) else None


# ------------------------------------------------------------------------------------------ shared


def make_unique(names) -> tuple[list[str], list[str]]:
    """Names made unique as anndata/scanpy's ``var_names_make_unique`` does, and the names that repeated."""
    values = [str(n) for n in names]
    counts = Counter(values)
    repeated = [n for n, c in counts.items() if c > 1]
    if not repeated:
        return values, []
    taken, seen, suffix = set(values), set(), Counter()
    for i, value in enumerate(values):
        if value not in seen:
            seen.add(value)
            continue
        while True:
            suffix[value] += 1
            candidate = f"{value}-{suffix[value]}"
            if candidate not in taken:
                taken.add(candidate)
                values[i] = candidate
                break
    return values, repeated


def _finish(section: Section, source: Path) -> list[str]:
    """Unique gene names; checks of the counts; returns the warnings."""
    warnings = []
    section.gene_symbols = [str(n) for n in section.gene_names]
    section.gene_names, repeated = make_unique(section.gene_names)
    if repeated:
        warnings.append(
            f"{source}: {len(repeated)} gene name(s) repeated, made unique with -1, -2 ... "
            f"(e.g. {', '.join(repeated[:5])})"
        )
    if len(section.gene_names) != section.counts.shape[1]:
        raise IngestError(f"{source}: {len(section.gene_names)} gene names for {section.counts.shape[1]} columns")
    if section.gene_ids is not None and len(section.gene_ids) != len(section.gene_names):
        raise IngestError(f"{source}: {len(section.gene_ids)} gene ids for {len(section.gene_names)} gene names")
    data = section.counts.data
    if data.size and data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        example = data[np.flatnonzero(data != np.round(data))[0]]
        warnings.append(f"{source}: counts are not integers (e.g. {example:g}); expected raw UMI counts")
    if data.size and data.min() < 0:
        warnings.append(f"{source}: counts has negative values (min {data.min():g}); expected raw UMI counts")
    return warnings


def _check_unique(values: np.ndarray, path: Path, what: str) -> None:
    counts = Counter(values.tolist())
    repeated = [v for v, c in counts.items() if c > 1]
    if repeated:
        raise IngestError(f"{path}: {len(repeated)} {what}(s) repeated, e.g. {', '.join(map(str, repeated[:5]))}")


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise IngestError(f"{path}: no such file")
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IngestError(f"{path}: unreadable JSON: {_first_line(err)}") from err
    if not isinstance(value, dict):
        raise IngestError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
