"""Patch cutting from a whole-slide image: ``expreg.ingest.patches.iter_patches`` against a bare tifffile + zarr loop.

    python benchmarks/bench_prepare.py [--size 40000] [--spots 10000] [--repeats 3] [--um_per_px 0.5 0.25]
    python benchmarks/bench_prepare.py --size 8000 --spots 500          # quick mode

Writes once, into ``$EXPREG_CACHE`` (else ``~/.cache/expreg/bench``), a synthetic ``size x size``
px pyramidal TIFF like a scanner's (256-px JPEG tiles, levels 1, 1/2, 1/4, ... down to < 1,024 px)
with an H&E-like texture (eosin, pale stroma, haematoxylin nuclei, glass around the tissue), tile by
tile from a generator (the whole image is never in memory); the time it took is printed. Spot
positions: ``--spots`` on a hexagonal grid (200 px pitch = 100 µm at 0.5 µm/px) around the
centre, jittered by a few pixels, in random order.

For each ``--um_per_px`` (112 µm patches, 224 px out; 0.5: 224-px regions of level 0, no
resampling; 0.25: 448-px boxes, so level 1 is chosen and read as 224-px regions; add 0.3 for a
case resampled with LANCZOS: 373-px regions of level 0), side by side in one process, sides
alternated, medians of ``--repeats`` passes over all spots:

- expreg: ``open_slide`` + ``iter_patches`` (level choice, border check, white fill, resampling);
- bare: ``zarr.open(page.aszarr(), mode="r")[y0:y1, x0:x1]`` on the same level +
  ``Image.fromarray(...).resize((224, 224), LANCZOS)``.

Then the peak RSS of one expreg pass (and one bare pass), each in a fresh subprocess (VmHWM).
Targets: expreg / bare >= 0.8; expreg peak RSS < 2 GB.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, median, report  # noqa: E402

TILE = 256
PATCH_UM, PATCH_PX = 112.0, 224
TEXTURE = 2048  # period of the texture at level 0 (px)
QUALITY = 85


def cache_dir() -> Path:
    root = os.environ.get("EXPREG_CACHE")
    folder = Path(root) / "bench" if root else Path.home() / ".cache" / "expreg" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def periodic_field(rng, n: int, scale: float) -> np.ndarray:
    """Smooth periodic noise of unit variance: white noise low-passed (a Gaussian of ``scale`` px) by FFT."""
    spectrum = np.fft.rfft2(rng.standard_normal((n, n)))
    ky, kx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    spectrum *= np.exp(-2 * (np.pi * scale) ** 2 * (kx**2 + ky**2))
    field = np.fft.irfft2(spectrum, s=(n, n))
    return (field - field.mean()) / field.std()


def he_texture(n: int = TEXTURE, seed: int = 0) -> np.ndarray:
    """A periodic ``n x n`` uint8 RGB texture: eosin and pale stroma, haematoxylin nuclei (~8 px), grain."""
    rng = np.random.default_rng(seed)
    nuclei = periodic_field(rng, n, 3.0)[..., None] > 1.3
    stroma = 1 / (1 + np.exp(-3 * periodic_field(rng, n, 12.0)[..., None]))
    colour = stroma * np.array([232.0, 160, 200]) + (1 - stroma) * np.array([245.0, 215, 230])
    colour = np.where(nuclei, np.array([90.0, 50, 150]), colour) + rng.normal(0, 6, (n, n, 1))
    return np.clip(colour, 0, 255).astype(np.uint8)


def level_textures(levels: int) -> list[np.ndarray]:
    """The texture seen at every level (2 x 2 means), each still periodic."""
    textures = [he_texture()]
    for _ in range(levels - 1):
        t = textures[-1].astype(np.float32)
        textures.append(((t[0::2, 0::2] + t[1::2, 0::2] + t[0::2, 1::2] + t[1::2, 1::2]) / 4 + 0.5).astype(np.uint8))
    return textures


def tiles(size: int, level: int, texture: np.ndarray):
    """Yield the level's 256-px tiles row by row: texture inside a smooth tissue outline, glass outside."""
    factor, n = 2**level, texture.shape[0]
    side = size // factor
    offsets = np.arange(TILE)
    for ty in range(0, side, TILE):
        rows = (ty + offsets) % n
        band = texture[rows]
        y = (ty + offsets)[:, None] * factor / size - 0.5
        for tx in range(0, side, TILE):
            tile = band[:, (tx + offsets) % n]
            x = (tx + offsets)[None, :] * factor / size - 0.5
            tissue = (x**2 + y**2 + 0.05 * np.sin(40 * x) * np.cos(30 * y)) < 0.16
            yield np.where(tissue[..., None], tile, np.uint8(242))


def synthetic_slide(size: int) -> Path:
    """The cached synthetic pyramid of ``size`` px (written once; see the module docstring)."""
    import tifffile

    path = cache_dir() / f"synthetic_he_{size}px_jpeg{QUALITY}_v1.tif"
    if path.is_file():
        print(f"synthetic slide: {path} (cached, {path.stat().st_size / 1e6:.0f} MB)")
        return path
    levels = 1
    while size // 2**levels >= 1024:
        levels += 1
    textures, start = level_textures(levels), time.perf_counter()
    partial = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(partial, bigtiff=size > 20000) as writer:
        for level in range(levels):
            side = size // 2**level
            writer.write(
                tiles(size, level, textures[level]),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": QUALITY},
                subfiletype=1 if level else 0,
                maxworkers=2,
            )
    partial.rename(path)
    print(
        f"synthetic slide: wrote {path} ({levels} levels, {path.stat().st_size / 1e6:.0f} MB) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return path


def spot_positions(size: int, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` spots on a hexagonal grid around the centre (pitch 200 px or less), jittered, shuffled."""
    rng = np.random.default_rng(seed)
    per_row = int(np.ceil(np.sqrt(count)))
    pitch = min(200.0, (size - 1200) / per_row)
    row, col = np.divmod(np.arange(count), per_row)
    xs = size / 2 + (col - per_row / 2 + 0.5 * (row % 2)) * pitch
    ys = size / 2 + (row - per_row / 2) * pitch * np.sqrt(3) / 2
    order = rng.permutation(count)
    jitter = rng.integers(-3, 4, (2, count))
    return np.round(xs[order]) + jitter[0], np.round(ys[order]) + jitter[1]


def expreg_pass(path: Path, xs, ys, um_per_px: float) -> int:
    """One pass of expreg's side; returns the number of patches."""
    from expreg.ingest.images import open_slide
    from expreg.ingest.patches import PatchGeometry, iter_patches

    geom = PatchGeometry(PATCH_UM, PATCH_PX, um_per_px)
    done = 0
    with open_slide(path) as slide:
        for _, image, _ in iter_patches(slide, xs, ys, geom, progress=False):
            done += image is not None
    return done


def bare_pass(path: Path, xs, ys, um_per_px: float) -> int:
    """One pass of the bare loop: zarr region of the level expreg would choose + Pillow resize."""
    import tifffile
    import zarr
    from PIL import Image

    side = round(PATCH_UM / um_per_px)
    with tifffile.TiffFile(path) as tif:
        pages = [tif.series[0].levels[i].keyframe for i in range(len(tif.series[0].levels))]
        factors = [pages[0].imagewidth / p.imagewidth for p in pages]
        level = max(i for i, f in enumerate(factors) if f <= side / PATCH_PX * 1.01)
        array, factor, done = zarr.open(pages[level].aszarr(), mode="r"), factors[level], 0
        n = round(side / factor)
        for x, y in zip(xs.tolist(), ys.tolist()):
            x0, y0 = round((x - side // 2) / factor), round((y - side // 2) / factor)
            region = array[y0 : y0 + n, x0 : x0 + n]
            Image.fromarray(region).resize((PATCH_PX, PATCH_PX), Image.Resampling.LANCZOS)
            done += 1
    return done


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak(args, side: str, um_per_px: float) -> float:
    """Peak RSS (MB) of one pass of ``side`` in a fresh Python process."""
    command = [sys.executable, __file__, "--size", str(args.size), "--spots", str(args.spots)]
    command += ["--child", side, "--um_per_px", str(um_per_px)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run_child(args) -> None:
    path = synthetic_slide(args.size)
    xs, ys = spot_positions(args.size, args.spots)
    (expreg_pass if args.child == "expreg" else bare_pass)(path, xs, ys, args.um_per_px[0])
    print(f"{peak_rss_mb():.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=40000, help="slide side in px (default 40000)")
    parser.add_argument("--spots", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--um_per_px", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--child", choices=["expreg", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    path = synthetic_slide(args.size)
    xs, ys = spot_positions(args.size, args.spots)
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{args.size} x {args.size} px slide, {args.spots} spots, {PATCH_UM:g} um -> {PATCH_PX} px patches")
    ratios = {}
    for um_per_px in args.um_per_px:

        def rate(fn, um_per_px=um_per_px) -> float:
            start = time.perf_counter()
            done = fn(path, xs, ys, um_per_px)
            return done / (time.perf_counter() - start)

        for fn in (expreg_pass, bare_pass):  # warm-up: imports, file cache
            fn(path, xs[:200], ys[:200], um_per_px)
        values = alternate(
            {
                f"bare zarr region + Pillow resize, {um_per_px:g} um/px": lambda: rate(bare_pass),
                f"expreg iter_patches, {um_per_px:g} um/px": lambda: rate(expreg_pass),
            },
            args.repeats,
            warmup=False,
        )
        print(
            f"\n{um_per_px:g} um/px ({PATCH_UM / um_per_px:.0f} level-0 px per patch); patches/s, median of {args.repeats}"
        )
        report(values, "patch/s")
        bare, ours = (median(v) for v in values.values())
        ratios[um_per_px] = ours / bare
    print()
    for um_per_px, ratio in ratios.items():
        print(f"expreg / bare at {um_per_px:g} um/px = {ratio:.2f} (target >= 0.8)")
    for um_per_px in args.um_per_px:
        ours, bare = child_peak(args, "expreg", um_per_px), child_peak(args, "bare", um_per_px)
        print(f"peak RSS of one pass at {um_per_px:g} um/px: expreg {ours:.0f} MB (target < 2048), bare {bare:.0f} MB")


if __name__ == "__main__":
    main()
