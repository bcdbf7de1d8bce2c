"""Whole-slide maps: ``expreg.map`` against a bare ``torch.inference_mode()`` loop over the same tiles, and peak RSS.

    python benchmarks/bench_map.py --uncached   # 50,000² px slide, 2,985 tiles: about 14 min on 2 cores
    python benchmarks/bench_map.py --quick      # 10,000² px slide, 196 tiles: < 60 s (checks the script)
    bash benchmarks/gpu_check.sh                # the GPU case: --device cuda, resnet50 at 224 px

Writes once, into ``--work_dir`` (default ``$EXPREG_CACHE/bench``, else ``~/.cache/expreg/bench``), a
synthetic ``--size`` ² px tiled JPEG TIFF (256-px tiles, quality 85) at 0.5 µm/px (XResolution
20,000 per centimetre), tile by tile from a generator (never the whole image in memory): white
glass (242) with three wavy discs of H&E-like texture covering ``--tissue_fraction`` of the slide;
levels 1, 1/4, 1/16, ... down to < 1,024 px as SubIFDs of page 0 (the layout vips, bfconvert and
OME-TIFF write); and the same slide with one level only (no pyramid), for the thumbnail's band by
band reduction. A ``--backbone`` (resnet18) with random weights at ``--image_size`` (112) px, 112 µm
/ 224 px patches and 50 genes is saved beside them.

Throughput, in one process, same model, same tiles, fp32, the process's torch threads, sides
alternated (the order rotates every round), medians of ``--repeats``:

- bare: the map's tiles read beforehand (``SlideTiles``: the same pixels and transform), stacked
  into batches of ``--batch_size`` in memory (on the device), ``model.eval()``, ``torch.inference_mode()``;
- expreg.map: ``plan_map`` once, then ``make_map`` per round with each of ``--workers`` DataLoader
  workers (each its own side; ``--uncached`` adds the first without the block cache of
  ``expreg.maps.tiles``); tiles/s over ``summary["seconds_predict"]`` (the ratio) and over the
  whole ``make_map`` (prediction and writing the tables and pictures).

Then where the time goes (thumbnail, tissue mask, grid, reading and transforming tiles, collation,
model forward, writing), and the peak RSS of ``python -m expreg.map`` in a fresh process on the
pyramid and on the one-level slide (``RUSAGE_CHILDREN`` of a small parent process: the largest
process of the command's tree, DataLoader workers included). Before anything is timed,
``SlideTiles`` is checked to give exactly ``cut_box``'s pixels. Targets: map / bare >= 0.9 on the
CPU with a small backbone; peak RSS < 2 GB on a 50,000² px slide.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, alternate, environment, median, report  # noqa: E402
from bench_prepare import he_texture  # noqa: E402

TILE = 256
QUALITY = 85
UM_PER_PX = 0.5
LEVEL_FACTOR = 4
GLASS = 242
PATCH_UM, PATCH_PX = 112.0, 224
GENES = 50
CENTRES = ((0.30, 0.30), (0.70, 0.38), (0.42, 0.72))  # tissue discs, in slide fractions
WAVE = 0.06  # relative amplitude of the discs' wavy edge (5 waves); adds WAVE**2 / 2 to their area
MAX_FRACTION = 0.3  # beyond this the discs would touch each other or the slide's edge


def cache_dir(work_dir: str | None) -> Path:
    if work_dir:
        folder = Path(work_dir)
    else:
        root = os.environ.get("EXPREG_CACHE")
        folder = Path(root) / "bench" if root else Path.home() / ".cache" / "expreg" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def disc_radius(fraction: float) -> float:
    """Radius (in slide sides) of each of the ``CENTRES`` discs so that together they cover ``fraction``."""
    return math.sqrt(fraction / (len(CENTRES) * math.pi * (1 + WAVE**2 / 2)))


def tissue(xn: np.ndarray, yn: np.ndarray, radius: float) -> np.ndarray:
    """Boolean tissue at slide fractions ``(xn, yn)`` (broadcast): inside one of the wavy discs."""
    inside = np.zeros(np.broadcast_shapes(xn.shape, yn.shape), dtype=bool)
    for k, (cx, cy) in enumerate(CENTRES):
        dx, dy = xn - cx, yn - cy
        edge = radius * (1 + WAVE * np.sin(5 * np.arctan2(dy, dx) + k))
        inside |= dx**2 + dy**2 < edge**2
    return inside


def level_texture(texture: np.ndarray, factor: int) -> np.ndarray:
    """The periodic texture as seen at a level of downsample ``factor`` (block means)."""
    n = texture.shape[0] // factor
    blocks = texture.astype(np.float32).reshape(n, factor, n, factor, 3).mean(axis=(1, 3))
    return (blocks + 0.5).astype(np.uint8)


def tiles(size: int, factor: int, texture: np.ndarray, radius: float):
    """Yield one level's 256-px tiles row by row: the texture inside the discs, glass elsewhere."""
    side, n = -(-size // factor), texture.shape[0]
    glass = np.full((TILE, TILE, 3), GLASS, dtype=np.uint8)
    offsets = np.arange(TILE)
    reach = radius * (1 + WAVE) + TILE * factor * 1.5 / size  # a tile farther than this from every centre is glass
    for ty in range(0, side, TILE):
        yn = ((ty + offsets)[:, None] + 0.5) * factor / size
        band = texture[(ty + offsets) % n]
        for tx in range(0, side, TILE):
            xn = ((tx + offsets)[None, :] + 0.5) * factor / size
            centre = ((tx + TILE / 2) * factor / size, (ty + TILE / 2) * factor / size)
            if all(math.hypot(centre[0] - cx, centre[1] - cy) > reach for cx, cy in CENTRES):
                yield glass
                continue
            inside = tissue(xn, yn, radius)
            yield np.where(inside[..., None], band[:, (tx + offsets) % n], np.uint8(GLASS))


def synthetic_slide(folder: Path, size: int, fraction: float, pyramid: bool = True) -> Path:
    """The cached synthetic slide (module docstring); written once, via a ``.partial`` file."""
    import tifffile

    kind = "pyramid" if pyramid else "onelevel"
    path = folder / f"map_{size}px_tissue{fraction:g}_{kind}_v1.tif"
    if path.is_file():
        print(f"slide: {path} (cached, {path.stat().st_size / 1e6:.0f} MB)")
        return path
    factors = [1]
    while pyramid and size // (factors[-1] * LEVEL_FACTOR) >= 1024:
        factors.append(factors[-1] * LEVEL_FACTOR)
    texture, radius, start = he_texture(), disc_radius(fraction), time.perf_counter()
    per_cm = 1e4 / UM_PER_PX
    options = dict(
        dtype=np.uint8,
        tile=(TILE, TILE),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": QUALITY},
        resolutionunit="CENTIMETER",
        maxworkers=2,
    )
    partial = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(partial, bigtiff=size > 20000) as writer:
        for level, factor in enumerate(factors):
            side = -(-size // factor)
            writer.write(
                tiles(size, factor, level_texture(texture, factor), radius),
                shape=(side, side, 3),
                resolution=(per_cm / factor, per_cm / factor),
                subifds=len(factors) - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                **options,
            )
    partial.rename(path)
    print(
        f"slide: wrote {path} ({len(factors)} level(s), {path.stat().st_size / 1e6:.0f} MB) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return path


def saved_model(folder: Path, backbone: str, image_size: int) -> Path:
    """A model with random weights and the geometry of 112 µm / 224 px patches, saved once."""
    path = folder / f"map_model_{backbone}_{image_size}px"
    if (path / "config.json").is_file():
        return path
    import torch

    from expreg.modeling.model import build_model

    torch.manual_seed(0)
    genes = [f"GENE{k:02d}" for k in range(GENES)]
    model = build_model(
        backbone,
        GENES,
        gene_names=genes,
        image_size=image_size,
        patch_um=PATCH_UM,
        patch_px=PATCH_PX,
        target_transform="log1p_cpm",
    )
    model.save_pretrained(path)
    return path


def tile_dataset(plan):
    """The map's own dataset of its tiles (``SlideTiles`` with the model's evaluation transform, as ``make_map``)."""
    from expreg.data import ImageTransform
    from expreg.maps.tiles import SlideTiles

    config, grid = plan.model.config, plan.grid
    transform = ImageTransform(config.image_size, config.image_mean, config.image_std, train=False)
    return SlideTiles(
        plan.slide.path,
        grid.x0,
        grid.y0,
        plan.geometry.box_px,
        plan.geometry.patch_px,
        plan.level,
        transform,
        grid.names(),
    )


def check_pixels(plan, tiles, count: int = 64) -> None:
    """``SlideTiles`` gives exactly ``cut_box``'s pixels (what ``expreg.prepare`` cuts) for tiles across the grid."""
    from expreg.ingest.images import open_slide
    from expreg.ingest.patches import cut_box

    picks = np.unique(np.linspace(0, len(tiles) - 1, min(count, len(tiles))).astype(int))
    with open_slide(plan.slide.path) as slide:
        for i in picks.tolist():
            box = (int(tiles.x0[i]), int(tiles.y0[i]), tiles.box_px, tiles.box_px)
            expected = np.asarray(cut_box(slide, box, tiles.level, tiles.patch_px))
            if not np.array_equal(np.asarray(tiles.image(i)), expected):
                sys.exit(f"SlideTiles and cut_box disagree on tile {i} ({tiles.names[i]})")
    print(f"pixels: SlideTiles == cut_box on {len(picks)} tiles across the grid")


def preread(tiles, batch_size: int, device) -> tuple[list, dict]:
    """The tiles read and transformed into batches in memory (the bare loop's input); ms/tile of each step."""
    import torch

    tiles[0]  # the transform's first call imports torchvision (seconds)
    read = transform = 0.0
    inputs = []
    for i in range(len(tiles)):
        start = time.perf_counter()
        image = tiles.image(i)
        middle = time.perf_counter()
        inputs.append(tiles.transform(image, tiles.names[i]))
        read, transform = read + middle - start, transform + time.perf_counter() - middle
    batches = [torch.stack(inputs[i : i + batch_size]).to(device) for i in range(0, len(inputs), batch_size)]
    return batches, {"read": 1e3 * read / len(tiles), "transform": 1e3 * transform / len(tiles)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_rate(model, batches, device) -> float:
    """Tiles/s of the bare loop: ``model.eval()``, ``torch.inference_mode()``, batches already in memory."""
    import torch

    model.eval()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = [model(pixel_values=batch).predictions.float() for batch in batches]
        torch.cat(outputs).cpu()
    sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def map_rate(plan, accelerator, workers: int, records: dict, cache: bool = True) -> float:
    """Tiles/s of ``make_map`` over its prediction (``seconds_predict``); the whole call is recorded too.

    ``cache=False``: tile-by-tile reads, as before the block cache (``expreg.maps.tiles.CACHE_BYTES = 0``).
    """
    from expreg.maps import tiles
    from expreg.maps.run import make_map

    plan.options.num_workers, kept = workers, tiles.CACHE_BYTES
    tiles.CACHE_BYTES = kept if cache else 0
    try:
        start = time.perf_counter()
        summary = make_map(plan, accelerator, progress=False)
        whole = time.perf_counter() - start
    finally:
        tiles.CACHE_BYTES = kept
    records.setdefault((workers, cache), []).append({"predict": summary["seconds_predict"], "whole": whole})
    return summary["tiles"] / summary["seconds_predict"]


def uncached_read_ms(plan) -> float:
    """ms per tile of ``SlideTiles.image`` reading every tile region directly (no block cache)."""
    from expreg.maps import tiles

    kept, tiles.CACHE_BYTES = tiles.CACHE_BYTES, 0
    try:
        dataset = tile_dataset(plan)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset.image(i)
        return 1e3 * (time.perf_counter() - start) / len(dataset)
    finally:
        tiles.CACHE_BYTES = kept


def loader_rate(tiles, batch_size: int, workers: int) -> float:
    """Tiles/s of the map's DataLoader alone (reading, transform, collation; no model)."""
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    count = sum(len(batch) for batch in DataLoader(tiles, batch_size=batch_size, num_workers=workers))
    return count / (time.perf_counter() - start)


def planning_steps(plan) -> dict:
    """Seconds of what ``plan_map`` does before any tile: thumbnail, tissue mask, grid."""
    from expreg.maps.grid import make_grid
    from expreg.maps.tissue import detect_tissue

    slide, options = plan.slide, plan.options
    start = time.perf_counter()
    thumbnail = slide.thumbnail(options.thumbnail_px)
    thumbed = time.perf_counter()
    scale = (slide.size[0] / thumbnail.shape[1], slide.size[1] / thumbnail.shape[0])
    mask = detect_tissue(thumbnail, scale)
    masked = time.perf_counter()
    make_grid(slide.size, plan.geometry.box_px, plan.stride_um / plan.geometry.um_per_px, mask, options.min_tissue)
    return {"thumbnail": thumbed - start, "mask": masked - thumbed, "grid": time.perf_counter() - masked}


def writing_steps(plan, expression: np.ndarray) -> dict:
    """Seconds of writing the outputs: ``predictions.h5ad`` + ``.csv``, then the pictures."""
    from expreg.maps import outputs

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        outputs.write_tiles(Path(folder), plan, expression, {"benchmark": "bench_map.py"})
        tables = time.perf_counter()
        outputs.write_pictures(Path(folder), plan, expression, progress=False)
        return {"tables": tables - start, "pictures": time.perf_counter() - tables}


# Measures its child from a small process: a child forked straight from this benchmark (GBs of
# tiles in memory) would report this process's RSS as its own peak (Linux keeps the forking
# process's high-water mark across exec).
RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def peak_rss(model_dir: Path, slide: Path, out_dir: Path, workers: int, args) -> dict:
    """Peak RSS (MB) and seconds of ``python -m expreg.map`` in a fresh process (module docstring)."""
    command = [sys.executable, "-m", "expreg.map", "--model", str(model_dir), "--slide", str(slide)]
    command += ["--out_dir", str(out_dir), "--overwrite", "--num_workers", str(workers)]
    command += ["--batch_size", str(args.batch_size)]
    if args.draw_genes:
        command += ["--genes", ",".join(f"GENE{k:02d}" for k in range(args.draw_genes))]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log, peak = out_dir.with_name(out_dir.name + ".log"), out_dir.with_name(out_dir.name + ".maxrss")
    with open(log, "w") as handle:
        start = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-c", RSS_WRAPPER, str(peak), *command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}):\n{log.read_text()[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"mb": int(peak.read_text()) / 1024, "seconds": seconds, "tiles": summary["tiles"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=50000, help="slide side in px (default 50000)")
    parser.add_argument(
        "--tissue_fraction", type=float, default=0.06, help=f"share of the slide that is tissue (<= {MAX_FRACTION})"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers of the map sides"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--draw_genes",
        type=int,
        help="draw maps/<gene>.png of the first N genes only (default: all 50, as the command)",
    )
    parser.add_argument(
        "--work_dir", help="where the slides and the model are cached (default: ~/.cache/expreg/bench)"
    )
    parser.add_argument("--skip_rss", action="store_true", help="no peak-RSS runs of python -m expreg.map")
    parser.add_argument(
        "--uncached", action="store_true", help="add a side without the block cache (tile-by-tile reads, as before)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="10,000² px slide, 1 repeat, 0 and 1 workers, 4 gene maps (< 60 s)"
    )
    args = parser.parse_args(argv)
    args.rss_runs = [("pyramid", 0), ("pyramid", 2), ("one level", 2)]
    if args.quick:
        args.size, args.tissue_fraction, args.repeats, args.workers = 10000, 0.1, 1, [0, 1]
        args.draw_genes, args.rss_runs = args.draw_genes or 4, [("one level", 0)]
    if not 0 < args.tissue_fraction <= MAX_FRACTION:
        parser.error(f"--tissue_fraction must be in (0, {MAX_FRACTION}]")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/bench_map.py: no CUDA GPU here; skipped (--device cpu measures the CPU case)")
        return
    from expreg.inference import load_model
    from expreg.maps.plan import MapOptions, plan_map
    from expreg.training.launch import build_accelerator

    folder = cache_dir(args.work_dir)
    slide = synthetic_slide(folder, args.size, args.tissue_fraction)
    model_dir = saved_model(folder, args.backbone, args.image_size)
    accelerator = build_accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{environment()}; device {device} ({name}); load average {os.getloadavg()[0]:.2f} at start")
    model = load_model(str(model_dir))
    out_root = Path(tempfile.mkdtemp(prefix="bench_map-"))
    try:
        genes = list(model.config.gene_names)[: args.draw_genes] if args.draw_genes else None
        options = MapOptions(
            model=str(model_dir),
            slide=str(slide),
            out_dir=str(out_root / "map"),
            genes=genes,
            batch_size=args.batch_size,
        )
        start = time.perf_counter()
        plan = plan_map(options, model)
        plan_seconds = time.perf_counter() - start
        result = measure(args, plan, accelerator, device)
        result["plan"] = plan_seconds
        if not args.skip_rss:
            paths = {"pyramid": slide, "one level": synthetic_slide(folder, args.size, args.tissue_fraction, False)}
            result["rss"] = {
                (kind, w): peak_rss(model_dir, paths[kind], out_root / f"rss_{kind.replace(' ', '_')}_{w}", w, args)
                for kind, w in args.rss_runs
            }
        plan.slide.close()
        print_results(args, plan, result)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)


def measure(args, plan, accelerator, device) -> dict:
    """The alternated sides, then where the time goes (module docstring)."""
    model, n = plan.model.to(device), len(plan.grid)  # in place: make_map predicts with the same module
    print(
        f"{plan.slide.size[0]:,} x {plan.slide.size[1]:,} px slide, levels {plan.slide.level_sizes}; level "
        f"{plan.level} read; {n:,} tiles of {plan.geometry.box_px} px; tissue "
        f"{plan.tissue.fraction:.3f} of the slide (synthetic: {args.tissue_fraction:g})"
    )
    check_pixels(plan, tile_dataset(plan))  # each measurement reads through a fresh (cold) block cache
    batches, per_tile = preread(tile_dataset(plan), args.batch_size, device)
    bare_rate(model, batches[:2], device)  # warm-up
    records: dict = {}
    sides = {"bare inference_mode loop, tiles read beforehand": lambda: bare_rate(model, batches, device)}
    for w in args.workers:
        sides[f"expreg.map, {w} workers (prediction)"] = lambda w=w: map_rate(plan, accelerator, w, records)
    if args.uncached:
        w = args.workers[0]
        sides[f"expreg.map, {w} workers, no block cache"] = lambda: map_rate(plan, accelerator, w, records, False)
    values = alternate(sides, args.repeats, warmup=False)
    print(f"\ntiles/s, medians of {args.repeats} (alternated)")
    report(values, "tiles/s")
    return {
        "values": values,
        "records": records,
        "per_tile": per_tile,
        "uncached_read": uncached_read_ms(plan),
        "planning": planning_steps(plan),
        "loaders": {w: loader_rate(tile_dataset(plan), args.batch_size, w) for w in args.workers},
        "writing": writing_steps(plan, np.random.default_rng(0).normal(size=(n, len(plan.genes)))),
    }


def print_results(args, plan, result: dict) -> None:
    """The table of sides, where the time goes, the peak RSS, and the ratios last."""
    values, records, n = result["values"], result["records"], len(plan.grid)
    names = list(values)
    bare = median(values[names[0]])
    keys = [(w, True) for w in args.workers] + ([(args.workers[0], False)] if args.uncached else [])
    print(f"\n| side | tiles/s (median, min–max of {args.repeats}) | / bare | whole make_map, tiles/s |")
    print("|---|---|---|---|")
    print(f"| bare `inference_mode` loop, tiles read beforehand | {bare:.1f} | 1 | — |")
    for name, key in zip(names[1:], keys):
        vals, whole = values[name], median([r["whole"] for r in records[key]])
        print(
            f"| {name} | {median(vals):.1f} ({min(vals):.1f}–{max(vals):.1f}) | "
            f"{median(vals) / bare:.2f} | {n / whole:.1f} |"
        )
    print_breakdown(plan, result, 1e3 / bare)
    for (kind, w), rss in result.get("rss", {}).items():
        print(
            f"peak RSS of python -m expreg.map, {kind}, {w} workers: {rss['mb']:.0f} MB "
            f"({rss['tiles']:,} tiles, {rss['seconds']:.0f} s wall) (target < 2048 MB)"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end (another busy process on the machine skews every figure)")
    for name in names[1:]:
        print(f"{name} / bare = {median(values[name]) / bare:.2f} (target >= 0.9)")


def print_breakdown(plan, result: dict, forward: float) -> None:
    """Where the time goes, ms per tile unless seconds."""
    n, per_tile, loaders, steps = len(plan.grid), result["per_tile"], result["loaders"], result["planning"]
    print(f"\nwhere the time goes ({n:,} tiles; ms per tile unless seconds):")
    print(
        f"  plan_map {result['plan']:.2f} s: thumbnail {steps['thumbnail']:.2f} s, tissue mask {steps['mask']:.2f} s, "
        f"grid {steps['grid']:.3f} s (the rest: opening the slide, resolution tags)"
    )
    print(
        f"  reading a tile (SlideTiles.image: cut_box through the block cache)  {per_tile['read']:.2f} ms; "
        f"without the cache (a zarr region read per tile)  {result['uncached_read']:.2f} ms"
    )
    print(
        f"  model transform (resize to {plan.model.config.image_size} px, normalise)  {per_tile['transform']:.2f} ms"
    )
    for w, rate in loaders.items():
        extra = f"; collation {1e3 / rate - per_tile['read'] - per_tile['transform']:.2f} ms" if w == 0 else ""
        print(f"  DataLoader alone, {w} workers: {rate:.0f} tiles/s = {1e3 / rate:.2f} ms{extra}")
    print(f"  model forward (bare loop)  {forward:.2f} ms")
    if (0, True) in result["records"]:
        predict = 1e3 * median([r["predict"] for r in result["records"][(0, True)]]) / n
        print(
            f"  expreg.map prediction, 0 workers  {predict:.2f} ms = DataLoader {1e3 / loaders[0]:.2f} + forward "
            f"{forward:.2f} + the rest {predict - 1e3 / loaders[0] - forward:.2f}"
        )
    writing = result["writing"]
    print(
        f"  writing: predictions.h5ad + .csv {writing['tables']:.2f} s, pictures ({len(plan.drawn)} gene maps + "
        f"overview + thumbnail) {writing['pictures']:.2f} s"
    )


if __name__ == "__main__":
    main()
