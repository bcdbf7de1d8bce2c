"""A spot's neighbourhood: the spots of its own section within a radius, from the metadata's positions.

Neighbourhood features (``expreg.cv --methods linear_probe_neighbourhood``) are a spot's embedding
beside the mean embedding of its neighbourhood (the spot itself included, so it is never empty).
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
RING_FACTOR = 1.2  # one ring of the lattice: the nearest spots (at the pitch), not the next ones (at >= 1.73x)


def spot_positions(metadata) -> tuple[np.ndarray, np.ndarray]:
    """``(section of each row, (rows, 2) positions in µm)`` from the metadata's position columns; a section
    is a ``group_id``'s ``sample_id`` (the same sample id under two groups is two sections)."""
    frame = metadata.frame
    names = next((c for c in POSITION_COLUMNS if all(n in frame.columns for n in c)), None)
    if names is None:
        raise MetadataError(
            f"{metadata.csv_path}: neighbourhood features need each spot's section and position: columns "
            + " or ".join(", ".join(c) for c in POSITION_COLUMNS)
            + " (expreg.prepare writes the first)"
        )
    section, x, y, scale = names
    values = {}
    for column in (x, y, scale):
        text = frame[column].astype(str).str.strip()
        values[column] = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values[column]) | ((values[column] <= 0) if column == scale else False)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise MetadataError(
                f"{metadata.csv_path}: column {column}, line(s) {', '.join(str(r + 2) for r in rows[:5])}: "
                f"not a {'positive ' if column == scale else ''}number ({text.iloc[rows[0]]!r})"
            )
    xy = np.stack([values[x] * values[scale], values[y] * values[scale]], axis=1)
    sections = frame[section].astype(str).to_numpy()
    if "group_id" in frame.columns:  # a sample id two patients share (two cohorts pooled) is two sections
        sections = np.char.add(np.char.add(frame["group_id"].astype(str).to_numpy().astype(str), "/"), sections)
    return sections, xy


def lattice_radius(sections: np.ndarray, xy_um: np.ndarray) -> float:
    """One ring of the spot lattice: ``RING_FACTOR`` x the median distance from a spot to the nearest other
    spot of its section (Visium: ~120 µm, ST: ~240 µm)."""
    from scipy.spatial import cKDTree

    nearest = []
    for section in np.unique(sections):
        points = xy_um[sections == section]
        if len(points) > 1:
            distance, _ = cKDTree(points).query(points, k=2)
            nearest.append(distance[:, 1])
    if not nearest:
        raise ValueError("neighbourhood: no section has two spots; set data.neighbourhood_um")
    return RING_FACTOR * float(np.median(np.concatenate(nearest)))


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


def neighbourhood_features(features: np.ndarray, metadata, radius_um: float | None = None) -> tuple[np.ndarray, dict]:
    """``[features, neighbourhood mean of features]`` for every metadata row, and what was used: the radius
    and the mean number of spots per neighbourhood."""
    sections, xy = spot_positions(metadata)
    radius = radius_um if radius_um is not None else lattice_radius(sections, xy)
    matrix = neighbourhood_matrix(sections, xy, radius)
    sizes = np.diff(matrix.indptr)
    info = {"neighbourhood_um": round(radius, 2), "mean_spots_per_neighbourhood": round(float(sizes.mean()), 2)}
    return np.hstack([features, matrix @ features]), info
