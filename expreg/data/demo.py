"""A synthetic histology-like dataset with a planted image -> expression signal.

Each patch is a pink (eosin-like) background with purple (haematoxylin-like) "nuclei". Three
hidden factors per patch set how purple the stroma is, how many nuclei there are and how large
they are; each gene's expression is a fixed nonlinear mix of those factors plus noise and a
per-patient offset. A model that sees colour and texture can therefore learn to predict
expression, and a model that cannot, cannot: a real signal, not a lookup table.

Generated deterministically (same arguments -> byte-identical files), by ``make_synthetic_dataset``
and, for the demo recipe, once into a cache folder by ``ensure_demo_dataset``. Owns that generator,
the cache folder (``default_cache_dir``) and ``resolve_metadata_csv``, which turns the config's
``data.metadata_csv=demo`` into the demo dataset's CSV.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from expreg.config import DEMO_DATA

DEMO_VERSION = 1
DEMO_DEFAULTS = {"num_groups": 8, "samples_per_group": 60, "image_size": 64, "num_genes": 50, "seed": 0}


def _render_patch(rng: np.random.Generator, factors: np.ndarray, size: int) -> np.ndarray:
    """One RGB uint8 patch from hidden factors ``(stain, density, nucleus_size)`` in [0, 1]."""
    stain, density, nucleus = factors
    eosin = np.array([236, 170, 200], dtype=np.float64)
    haem = np.array([120, 70, 160], dtype=np.float64)
    background = (1 - 0.6 * stain) * eosin + 0.6 * stain * haem
    img = np.broadcast_to(background, (size, size, 3)).copy()
    img += rng.normal(0, 6, size=(size, size, 1))  # stromal texture
    yy, xx = np.mgrid[0:size, 0:size]
    n_nuclei = int(round(2 + density * 0.012 * size * size))
    radius = size * (0.025 + 0.05 * nucleus)
    centers = rng.uniform(0, size, size=(n_nuclei, 2))
    radii = radius * rng.uniform(0.7, 1.3, size=n_nuclei)
    nuclei = np.zeros((size, size), dtype=bool)
    for (cy, cx), r in zip(centers, radii):
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[nuclei] = np.array([70, 40, 120]) + rng.normal(0, 8, size=(int(nuclei.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _expression(rng, factors: np.ndarray, num_genes: int, group_offsets: np.ndarray) -> np.ndarray:
    """log1p-like non-negative expression: nonlinear in the factors, plus noise and patient offset."""
    weights = rng.normal(0, 1.0, size=(3, num_genes))
    weights[:, : num_genes // 10] *= 0.05  # a few genes carry (almost) no image signal
    inter = rng.normal(0, 0.5, size=num_genes)
    base = rng.uniform(0.5, 2.0, size=num_genes)
    signal = factors @ weights + (factors[:, 0] * factors[:, 1])[:, None] * inter
    signal = (signal - signal.mean(0)) / (signal.std(0) + 1e-9)
    noise = rng.normal(0, 0.6, size=signal.shape)
    return np.log1p(np.exp(base + signal + noise + group_offsets))  # softplus keeps it positive


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_groups: int = 8,
    samples_per_group: int = 60,
    image_size: int = 64,
    num_genes: int = 50,
    seed: int = 0,
    image_format: str = "png",
    image_dir: str = "images",
    csv_name: str = "metadata.csv",
    write_gene_names: bool = True,
    neighbourhood_effect: float = 0.0,
    positions: bool = False,
) -> Path:
    """Write ``images/``, ``metadata.csv`` and ``genes.txt`` into ``out_dir``; return the CSV path.

    Groups are named ``P00, P01, ...`` (patients) and have slightly different sizes and factor
    distributions, as real patients do.

    ``neighbourhood_effect`` ``w`` in [0, 1): a positive control for spatial context. Each group is then one
    section whose spots lie on a square lattice (``x_px``, ``y_px``, ``um_per_px`` columns: 100 µm apart),
    and expression follows ``(1 - w)`` x the spot's own factors + ``w`` x the mean factors of its nearest
    lattice neighbours (not itself): a part no image of the spot alone shows. ``positions``: the lattice
    columns without an effect. Neither (the default) writes exactly the dataset it always did.
    """
    if not 0 <= neighbourhood_effect < 1:
        raise ValueError(f"neighbourhood_effect must be in [0, 1), got {neighbourhood_effect}")
    from PIL import Image

    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gene_rng = np.random.default_rng([seed, 1])
    rows, all_factors, groups = [], [], []
    for g in range(num_groups):
        n = max(2, samples_per_group + int(rng.integers(-samples_per_group // 4, samples_per_group // 4 + 1)))
        shift = rng.uniform(-0.15, 0.15, size=3)
        factors = np.clip(rng.uniform(0, 1, size=(n, 3)) + shift, 0, 1)
        for i in range(n):
            name = f"{image_dir}/P{g:02d}_{i:04d}.{image_format}"
            Image.fromarray(_render_patch(rng, factors[i], image_size)).save(out / name)
            rows.append(name)
        all_factors.append(factors)
        groups += [f"P{g:02d}"] * n
    factors = np.concatenate(all_factors)
    positions = _lattice_positions(groups) if positions or neighbourhood_effect else None
    if neighbourhood_effect:
        around = _neighbour_means(factors, groups, positions)
        factors = (1 - neighbourhood_effect) * factors + neighbourhood_effect * around
    group_offset = dict(zip(sorted(set(groups)), rng.normal(0, 0.2, num_groups)))
    offsets = np.array([group_offset[x] for x in groups])
    y = _expression(gene_rng, factors, num_genes, offsets[:, None])
    _write_csv(out / csv_name, rows, groups, y, positions)
    if write_gene_names:
        (out / "genes.txt").write_text("\n".join(f"GENE{k:02d}" for k in range(num_genes)) + "\n", encoding="utf-8")
    return out / csv_name


def _write_csv(path: Path, rows: list[str], groups: list[str], y: np.ndarray, positions: np.ndarray | None) -> None:
    header = ",".join(["path", "group_id"] + [f"y{k}" for k in range(y.shape[1])] + ["sample_id"])
    lines = [header + (",x_px,y_px,um_per_px" if positions is not None else "")]
    for i, (name, gid, values) in enumerate(zip(rows, groups, y)):
        place = [] if positions is None else [str(positions[i, 0]), str(positions[i, 1]), str(DEMO_UM_PER_PX)]
        lines.append(",".join([name, gid] + [f"{v:.6f}" for v in values] + [f"{gid}_s1", *place]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


DEMO_PITCH_PX, DEMO_UM_PER_PX = 200, 0.5  # the positive control's lattice: 100 µm between spots


def _lattice_positions(groups: list[str]) -> np.ndarray:
    """Each group's spots on a square lattice, row by row, as wide as the square root of its spot count."""
    positions = np.zeros((len(groups), 2), dtype=np.int64)
    names = np.asarray(groups)
    for group in dict.fromkeys(groups):
        rows = np.flatnonzero(names == group)
        width = int(np.ceil(np.sqrt(len(rows))))
        index = np.arange(len(rows))
        positions[rows] = np.stack([index % width, index // width], axis=1) * DEMO_PITCH_PX
    return positions


def _neighbour_means(factors: np.ndarray, groups: list[str], positions: np.ndarray) -> np.ndarray:
    """The mean factors of each spot's nearest lattice neighbours in its own group (itself excluded)."""
    names = np.asarray(groups)
    means = np.empty_like(factors)
    for i in range(len(factors)):
        near = (names == names[i]) & (np.abs(positions - positions[i]).sum(axis=1) == DEMO_PITCH_PX)
        means[i] = factors[near].mean(axis=0) if near.any() else factors[i]
    return means


def default_cache_dir() -> Path:
    """``$EXPREG_CACHE`` or ``~/.cache/expreg``."""
    return Path(os.environ.get("EXPREG_CACHE", Path.home() / ".cache" / "expreg"))


def ensure_demo_dataset(cache_dir: str | os.PathLike | None = None, **overrides) -> Path:
    """Generate the demo dataset once into the cache (atomically) and return its metadata CSV.

    The folder name encodes the generator version and arguments, so a change of either makes a
    new folder instead of reusing stale files.
    """
    params = {**DEMO_DEFAULTS, **overrides}
    key = hashlib.sha1(json.dumps({"v": DEMO_VERSION, **params}, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"demo_{key}"
    if (target / "metadata.csv").is_file():
        return target / "metadata.csv"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo_tmp_", dir=root))
    try:
        make_synthetic_dataset(tmp, **params)
        (tmp / "params.json").write_text(json.dumps({"version": DEMO_VERSION, **params}, indent=2) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "metadata.csv").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "metadata.csv"


def resolve_metadata_csv(metadata_csv: str) -> str:
    """The metadata CSV a config names: the demo dataset's (made once) for ``DEMO_DATA``, else unchanged."""
    if metadata_csv == DEMO_DATA:
        return str(ensure_demo_dataset())
    return metadata_csv
