"""Data pipeline: images/s of expreg's training DataLoader against a plain PIL ``Dataset``.

    python benchmarks/bench_data.py [--repeats 3] [--metadata_csv CSV] [recipe overrides ...]

expreg side: the training DataLoader ``run_regression.py`` builds for the recipe
(``recipes/her2st.yaml`` on the her2st_dev images by default): ``datasets`` rows ->
``ExpressionTransform`` (decode, resize, dihedral + stain augmentation, normalise) in the
recipe's DataLoader workers -> batches; once decoding the image files, once reading the
decoded-image cache (``data.image_cache=true``, built before the timing).

Baseline: a plain ``torch.utils.data.Dataset`` that opens the same files with PIL and applies
the same ``ImageTransform``, with the same batch size, workers and shuffling.

Also measured: how many images/s the recipe's backbone consumes in training (forward +
backward + AdamW on random tensors of the recipe's size), the rate the pipeline has to beat.
Sides alternate in one process; medians of ``--repeats`` full passes over the training split.
The ratios are printed last.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, median, recipe_parser, report, setup_run  # noqa: E402


class PlainImages:
    """The obvious alternative: PIL opens the file, the same transform runs, default collation."""

    def __init__(self, paths: list[str], labels, transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"), self.paths[i]), self.labels[i]


def images_per_second(loader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["labels"] if isinstance(batch, dict) else batch[1])
    return count / (time.perf_counter() - start)


def backbone_rate(model, batch_size: int, image_size: int, steps: int = 4) -> float:
    """Training images/s of the model alone on in-memory tensors (forward, backward, AdamW)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch_size, 3, image_size, image_size), torch.randn(batch_size, model.config.num_genes)
    model.train()
    rates = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rates.append(batch_size / (time.perf_counter() - start))
    return median(rates[1:])  # the first step warms up


def main() -> None:
    args = recipe_parser(__doc__, repeats=3).parse_args()

    import torch
    from torch.utils.data import DataLoader

    from expreg.data import image_files
    from expreg.training.setup import setup_image_cache, setup_loaders

    cfg, accelerator, data, model = setup_run(args)
    d = cfg.data
    train_set = data.datasets["train"]
    paths = image_files(train_set)
    labels = torch.from_numpy(data.target_stats.normalize(train_set.with_format("numpy")["labels"]))
    with tempfile.TemporaryDirectory() as cache_dir:
        loaders = {}
        for cached in (False, True):
            d.image_cache, d.image_cache_dir = cached, cache_dir
            loaders[cached] = setup_loaders(cfg, data, model, 1, setup_image_cache(cfg, data, accelerator))
        transform = loaders[False]["train_transform"].image_transform
        plain = DataLoader(
            PlainImages(paths, labels, transform),
            batch_size=d.batch_size,
            shuffle=True,
            num_workers=d.num_workers,
            generator=torch.Generator().manual_seed(0),
        )
        values = alternate(
            {
                "plain PIL Dataset (same transform)": lambda: images_per_second(plain),
                "expreg DataLoader, decoding image files": lambda: images_per_second(loaders[False]["train"]),
                "expreg DataLoader, decoded-image cache": lambda: images_per_second(loaders[True]["train"]),
            },
            args.repeats,
        )
    consumed = backbone_rate(model, d.batch_size, d.image_size)
    print(environment())
    print(
        f"{len(paths)} training images ({d.metadata_csv}), {d.image_size} px, batch {d.batch_size}, "
        f"{d.num_workers} workers, dihedral={d.augment_dihedral}, hed_jitter={d.hed_jitter}, "
        f"color_jitter={d.color_jitter}; images/s, median of {args.repeats} passes"
    )
    report(values, "img/s")
    print(f"  {cfg.model.backbone + ' training consumes (forward+backward+AdamW)':<52}{consumed:8.1f} img/s")
    plain_rate = median(values["plain PIL Dataset (same transform)"])
    files = median(values["expreg DataLoader, decoding image files"])
    cached = median(values["expreg DataLoader, decoded-image cache"])
    print()
    print(f"expreg (decoding files) / plain PIL Dataset = {files / plain_rate:.2f} (target >= 1.0)")
    print(f"expreg (decoded-image cache) / plain PIL Dataset = {cached / plain_rate:.2f}")
    print(f"expreg (decoding files) / backbone consumption = {files / consumed:.1f} (target >= 3)")
    print(f"expreg (decoded-image cache) / backbone consumption = {cached / consumed:.1f} (target >= 3)")


if __name__ == "__main__":
    main()
