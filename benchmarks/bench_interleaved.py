"""Training steps from expreg's loaders against bare steps, interleaved batch by batch (drift-free ratios).

    python benchmarks/bench_interleaved.py              # after bench_cohort.py's prepare part (~7 min on 2 cores)
    python benchmarks/bench_interleaved.py --pairs 4    # a quick check

``bench_cohort.py --parts train`` times each side as a block of batches, sides alternated: on a shared VM
whose speed drifts by 20 % within minutes, whole sides land in fast or slow stretches. Here every loader
step is paired with a bare step right before it (a batch decoded beforehand, the same model and
optimizer), so drift hits both alike: the ratio is bare time / loader-side time over ``--pairs`` pairs,
after 2 untimed pairs. With workers, loading overlaps both steps of a pair (what 2 workers cost the
model's threads is in the ratio).
"""

from __future__ import annotations

import argparse
import time

from _common import environment
from bench_cohort import _files, _map_model, _xy, reuse_prepared, targets_csv, work_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=None, help="bench_cohort.py's (default: $EXPREG_CACHE/bench)")
    parser.add_argument("--pairs", type=int, default=16, help="timed (bare step, loader step) pairs per loader")
    args = parser.parse_args(argv)
    import torch

    from expreg.data import build_dataloaders, load_expression_dataset
    from expreg.data.dataset import image_files
    from expreg.data.image_cache import ensure_image_cache
    from expreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image

    root = work_dir(args.work_dir)
    runs = reuse_prepared(root / "prepared")
    files, shards = runs["files, 2 workers"]["out"], runs["shards, 2 workers"]["out"]
    cohort = {
        "files": load_expression_dataset(targets_csv(files), seed=0),
        "shards": load_expression_dataset(targets_csv(shards), seed=0, patches=shards / "patches"),
    }
    paths = [p for part in cohort["shards"].values() for p in image_files(part)]
    cache = ensure_image_cache(paths, 112, cache_root=root / "image_cache", progress=False)
    loaders = {
        name: build_dataloaders(cohort[store], image_size=112, batch_size=32, num_workers=w, seed=0, image_cache=c)[
            "train"
        ]
        for name, store, w, c in (
            ("Parquet shards, 2 workers", "shards", 2, None),
            ("image files, 2 workers", "files", 2, None),
            ("Parquet shards, 0 workers", "shards", 0, None),
            ("image files, 0 workers", "files", 0, None),
            ("shards + image cache, 0 workers", "shards", 0, cache),
        )
    }
    model = _map_model(argparse.Namespace(backbone="resnet18", image_size=112, quick=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    first = [b for _, b in zip(range(args.pairs + 2), loaders["image files, 0 workers"])]
    transform = ImageTransform(112, IMAGENET_MEAN, IMAGENET_STD, train=False)
    bare = [
        (torch.stack([transform(load_image(str(p))[0], p) for p in _files(files, b["path"])]), b["labels"])
        for b in first
    ]

    def step(x, y) -> float:
        start = time.perf_counter()
        model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"interleaved training steps, resnet18 at 112 px, batches of 32, {args.pairs} pairs ({environment()})")
    for name, loader in loaders.items():
        batches, timed = iter(loader), {"bare": 0.0, "loader": 0.0}
        for i in range(args.pairs + 2):
            bare_s = step(*bare[i])
            start = time.perf_counter()
            step(*_xy(next(batches)))
            if i >= 2:  # the loader's start and the first steps: untimed
                timed["bare"] += bare_s
                timed["loader"] += time.perf_counter() - start
        ms = {k: 1e3 * v / args.pairs for k, v in timed.items()}
        print(
            f"  expreg, {name:32} {ms['loader']:5.0f} ms a step (fetch included), bare {ms['bare']:5.0f} ms: "
            f"ratio to bare {timed['bare'] / timed['loader']:.3f}"
        )
    print("  target: shards >= 0.95 x bare, and >= files")


if __name__ == "__main__":
    main()
