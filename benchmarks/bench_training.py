"""Training-loop efficiency: expreg's end-to-end training throughput against the compute limit.

    python benchmarks/bench_training.py [--repeats 3] [--workers 0 2] [--metadata_csv CSV] [recipe overrides ...]

expreg side: whole epochs of ``Trainer.train_one_epoch`` (``expreg.training.trainer``), the loop
``run_regression.py`` runs: image files -> ``datasets`` -> ``ExpressionTransform`` (in DataLoader
workers, if any) -> Accelerate -> AdamW, with the recipe's backbone, image size, batch size and
augmentation (``recipes/her2st.yaml`` on the her2st_dev images by default), a ``Trainer`` set up
in a temporary output folder, each timed epoch started afresh on the loaders built below. It is measured decoding the
image files every epoch (``data.image_cache=false``) and reading the decoded-image cache
(``data.image_cache=true``, built before the timing starts), each with every ``--workers``
count (DataLoader worker processes).

Baseline (the compute limit): a bare PyTorch loop over the same training images, decoded,
resized and normalised into one in-memory tensor beforehand, with the same model, batch sizes,
optimizer, gradient clipping and loss, and no augmentation.

Sides alternate within one process (medians of ``--repeats`` epochs each, after one warm-up
epoch); throughput is training images per second. The ratios are printed last.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    alternate,
    bare_copy,
    environment,
    load_config,
    median,
    predecode,
    recipe_parser,
    report,
    setup_trainer,
    start_epoch,
    timed,
)


def _bare_epoch(model, optimizer, pixels, labels, sizes: list[int], epoch: int, max_grad_norm) -> int:
    import torch

    model.train()
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(epoch))
    start = 0
    for size in sizes:
        index = order[start : start + size]
        start += size
        loss = model(pixel_values=pixels[index], labels=labels[index]).loss
        loss.backward()
        if max_grad_norm:  # the recipe's optimisation includes clipping: the same work on both sides
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return start


def main() -> None:
    parser = recipe_parser(__doc__, repeats=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to compare")
    args = parser.parse_args()

    import copy

    import torch

    from expreg.data import image_files
    from expreg.training.launch import build_accelerator
    from expreg.training.setup import setup_image_cache, setup_loaders

    cfg = load_config(args)
    accelerator = build_accelerator(cfg, cpu=True)
    with tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryDirectory() as output_dir:
        # the run's model, AdamW, LR schedule and loop (seeded as a run); the loaders timed are built below
        trainer = setup_trainer(cfg, accelerator, output_dir)
        cfg, data = copy.deepcopy(trainer.cfg), trainer.data
        model = accelerator.unwrap_model(trainer.model)
        bare_model = bare_copy(trainer)
        train_set = data.datasets["train"]
        pixels = predecode(
            image_files(train_set), cfg.data.image_size, model.config.image_mean, model.config.image_std
        )
        labels = torch.from_numpy(data.target_stats.normalize(train_set.with_format("numpy")["labels"]))
        loaders = {}
        for workers in args.workers:
            for cached in (False, True):
                cfg.data.image_cache, cfg.data.image_cache_dir, cfg.data.num_workers = cached, cache_dir, workers
                image_cache = setup_image_cache(cfg, data, accelerator)  # built here, before any timing
                loaders[workers, cached] = setup_loaders(cfg, data, model, 1, image_cache)
        bare_optimizer = torch.optim.AdamW(
            bare_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        n_train = len(data.datasets["train"])
        prepared = {key: accelerator.prepare(loader["train"]) for key, loader in loaders.items()}
        sizes = list(next(iter(loaders.values()))["train_sampler"].sizes)
        counter = {"epoch": 0}

        def expreg_epoch(key) -> float:
            start_epoch(trainer, counter["epoch"], loaders[key], prepared[key])
            counter["epoch"] += 1
            return n_train / timed(trainer.train_one_epoch)

        def bare_epoch() -> float:
            counter["epoch"] += 1
            return n_train / timed(
                lambda: _bare_epoch(
                    bare_model, bare_optimizer, pixels, labels, sizes, counter["epoch"], cfg.train.max_grad_norm
                )
            )

        sides = {BARE: bare_epoch}
        for key in loaders:
            sides[_name(*key)] = lambda key=key: expreg_epoch(key)
        values = alternate(sides, args.repeats)
    d = cfg.data
    print(environment())
    print(
        f"{cfg.model.backbone}, {d.image_size} px, batch {d.batch_size}, {n_train} training images "
        f"({d.metadata_csv}), dihedral={d.augment_dihedral}, hed_jitter={d.hed_jitter}, fp32; "
        f"images/s, median of {args.repeats} epochs"
    )
    report(values, "img/s")
    bare = median(values[BARE])
    print()
    for key in loaders:
        print(f"{_name(*key)} / bare loop = {median(values[_name(*key)]) / bare:.2f} (target >= 0.90)")


BARE = "bare loop, pre-decoded tensors (compute limit)"


def _name(workers: int, cached: bool) -> str:
    return f"expreg, {'decoded-image cache' if cached else 'decoding files'}, {workers} workers"


if __name__ == "__main__":
    main()
