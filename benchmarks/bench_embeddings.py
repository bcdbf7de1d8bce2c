"""Embedding store and frozen heads: ``ensure_embeddings`` against bare loops, and head epochs on cached rows.

    python benchmarks/bench_embeddings.py                     # both parts, about 15-30 min on 2 cores
    python benchmarks/bench_embeddings.py --quick             # 32 images, 5,000 rows: < 60 s (checks the script)
    python benchmarks/bench_embeddings.py --device cuda ...   # the GPU case (benchmarks/gpu_check.sh)

1. Embedding throughput. ``expreg.embeddings.ensure_embeddings`` building a store (a fresh
   temporary ``cache_root`` every round, so every round embeds; the CPU Accelerator passed, as
   ``train.mode=frozen`` passes it) over the real patches of ``--metadata_csv`` (her2st_dev:
   1,248 224-px JPEG patches) against two bare loops of ``model.eval().embed(batch)`` under
   ``torch.inference_mode()`` with the same model, batch size and threads:
   - over the images decoded and transformed beforehand (``ImageTransform`` of the model's own
     size, mean and std, as ``expreg.inference.image_loader``) into one in-memory tensor (the
     compute limit);
   - over the same DataLoader (``expreg.inference.image_loader``: decoding in the loop), so the
     gap splits into decoding and the store's own overhead (hashing the weights and files,
     gathering, writing).
   Random-initialised ``--backbones`` (resnet18 by default; vit_tiny_patch16_224 is a small ViT) at
   ``--image_size`` px, fp32. Before the timing, the store's rows are checked against the bare
   loop's. Target: store / bare >= 0.9.

2. Head epochs on cached embeddings: ``--rows`` (100,000) synthetic training embeddings (seeded
   N(0, 1), 1,024 float32 features) and 50 targets (a seeded linear map of them plus noise), written
   as a store in the format ``ensure_embeddings`` reads, under the identity it computes for the
   run's encoder (``--head_encoder`` densenet121: its pooled width is 1,024; it never runs), with a
   metadata CSV and split file (the image paths do not exist; ``data.check_images=none``). One epoch
   is the real ``train.mode=frozen`` path: ``Trainer(cfg).setup()`` (which finds the store and does
   not embed), then ``Trainer.train_one_epoch`` (``FrozenHead`` + ``EmbeddingRows`` +
   ``EpochBatchSampler`` + the Accelerate-prepared AdamW loop: forward, non-finite check, backward,
   clipping at 1.0, optimizer and cosine schedule steps), at every ``--head_batch_sizes`` with linear
   and MLP heads (dropout 0.1, no dihedral views; ``EmbeddingRows`` reads each batch's rows from the
   memory-mapped store, in the page cache here). Beside it, a bare loop: the same head, AdamW,
   clipping and cosine schedule over batches indexed from the same rows copied into one tensor.

Sides alternate in one process (the order rotates every round), medians of ``--repeats``; the
ratios are printed last. The CPU model of the VM changes between sessions: compare ratios only.
The VM is shared, and a busy neighbour slows torch's two threads far more than its own share
(a thread waits at every barrier for its descheduled twin), so each round first waits up to
``--max_wait`` s for a quiet second and records the cores other processes kept busy during it
(``/proc/stat`` less this process); rounds under ``QUIET_CORES`` count as quiet, and each ratio is
also given as the median of its rounds' own ratios, over all rounds and over the quiet ones.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    alternate,
    environment,
    median,
    predecode,
    real_data,
    report,
    setup_trainer,
    start_epoch,
    timed,
)

QUIET_CORES = 0.15  # a round is quiet when other processes kept less than this many cores busy on average


def snapshot() -> tuple[float, float, float]:
    """(CPU seconds the machine has been busy (``/proc/stat``: all but idle and iowait), this process's
    CPU seconds with its reaped DataLoader workers', wall-clock seconds)."""
    with open("/proc/stat") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:9]]
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK"), own, time.perf_counter()


def others_since(start: tuple[float, float, float]) -> float:
    """Cores that other processes kept busy on average since ``start`` (a ``snapshot``)."""
    machine, own, wall = (now - then for now, then in zip(snapshot(), start))
    return (machine - own) / wall


class Quiet:
    """Other processes' CPU use during each timed call of a side (this VM is shared).

    ``wrap(name, fn)``: before each call, waits up to ``max_wait`` s (untimed) for a second in which
    other processes kept fewer than ``QUIET_CORES`` busy, then records their cores during the call.
    """

    def __init__(self, max_wait: float) -> None:
        self.max_wait, self.others = max_wait, {}

    def wrap(self, name: str, fn):
        def call():
            deadline = time.perf_counter() + self.max_wait
            while time.perf_counter() < deadline:
                start = snapshot()
                time.sleep(1.0)
                if others_since(start) < QUIET_CORES:
                    break
            start = snapshot()
            value = fn()
            self.others.setdefault(name, []).append(others_since(start))
            return value

        return call

    def quiet(self, name: str) -> list[bool]:
        return [o < QUIET_CORES for o in self.others[name]]


def quiet_ratio(quiet: Quiet, top: str, values: dict, bottom: str) -> str:
    """Median of the rounds' own ``top / bottom`` ratios: over all rounds, and over rounds where both were quiet."""
    pairs = list(zip(values[top], values[bottom], quiet.quiet(top), quiet.quiet(bottom)))
    clean = [t / b for t, b, qt, qb in pairs if qt and qb]
    both = f"{median(clean):.2f} ({len(clean)} of {len(pairs)})" if clean else f"none of {len(pairs)}"
    return f"rounds' own ratios {median([t / b for t, b, _, _ in pairs]):.2f}; quiet rounds {both}"


def quiet_line(quiet: Quiet, name: str, values: list[float], unit: str) -> str:
    kept = [v for v, q in zip(values, quiet.quiet(name)) if q]
    others = ", ".join(f"{o:.2f}" for o in quiet.others[name])
    best = f"{median(kept):.2f} {unit} ({len(kept)} of {len(values)})" if kept else f"none of {len(values)}"
    return f"    quiet rounds: {best}; other processes' cores per round: {others}"


# ---------------------------------------------------------------------------------------------
# 1. embedding throughput
# ---------------------------------------------------------------------------------------------


def image_paths(metadata_csv: str, limit: int | None) -> list[str]:
    """The absolute image paths of the metadata CSV, sorted (the store's row order), the first ``limit``."""
    from expreg.data import read_metadata

    metadata = read_metadata(metadata_csv, check_images="exists")
    folder = Path(metadata.csv_path).parent
    files = sorted({os.path.abspath(folder / p) for p in metadata.frame["path"]})
    return files[:limit] if limit else files


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def store_embeddings(model, files, accelerator, batch_size: int, workers: int) -> np.ndarray:
    """``ensure_embeddings`` into a fresh temporary cache (it builds every time); its rows, in ``files`` order."""
    from expreg.embeddings import ensure_embeddings

    root = tempfile.mkdtemp(prefix="bench_embeddings-")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its size estimate and timing line, every round
            store = ensure_embeddings(
                model,
                files,
                accelerator=accelerator,
                cache_root=root,
                batch_size=batch_size,
                num_workers=workers,
                progress=False,
            )
        return store.get(files)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bare_loader(model, files, batch_size: int, workers: int, device) -> np.ndarray:
    """The bare loop over ``image_loader`` (decoding included)."""
    import torch

    from expreg.inference import image_loader

    model.eval()
    with torch.inference_mode():
        out = [model.embed(batch.to(device)) for batch in image_loader(model, files, batch_size, workers)]
        return torch.cat(out).float().cpu().numpy()


def bare_decoded(model, batches) -> np.ndarray:
    """The bare loop over batches decoded beforehand (already on the device)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model.embed(batch) for batch in batches]).float().cpu().numpy()


def embedding_sides(args, backbone: str, files: list[str], accelerator, quiet: Quiet) -> dict:
    """Images/s of the store and of both bare loops, alternated (module docstring, part 1)."""
    import torch

    from expreg.modeling.model import build_model

    device = accelerator.device
    torch.manual_seed(0)
    model = build_model(backbone, 50, image_size=args.image_size).to(device).eval()
    config, b = model.config, args.batch_size
    pixels = predecode(files, config.image_size, config.image_mean, config.image_std)
    batches = [pixels[i : i + b].to(device) for i in range(0, len(pixels), b)]
    del pixels
    stored = store_embeddings(model, files, accelerator, b, args.workers)  # also the warm-up
    bare = bare_decoded(model, batches)
    loaded = bare_loader(model, files, b, args.workers, device)
    diff = max(float(np.abs(stored - bare).max()), float(np.abs(loaded - bare).max()))
    if not np.allclose(stored, bare, rtol=1e-4, atol=1e-4) and device.type == "cpu":  # GPU kernels may differ
        sys.exit(f"{backbone}: the store's rows differ from the bare loop's (max abs difference {diff:.3g})")
    print(f"{backbone}: {stored.shape[1]} features; store rows == bare loop rows (max abs difference {diff:.2g})")

    def rate(fn) -> float:
        sync(device)
        seconds = timed(fn)
        sync(device)
        return len(files) / seconds

    sides = {
        "bare inference_mode loop, decoded beforehand": lambda: rate(lambda: bare_decoded(model, batches)),
        "bare inference_mode loop over image_loader": lambda: rate(
            lambda: bare_loader(model, files, b, args.workers, device)
        ),
        "ensure_embeddings (a new store each round)": lambda: rate(
            lambda: store_embeddings(model, files, accelerator, b, args.workers)
        ),
    }
    sides = {f"{backbone}: {name}": quiet.wrap(f"{backbone}: {name}", fn) for name, fn in sides.items()}
    values = alternate(sides, args.repeats, warmup=False)
    print(f"{backbone}, {config.image_size} px, batch {b}, {args.workers} workers, {len(files):,} images; images/s")
    for name, vals in values.items():
        report({name.split(": ", 1)[1]: vals}, "img/s")
        print(quiet_line(quiet, name, vals, "img/s"))
    return values


# ---------------------------------------------------------------------------------------------
# 2. head epochs on cached embeddings
# ---------------------------------------------------------------------------------------------


def synthetic_data(folder: Path, rows: int, val_rows: int, features: int, genes: int) -> np.ndarray:
    """Seeded embeddings of ``rows + val_rows`` images (returned) and their metadata CSV + split file in ``folder``.

    Image ``k`` is ``images/s{k:07d}.jpg`` (does not exist; sorted path order is ``k`` order); 200 rows
    per group; the last ``val_rows`` rows are the validation split.
    """
    import pandas as pd

    n, rng = rows + val_rows, np.random.default_rng(0)
    embeddings = rng.standard_normal((n, features), dtype=np.float32)
    weights = rng.standard_normal((features, genes), dtype=np.float32) / np.float32(np.sqrt(features))
    targets = embeddings @ weights + rng.standard_normal((n, genes), dtype=np.float32)
    paths = [f"images/s{k:07d}.jpg" for k in range(n)]
    groups = [f"g{k // 200:05d}" for k in range(n)]
    frame = pd.DataFrame(targets, columns=[f"y{j}" for j in range(genes)])
    frame.insert(0, "group_id", groups)
    frame.insert(0, "path", paths)
    frame.to_csv(folder / "metadata.csv", index=False, float_format="%.5f")
    split = ["train"] * rows + ["validation"] * val_rows
    pd.DataFrame({"path": paths, "group_id": groups, "split": split}).to_csv(folder / "split.csv", index=False)
    return embeddings


def head_config(args, folder: Path, head: str, batch_size: int):
    from expreg.config import load_recipe

    overrides = f"""data.metadata_csv={folder / "metadata.csv"} data.split_csv={folder / "split.csv"}
        data.check_images=none data.num_workers=0 data.augment_dihedral=false data.image_cache_dir={folder / "cache"}
        data.batch_size={batch_size} model.backbone={args.head_encoder} model.head={head} model.dropout=0.1
        train.mode=frozen train.epochs=10 logging.output_dir={folder / "runs"}"""
    return load_recipe(None, overrides.split())


def write_store(cfg, accelerator, embeddings: np.ndarray) -> Path:
    """The store ``Trainer.setup`` will look for (same seed, data and encoder as it builds), holding ``embeddings``."""
    from expreg.data import image_files
    from expreg.embeddings import EMBEDDINGS_FILE, INFO_FILE, PATHS_FILE, store_folder, store_identity
    from expreg.seeding import seed_everything
    from expreg.training.setup import setup_data, setup_model

    seed_everything(cfg.seed)  # what Trainer.setup does, in its order: the encoder's weights are the same
    data = setup_data(cfg, accelerator)
    model = setup_model(cfg, data.gene_names, data.target_stats, data.patch_px)
    files = sorted({os.path.abspath(p) for part in data.datasets.values() for p in image_files(part)})
    identity = store_identity(model, files, 0)
    folder = store_folder(identity, cfg.data.image_cache_dir)
    index = np.array([int(Path(p).stem[1:]) for p in files])  # s{k}.jpg holds embeddings[k]
    if not np.array_equal(index, np.arange(len(embeddings))):
        sys.exit("synthetic paths are not in embedding order")
    folder.mkdir(parents=True)
    np.save(folder / EMBEDDINGS_FILE, embeddings)
    (folder / PATHS_FILE).write_text(json.dumps(files))
    info = {**identity, "num_features": int(embeddings.shape[1]), "synthetic": "benchmarks/bench_embeddings.py"}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def bare_head(trainer):
    """A bare loop's epoch function: a copy of the trainer's head, AdamW, clipping and schedule, in-memory rows."""
    import copy

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from expreg.data.loaders import epoch_batch_sizes

    cfg, rows, device = trainer.cfg, trainer.data.loaders["train_transform"], trainer.accelerator.device
    full = trainer.accelerator.unwrap_model(trainer.model).full_model
    head = torch.nn.Sequential(copy.deepcopy(full.dropout), copy.deepcopy(full.head)).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sizes = epoch_batch_sizes(len(rows), cfg.data.batch_size, 1)
    total = len(sizes) * cfg.train.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total), total)
    x = torch.from_numpy(np.ascontiguousarray(rows.views[0][rows.rows[0]])).to(device)  # the store's rows, in memory
    y = torch.from_numpy(rows.labels).to(device)
    epochs = iter(range(1_000_000))

    def epoch() -> None:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(next(epochs))).to(device)
        start = 0
        for size in sizes:
            index = order[start : start + size]
            start += size
            loss = torch.nn.functional.mse_loss(head(x[index]).float(), y[index])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        sync(device)

    return epoch


def trainer_epoch(trainer):
    """An epoch function of the real loop: ``Trainer.train_one_epoch`` from the start of a new epoch."""
    epochs = iter(range(1_000_000))

    def epoch() -> None:
        start_epoch(trainer, next(epochs), trainer.data.loaders, trainer.train_dl)
        trainer.train_one_epoch()

    return epoch


def head_sides(args, folder: Path, accelerator, store: Path, quiet: Quiet) -> dict:
    """Seconds per epoch of ``Trainer.train_one_epoch`` and the bare loop, per head and batch size."""
    results = {}
    for head in args.heads:
        for batch_size in args.head_batch_sizes:
            cfg = head_config(args, folder, head, batch_size)
            with contextlib.redirect_stdout(io.StringIO()):
                trainer = setup_trainer(cfg, accelerator, str(folder / "runs"))
            found = [s.folder for s in trainer.data.embedding_stores]
            if found != [store]:
                sys.exit(f"the Trainer opened {found}, not the synthetic store {store}")
            sides = {"Trainer.train_one_epoch": trainer_epoch(trainer), "bare loop": bare_head(trainer)}
            for fn in sides.values():  # warm-up, untimed
                fn()
            key = f"{head} head, batch {batch_size}"
            timed_sides = {
                f"{key}: {k}": quiet.wrap(f"{key}: {k}", lambda fn=fn: timed(fn)) for k, fn in sides.items()
            }
            values = alternate(timed_sides, args.repeats, warmup=False)
            results[(head, batch_size)] = (values, len(trainer.train_dl))
            print(f"  {key}: {len(trainer.train_dl):,} steps")
            for name, vals in values.items():
                print(
                    f"    {name.split(': ')[1]}: median {median(vals):.2f} s, all rounds {', '.join(f'{v:.2f}' for v in vals)}"
                )
                print(quiet_line(quiet, name, vals, "s"))
            accelerator.free_memory()
            del trainer, sides
    return results


def head_epochs(args, accelerator, quiet: Quiet) -> dict:
    """Part 2 end to end in a temporary folder (module docstring)."""
    folder = Path(tempfile.mkdtemp(prefix="bench_embeddings_heads-"))
    try:
        start = time.perf_counter()
        embeddings = synthetic_data(folder, args.rows, args.val_rows, args.features, 50)
        cfg = head_config(args, folder, "linear", args.head_batch_sizes[0])
        with contextlib.redirect_stdout(io.StringIO()):
            store = write_store(cfg, accelerator, embeddings)
        del embeddings
        print(
            f"\nhead epochs: {args.rows:,} training + {args.val_rows:,} validation rows x {args.features:,} float32 "
            f"features, 50 targets, store + CSVs written in {time.perf_counter() - start:.1f} s; seconds per epoch, "
            f"median of {args.repeats} (alternated, after one warm-up epoch each)"
        )
        return head_sides(args, folder, accelerator, store, quiet)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metadata_csv", default=None, help="default: ../shared/data/her2st_dev/metadata.csv")
    parser.add_argument("--backbones", nargs="+", default=["resnet18"], help="e.g. resnet18 vit_tiny_patch16_224")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--images", type=int, default=None, help="embed the first N images only (default: all)")
    parser.add_argument("--batch_size", type=int, default=64, help="embedding batch size (ensure_embeddings' default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the embedding sides")
    parser.add_argument("--rows", type=int, default=100_000, help="cached training embeddings of part 2")
    parser.add_argument("--val_rows", type=int, default=2_000)
    parser.add_argument("--head_encoder", default="densenet121", help="names the store; its width is the features")
    parser.add_argument("--head_batch_sizes", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--heads", nargs="+", choices=["linear", "mlp"], default=["linear", "mlp"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--max_wait", type=float, default=60, help="seconds to wait for a quiet machine before each round (0: never)"
    )
    parser.add_argument("--skip_embedding", action="store_true", help="part 2 only")
    parser.add_argument("--skip_heads", action="store_true", help="part 1 only")
    parser.add_argument("--quick", action="store_true", help="32 images, 5,000 rows, batch 256, 1 repeat (< 60 s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.repeats, args.max_wait = args.images or 32, 16, 1, 0
        args.rows, args.val_rows, args.head_batch_sizes = 5_000, 400, [256]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/bench_embeddings.py: no CUDA GPU here; skipped (--device cpu measures the CPU case)")
        return
    from expreg.training.launch import build_accelerator

    if not args.skip_heads:  # imported now: the whole run uses the expreg code as it was when it started
        import expreg.training.trainer  # noqa: F401

    accelerator = build_accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{environment()}; device {device} ({name}); load average {os.getloadavg()[0]:.2f} at start")
    embedding, quiet = {}, Quiet(args.max_wait)
    if not args.skip_embedding:
        files = image_paths(real_data(args.metadata_csv), args.images)
        for backbone in args.backbones:
            embedding[backbone] = embedding_sides(args, backbone, files, accelerator, quiet)
    heads = {}
    if not args.skip_heads:
        from expreg.modeling.model import build_model

        args.features = build_model(args.head_encoder, 50).head.in_features
        heads = head_epochs(args, accelerator, quiet)
    print_results(args, embedding, heads, quiet)


def print_results(args, embedding: dict, heads: dict, quiet: Quiet) -> None:
    """The head table, then the embedding ratios last."""
    if heads:
        print(
            f"\n| head | batch | steps | Trainer.train_one_epoch, s (median, min–max of {args.repeats}) | bare loop, s "
            "| bare / Trainer (medians) | bare / Trainer, the rounds' own ratios |"
        )
        print("|---|---|---|---|---|---|---|")
        for (head, batch_size), (values, steps) in heads.items():
            (tn, t), (bn, b) = values.items()
            print(
                f"| {head} | {batch_size:,} | {steps:,} | {median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | "
                f"{median(b):.2f} ({min(b):.2f}–{max(b):.2f}) | {median(b) / median(t):.2f} | "
                f"{quiet_ratio(quiet, bn, values, tn)} |"
            )
    print(f"load average {os.getloadavg()[0]:.2f} at the end (another busy process on the machine skews every figure)")
    for backbone, values in embedding.items():
        names = list(values)
        for name in names[:2]:
            print(
                f"{backbone}: ensure_embeddings / {name.split(': ', 1)[1]} = "
                f"{median(values[names[2]]) / median(values[name]):.2f} "
                f"(medians; {quiet_ratio(quiet, names[2], values, name)}) (target >= 0.9)"
            )


if __name__ == "__main__":
    main()
