"""Shared by the benchmark scripts: where the data are, alternated timing, the environment line."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HER2ST = REPO.parent / "shared" / "data" / "her2st_dev" / "metadata.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def real_data(path: str | None) -> str:
    """The metadata CSV to benchmark on: ``path``, else the her2st_dev data beside the checkout."""
    chosen = Path(path) if path else HER2ST
    if not chosen.is_file():
        sys.exit(
            f"{chosen}: no such metadata CSV. Pass --metadata_csv (any CSV in the expreg format; "
            "`python -c 'from expreg.data.demo import ensure_demo_dataset as d; print(d())'` prints the demo data's)"
        )
    return str(chosen)


def recipe_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options the real-data benchmarks share: a recipe, its data, repeats and overrides."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "her2st.yaml"))
    parser.add_argument("--metadata_csv", default=None, help=f"default: {HER2ST}")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.num_workers=2")
    return parser


def setup_run(args: argparse.Namespace):
    """What ``expreg.train.run`` builds before training: ``(cfg, accelerator, data, model)`` on the CPU."""
    from expreg.config import load_recipe
    from expreg.seeding import seed_everything
    from expreg.training import trainer as train
    from expreg.training.launch import build_accelerator

    cfg = load_recipe(args.recipe, [f"data.metadata_csv={real_data(args.metadata_csv)}", *args.overrides])
    seed_everything(cfg.seed)
    accelerator = build_accelerator(cfg, cpu=True)
    data = train._setup_data(cfg, accelerator)
    return cfg, accelerator, data, train._setup_model(cfg, data)


def predecode(paths: list[str], image_size: int, mean, std):
    """The images decoded, resized and normalised into one float tensor (what the bare loops read)."""
    import torch

    from expreg.data.dataset import ImageTransform, load_image

    transform = ImageTransform(image_size, mean, std, train=False)
    return torch.stack([transform(load_image(path)[0], path) for path in paths])


def alternate(sides: dict, repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Call each side (a function returning a throughput) in turn, ``repeats`` rounds; returns all values.

    Alternating rounds spreads the drift of a shared machine over all sides alike, and the order
    rotates from round to round, so that no side always runs first (measured here: the first
    of two equal sides in a round ran ~4 % slower).
    """
    if warmup:
        for fn in sides.values():
            fn()
    names = list(sides)
    values: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            values[name].append(sides[name]())
    return values


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def environment() -> str:
    import torch

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}"
    )


def report(values: dict[str, list[float]], unit: str) -> None:
    """One line per side: median and the spread of the repeats."""
    for name, vals in values.items():
        print(f"  {name:<52}{median(vals):8.1f} {unit}  (min {min(vals):.1f}, max {max(vals):.1f}, n={len(vals)})")
