"""GPU check: mixed-precision training throughput through expreg against a bare loop, and the data pipeline.

    bash benchmarks/gpu_check.sh            # on a CUDA machine; skips cleanly without one
    python benchmarks/bench_gpu.py --smoke  # the same code on the CPU, tiny model (checks the script)

For each of bf16 and fp16 mixed precision, without and with ``channels_last``, one fresh
process (accelerate's precision is fixed per process) measures, alternating, medians of
``--repeats`` epochs after a warm-up epoch:

- expreg: ``Trainer.train_one_epoch`` (``expreg.training.trainer``: files -> ``datasets`` ->
  DataLoader workers -> Accelerate with the precision -> AdamW), decoding the image files and
  reading the decoded-image cache;
- bare: the same model, batch, optimizer and ``torch.autocast`` (+ ``GradScaler`` for fp16) over
  pre-decoded tensors already on the GPU (the compute limit).

Then the data pipeline alone (training DataLoader, all CPU cores as workers), images/s.
Data: ``--metadata_csv``, else a synthetic set of 224-px JPEG patches made in a temporary
folder. One table is printed; the ratios expreg / bare are its last column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, bare_copy, median, predecode, setup_trainer, start_epoch  # noqa: E402


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _bare_epoch(model, optimizer, scaler, pixels, labels, batch_size: int, dtype, device) -> float:
    import torch

    model.train()
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(len(pixels), device=pixels.device)
    for first in range(0, len(pixels) - batch_size + 1, batch_size):
        index = order[first : first + batch_size]
        with torch.autocast(device.type, dtype=dtype):
            loss = model(pixel_values=pixels[index], labels=labels[index]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (len(pixels) // batch_size) * batch_size / (time.perf_counter() - start)


def _config(args):
    """``recipes/base.yaml`` with this benchmark's data, model, batch, workers, precision and memory format."""
    from expreg.config import load_recipe

    overrides = [
        f"data.metadata_csv={args.metadata_csv}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"model.backbone={args.backbone}",
        "data.hed_jitter=0.05",
        f"train.channels_last={str(args.channels_last).lower()}",
        *([f"train.mixed_precision={args.precision}"] if args.precision else []),
    ]
    return load_recipe(str(REPO / "recipes" / "base.yaml"), overrides)


def one_setting(args) -> dict:
    """In this process: expreg (files, cache) and bare at one precision / memory format."""
    import copy

    import torch

    from expreg.data import image_files
    from expreg.training.launch import build_accelerator
    from expreg.training.setup import setup_image_cache, setup_loaders

    cfg = _config(args)
    accelerator = build_accelerator(cfg, cpu=args.smoke)
    device = accelerator.device
    with tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryDirectory() as output_dir:
        # the run's model (channels_last as the recipe says), AdamW, LR schedule and loop
        trainer = setup_trainer(cfg, accelerator, output_dir)
        cfg, data = copy.deepcopy(trainer.cfg), trainer.data
        model = accelerator.unwrap_model(trainer.model)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        bare_model = bare_copy(trainer).to(device, memory_format=memory_format)  # as Trainer.setup
        train_set = data.datasets["train"]
        paths = image_files(train_set)
        pixels = predecode(paths, args.image_size, model.config.image_mean, model.config.image_std)
        pixels = pixels.to(device, memory_format=memory_format)
        labels = torch.from_numpy(data.target_stats.normalize(train_set.with_format("numpy")["labels"])).to(device)

        loaders = {}
        for cached in (False, True):
            cfg.data.image_cache, cfg.data.image_cache_dir = cached, cache_dir
            loaders[cached] = setup_loaders(cfg, data, model, 1, setup_image_cache(cfg, data, accelerator))
        prepared = {cached: accelerator.prepare(loaders[cached]["train"]) for cached in loaders}
        # the same AdamW as the trainer's (recipe lr and weight decay): the same work on both sides
        bare_optimizer = torch.optim.AdamW(
            bare_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        epoch = {"n": 0}

        def expreg_epoch(cached: bool) -> float:
            start_epoch(trainer, epoch["n"], loaders[cached], prepared[cached])
            epoch["n"] += 1
            _sync(device)
            start = time.perf_counter()
            trainer.train_one_epoch()
            _sync(device)
            return len(paths) / (time.perf_counter() - start)

        sides = {
            "bare": lambda: _bare_epoch(
                bare_model, bare_optimizer, scaler, pixels, labels, args.batch_size, dtype, device
            ),
            "files": lambda: expreg_epoch(False),
            "cache": lambda: expreg_epoch(True),
        }
        from _common import alternate

        values = alternate(sides, args.repeats)
    return {name: median(v) for name, v in values.items()}


def pipeline_rate(args) -> dict:
    """The training DataLoader alone with ``--workers`` workers: images/s decoding files."""
    import torch  # noqa: F401

    from expreg.training.launch import build_accelerator
    from expreg.training.setup import setup_data, setup_loaders, setup_model

    cfg = _config(args)
    accelerator = build_accelerator(cfg, cpu=True)
    data = setup_data(cfg, accelerator)
    model = setup_model(cfg, data.gene_names, data.target_stats)
    loader = setup_loaders(cfg, data, model, 1)["train"]
    rates = []
    for _ in range(args.repeats + 1):
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch["labels"])
        rates.append(count / (time.perf_counter() - start))
    return {"pipeline": median(rates[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metadata_csv", default=None, help="default: synthetic 224-px JPEG patches")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4096, help="size of the synthetic training set")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all CPU cores)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with a tiny model (checks the script)")
    parser.add_argument("--precision", help=argparse.SUPPRESS)  # internal: one setting per process
    parser.add_argument("--channels_last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.image_size, args.batch_size, args.images = "test_resnet", 32, 8, 64
    args.workers = os.cpu_count() if args.workers is None else args.workers
    if args.precision or args.pipeline:
        print(json.dumps(pipeline_rate(args) if args.pipeline else one_setting(args)))
        return

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/bench_gpu.py: no CUDA GPU here; skipped (use --smoke to check the script on the CPU)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.metadata_csv is None:
            from expreg.data.demo import make_synthetic_dataset

            groups = 16
            args.metadata_csv = str(
                make_synthetic_dataset(
                    tmp, groups, args.images * 5 // 4 // groups, args.image_size, image_format="jpg"
                )
            )
        settings = [("bf16", False), ("bf16", True)] + ([] if args.smoke else [("fp16", False), ("fp16", True)])
        rows = []
        for precision, channels_last in settings:
            rows.append(
                (
                    (precision, channels_last),
                    _child(args, "--precision", precision, *(["--channels_last"] * channels_last)),
                )
            )
        pipeline = _child(args, "--pipeline")["pipeline"]
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    print(
        f"{device}; torch {torch.__version__}; {os.cpu_count()} CPU cores; {args.backbone} {args.image_size} px, "
        f"batch {args.batch_size}, {args.workers} workers; training images/s, medians of {args.repeats} epochs"
    )
    print("| precision | channels_last | bare loop | expreg, files | expreg, cache | files / bare | cache / bare |")
    print("|---|---|---|---|---|---|---|")
    for (precision, channels_last), r in rows:
        print(
            f"| {precision} | {channels_last} | {r['bare']:.0f} | {r['files']:.0f} | {r['cache']:.0f} | "
            f"{r['files'] / r['bare']:.2f} | {r['cache'] / r['bare']:.2f} |"
        )
    print(f"data pipeline alone (decoding files, {args.workers} workers): {pipeline:.0f} images/s")


def _child(args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--metadata_csv", args.metadata_csv, "--backbone", args.backbone]
    cmd += ["--image_size", str(args.image_size), "--batch_size", str(args.batch_size), "--workers", str(args.workers)]
    cmd += ["--repeats", str(args.repeats), *(["--smoke"] if args.smoke else []), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
