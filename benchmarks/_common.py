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


def load_config(args: argparse.Namespace, *extra: str):
    """The recipe of ``args`` on its data, with ``args.overrides`` and then ``extra`` applied."""
    from expreg.config import load_recipe

    return load_recipe(args.recipe, [f"data.metadata_csv={real_data(args.metadata_csv)}", *args.overrides, *extra])


def setup_run(args: argparse.Namespace):
    """What ``Trainer.setup`` builds first (``expreg.training.setup``): ``(cfg, accelerator, data, model)`` on the CPU."""
    from expreg.seeding import seed_everything
    from expreg.training.launch import build_accelerator
    from expreg.training.setup import setup_data, setup_model

    cfg = load_config(args)
    seed_everything(cfg.seed)
    accelerator = build_accelerator(cfg, cpu=True)
    data = setup_data(cfg, accelerator)
    return cfg, accelerator, data, setup_model(cfg, data.gene_names, data.target_stats)


def setup_trainer(cfg, accelerator, output_dir: str):
    """``Trainer(cfg, accelerator)`` after ``setup()``, its run directory under ``output_dir``.

    Built without an image cache of its own (``data.image_cache=false``): the benchmarks build the
    loaders they time with ``expreg.training.setup.setup_loaders`` and hand them over with
    ``start_epoch``.
    """
    import copy

    from expreg.training.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.logging.output_dir, cfg.data.image_cache = str(output_dir), False
    trainer = Trainer(cfg, accelerator)
    trainer.setup()
    return trainer


def start_epoch(trainer, epoch: int, loaders: dict, train_dl) -> None:
    """Make the next ``trainer.train_one_epoch()`` one whole epoch ``epoch`` over ``loaders``.

    ``loaders`` is a dict from ``setup_loaders`` (its ``train_sampler`` and ``train_transform`` are
    set to the epoch) and ``train_dl`` its training loader after ``accelerator.prepare``; the loop
    position starts afresh (a new ``TrainerState``: no batches done, no running loss).
    """
    from expreg.training.checkpoint import TrainerState

    trainer.data.loaders, trainer.train_dl = loaders, train_dl
    trainer.state = TrainerState(num_processes=trainer.accelerator.num_processes, epoch=epoch)


def bare_copy(trainer):
    """A model built like the trainer's, with its current weights, never prepared by accelerate (for bare loops)."""
    from expreg.training.setup import setup_model

    model = setup_model(trainer.cfg, trainer.data.gene_names, trainer.data.target_stats)
    model.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    return model


def predecode(paths: list[str], image_size: int, mean, std):
    """The images decoded, resized and normalised into one float tensor (what the bare loops read)."""
    import torch

    from expreg.data import ImageTransform, load_image

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
