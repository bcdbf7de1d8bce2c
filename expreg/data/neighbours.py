"""A spot's neighbourhood: the spots of its own section within a radius, from the metadata's positions.

Neighbourhood features (``expreg.cv --methods linear_probe_neighbourhood``, and ``model.context=neighbourhood``
with ``train.mode=frozen``, which ``expreg.predict`` and ``expreg.map`` apply) are a spot's embedding beside
the mean embedding of its neighbourhood (the spot itself included, so it is never empty).
Only images enter them, never targets, and only spots of the same section: sections belong to one
patient, and folds and splits are made of whole patients, so a neighbourhood never reaches into
another fold. At prediction time the neighbours of a held-out spot are other held-out spots of its
section, exactly as in a whole-slide map.

Positions come from the metadata CSV, in the columns ``expreg.prepare`` writes (``sample_id``,
``x_px``, ``y_px``, ``um_per_px``) or those of the HER2ST patch CSV (``sample_id``, ``pixel_x``,
``pixel_y``, ``src_um_per_px``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from expreg.data.metadata import MetadataError

POSITION_COLUMNS = (
    ("sample_id", "x_px", "y_px", "um_per_px"),  # expreg.prepare
    ("sample_id", "pixel_x", "pixel_y", "src_um_per_px"),  # the HER2ST patch CSV (../shared/data/her2st_dev)
)
RING_FACTOR = 1.2  # one ring of the lattice: the nearest spots (at the pitch), not the next ones (at >= 1.73x);
# k rings: (k + 0.2) x the pitch (two: the nearest and the next, at <= 2x on hexagonal and square lattices)


def spot_positions(metadata) -> tuple[np.ndarray, np.ndarray]:
    """``(section of each row, (rows, 2) positions in µm)`` from the metadata's position columns; a section
    is a ``group_id``'s ``sample_id`` (the same sample id under two groups is two sections)."""
    frame = metadata.frame
    return _positions(lambda c: frame[c].astype(str).to_numpy(), frame.columns, str(metadata.csv_path))


def _positions(column, available, source: str) -> tuple[np.ndarray, np.ndarray]:
    names = next((c for c in POSITION_COLUMNS if all(n in available for n in c)), None)
    if names is None:
        raise MetadataError(
            f"{source}: neighbourhood features need each spot's section and position: columns "
            + " or ".join(", ".join(c) for c in POSITION_COLUMNS)
            + " (expreg.prepare writes the first)"
        )
    section, x, y, scale = names
    values = {}
    for name in (x, y, scale):
        text = np.char.strip(column(name).astype(str))
        values[name] = pd.to_numeric(pd.Series(text), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values[name]) | ((values[name] <= 0) if name == scale else False)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise MetadataError(
                f"{source}: column {name}, line(s) {', '.join(str(r + 2) for r in rows[:5])}: "
                f"not a {'positive ' if name == scale else ''}number ({str(text[rows[0]])!r})"
            )
    xy = np.stack([values[x] * values[scale], values[y] * values[scale]], axis=1)
    sections = column(section).astype(str)
    if "group_id" in available:  # a sample id two patients share (two cohorts pooled) is two sections
        sections = np.char.add(np.char.add(column("group_id").astype(str), "/"), sections)
    return sections, xy


def lattice_radius(sections: np.ndarray, xy_um: np.ndarray, rings: int = 1) -> float:
    """``rings`` rings of the spot lattice: ``rings + 0.2`` x the median distance from a spot to the nearest
    other spot of its section (one ring: Visium ~120 µm, HER2ST's ST sections ~225-235 µm)."""
    from scipy.spatial import cKDTree

    nearest = []
    for section in np.unique(sections):
        points = xy_um[sections == section]
        if len(points) > 1:
            distance, _ = cKDTree(points).query(points, k=2)
            nearest.append(distance[:, 1])
    if not nearest:
        raise MetadataError(
            "neighbourhood: no section has two spots to measure its lattice; set data.neighbourhood_um"
        )
    return (rings + RING_FACTOR - 1) * float(np.median(np.concatenate(nearest)))


def split_neighbourhoods(
    metadata, assignment: np.ndarray, radius_um: float | None, rings: int = 1
) -> tuple[dict, float]:
    """Each split's ``neighbourhood_matrix`` over its rows (in metadata order, as ``build_dataset_dict`` puts them)
    and the radius: ``radius_um``, else ``rings`` rings of the training rows' lattice. Positions are checked on
    the whole metadata first, so an error names the CSV's line. Splits of whole groups keep every section in
    one split; a section that a row-level split cuts is warned about (its neighbourhoods stop at the cut)."""
    import logging

    sections, xy = spot_positions(metadata)
    train = assignment == "train"
    radius = radius_um if radius_um is not None else lattice_radius(sections[train], xy[train], rings)
    matrices = {}
    for name in dict.fromkeys(assignment.tolist()):
        rows = np.flatnonzero(assignment == name)
        matrices[str(name)] = neighbourhood_matrix(sections[rows], xy[rows], radius)
    splits_per_section = pd.Series(assignment).groupby(sections).nunique()
    cut = splits_per_section.index[splits_per_section > 1].tolist()
    if cut:
        logging.getLogger("expreg").warning(
            f"{len(cut)} section(s) lie in more than one split ({', '.join(cut[:3])}): their spots' neighbourhoods "
            "hold only the spots of their own split"
        )
    return matrices, radius


def model_radius(config) -> float | None:
    """A saved model's neighbourhood radius in µm (the one it was trained with), None for a model without
    neighbourhood context; ``ValueError`` saying what to do when a neighbourhood model lacks it."""
    if getattr(config, "context", "none") != "neighbourhood":
        return None
    radius = getattr(config, "neighbourhood_um", None)
    if not radius:
        raise ValueError(
            "the model reads each spot's neighbourhood (context=neighbourhood) but its config.json records no radius "
            "(neighbourhood_um): set it there to the radius it was trained with, or train it again"
        )
    return float(radius)


def first_rows(matrix, n: int):
    """The neighbourhood matrix of the first ``n`` rows alone (a dry run's cut), rows averaging again."""
    import scipy.sparse as sp

    part = matrix[:n, :n].tocsr()
    part.data = np.ones_like(part.data)
    return sp.diags(1.0 / np.asarray(part.sum(axis=1)).ravel()) @ part


def neighbourhood_matrix(sections: np.ndarray, xy_um: np.ndarray, radius_um: float):
    """A row-normalised sparse ``(rows, rows)`` matrix: row i averages the spots of i's section within
    ``radius_um`` of it (i included). ``matrix @ features`` is each spot's neighbourhood mean."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(sections)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for section in np.unique(sections):
        index = np.flatnonzero(sections == section)
        pairs = cKDTree(xy_um[index]).query_pairs(radius_um, output_type="ndarray")
        if len(pairs):
            a, b = index[pairs[:, 0]], index[pairs[:, 1]]
            rows += [a, b]
            cols += [b, a]
    r, c = np.concatenate(rows), np.concatenate(cols)
    counts = np.bincount(r, minlength=n)
    return sp.csr_matrix((1.0 / counts[r], (r, c)), shape=(n, n))


def neighbourhood_features(
    features: np.ndarray, metadata, radius_um: float | None = None, rings: int = 1
) -> tuple[np.ndarray, dict]:
    """``[features, neighbourhood mean of features]`` for every metadata row, and what was used: the radius
    and the mean number of spots per neighbourhood."""
    sections, xy = spot_positions(metadata)
    radius = radius_um if radius_um is not None else lattice_radius(sections, xy, rings)
    matrix = neighbourhood_matrix(sections, xy, radius)
    sizes = np.diff(matrix.indptr)
    info = {"neighbourhood_um": round(radius, 2), "mean_spots_per_neighbourhood": round(float(sizes.mean()), 2)}
    return np.hstack([features, matrix @ features]), info
