"""A cohort on one machine: what each stage costs, and whether it scales (issue 24's figures, one script).

    python benchmarks/bench_cohort.py                      # about 40 min on 2 cores (the RESULTS.md run)
    python benchmarks/bench_cohort.py --quick              # a minute: checks the script end to end

On a synthetic Visium cohort (``benchmarks/make_cohort.py``: ``--sections`` sections of ``--spots``
spots, 18,000 genes, 1 µm/px tiled JPEG images, cached in ``--work_dir``):

1. ``expreg.prepare``: 1 worker vs 2 workers (image files), 2 workers into Parquet shards; wall time,
   the peak RSS of the largest process of the command (a worker or the main one), disk size, files.
2. Training throughput (images/s, one process, ``--backbone`` at ``--image_size`` px, batches of 32,
   AdamW steps): expreg's loaders from the files and from the shards with ``data.num_workers``' default
   (``recipes/base.yaml``: 2), and with the DataLoader in the main process (0
   workers: nothing overlaps the step), the shards also through the decoded-image cache
   (``data.image_cache=true``), vs a bare loop over the same images decoded beforehand into one
   tensor; sides alternated; each side's first ``WARMUP`` batches untimed (an epoch is thousands of
   batches: its steady state is what it costs).
3. Gene choice (``hvg:50``) and the targets from an ``expression.h5ad`` of ``--gene_spots`` spots x
   18,000 genes (``bench_gene_choice.py``: peak RSS of the process, the counts streamed).
4. Peak RSS of ``run_regression.py`` and ``expreg.cv`` at ``--rows`` (40,000 and 400,000) rows: a
   store of that many 16-px patches (unique paths, a pool of encoded images), K=50 targets in the
   CSV, ``test_resnet``, one epoch; ``expreg.cv`` with 2 folds, ``finetune,mean``.
5. One whole-slide map of a cohort section (``expreg.map``, the model of 2), and the time of each stage
   for a 100-section / 300,000-spot cohort, from the rates measured here (the extrapolation is stated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, alternate, environment, median

GENES = 50
WARMUP = 2  # training batches per side not timed: the loader's start and the allocator's first steps
FULL_SECTIONS, FULL_SPOTS = 100, 300_000  # the cohort the stage times are stated for


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=None, help="default: $EXPREG_CACHE/bench or ~/.cache/expreg/bench")
    parser.add_argument("--sections", type=int, default=4, help="sections prepared (1 and 2 workers)")
    parser.add_argument("--spots", type=int, default=3000)
    parser.add_argument("--um_per_px", type=float, default=1.0)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batches", type=int, default=12, help="training batches per timed side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gene_spots", type=int, default=300_000)
    parser.add_argument("--rows", default="40000,400000", help="rows of the peak-RSS runs")
    parser.add_argument(
        "--rss_commands", default="run_regression,cv", help="commands of part rss (cv is the long one at 400k rows)"
    )
    parser.add_argument(
        "--parts", default="prepare,train,genes,rss,map", help="what to measure (train and map need prepare's output)"
    )
    parser.add_argument("--quick", action="store_true", help="small everything: checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.sections, args.spots, args.um_per_px, args.backbone = 2, 150, 4.0, "test_resnet"
        args.batches, args.repeats, args.gene_spots, args.rows = 2, 1, 3000, "2000,4000"
    return args


def work_dir(path: str | None) -> Path:
    root = Path(path or os.environ.get("EXPREG_CACHE") or Path.home() / ".cache" / "expreg") / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root if path is None else Path(path)


def run_measured(cmd: list[str], cwd=REPO) -> tuple[float, float, float]:
    """``cmd`` in a small parent process: (seconds, peak RSS in GB of its largest process, the largest
    process's peak anonymous memory in GB: its RSS without memory-mapped files, sampled every 0.1 s)."""
    probe = (
        "import resource, subprocess, sys, time, psutil; t = time.perf_counter(); "
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True); "
        "import threading; out = []; threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True).start(); "
        "anon = 0\n"
        "while p.poll() is None:\n"
        "    try:\n"
        "        tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]\n"
        "        anon = max([anon] + [m.rss - m.shared for m in (q.memory_info() for q in tree)])\n"
        "    except psutil.Error:\n"
        "        pass\n"
        "    time.sleep(0.1)\n"
        "time.sleep(0.2); print((out or [''])[0][-6000:], file=sys.stderr)\n"
        "print(f'@@ {time.perf_counter() - t} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {anon}'); "
        "sys.exit(p.returncode)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ...: failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    seconds, kb, anon = result.stdout.strip().splitlines()[-1].split()[1:]
    return float(seconds), int(kb) / 2**20, int(anon) / 2**30


def folder_size(folder: Path) -> tuple[float, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e9, len(files)


# ---------------------------------------------------------------------------------------------
# 1. prepare
# ---------------------------------------------------------------------------------------------


def cohort(args, root: Path) -> Path:
    folder = root / f"cohort_{args.sections}x{args.spots}_{args.um_per_px:g}um"
    if not (folder / "samples.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, str(REPO / "benchmarks" / "make_cohort.py"), "--out", str(folder)]
        cmd += ["--sections", str(args.sections), "--spots", str(args.spots), "--um_per_px", str(args.um_per_px)]
        cmd += ["--sections_per_patient", "1", "--genes", "2000" if args.quick else "18000"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def prepare_runs(args, raw: Path, out: Path) -> dict:
    _read_through(raw)  # every side starts with the sections in the page cache (the first would warm it for the rest)
    runs = {}
    for name, extra in (
        ("files, 1 worker", []),
        ("files, 2 workers", ["--num_workers", "2"]),
        ("shards, 2 workers", ["--num_workers", "2", "--store", "shards"]),
    ):
        target = out / name.replace(", ", "_").replace(" ", "")
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "expreg.prepare", "--samples", str(raw / "samples.csv"), "--out_dir", str(target)]
        seconds, peak, _ = run_measured([*cmd, *extra])
        size, count = folder_size(target)
        runs[name] = {"seconds": seconds, "peak_gb": peak, "gb": size, "files": count, "out": target}
    spots = len(open(runs["files, 1 worker"]["out"] / "metadata.csv").readlines()) - 1
    one, two = runs["files, 1 worker"], runs["files, 2 workers"]
    print(f"\n1. expreg.prepare on {args.sections} sections, {spots:,} spots (224-px PNG patches, 112 µm)")
    print(f"  {'':22}{'wall':>9}{'patches/s':>11}{'peak RSS':>10}{'disk':>9}{'files':>8}")
    for name, r in runs.items():
        print(
            f"  {name:22}{r['seconds']:8.1f}s{spots / r['seconds']:11.1f}{r['peak_gb']:9.2f}G"
            f"{r['gb']:8.2f}G{r['files']:8d}"
        )
    print(f"  speed-up of 2 workers over 1: {one['seconds'] / two['seconds']:.2f}x (target >= 1.7)")
    runs["spots"] = spots
    return runs


def _read_through(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def reuse_prepared(out: Path) -> dict:
    """The outputs of an earlier ``prepare`` part (``--parts`` without prepare)."""
    runs = {
        name: {"out": out / name.replace(", ", "_").replace(" ", "")}
        for name in ("files, 2 workers", "shards, 2 workers")
    }
    if not all((r["out"] / "metadata.csv").is_file() for r in runs.values()):
        sys.exit(f"{out}: no prepared cohort; run the prepare part first")
    return runs


# ---------------------------------------------------------------------------------------------
# 2. training throughput
# ---------------------------------------------------------------------------------------------


def targets_csv(prepared: Path) -> Path:
    """``metadata.csv`` with K seeded random targets (throughput does not depend on their values)."""
    import pandas as pd

    frame = pd.read_csv(prepared / "metadata.csv")
    rng = np.random.default_rng(0)
    values = rng.normal(size=(len(frame), GENES)).astype(np.float32)
    frame = frame.assign(**{f"y{k}": values[:, k] for k in range(GENES)})
    frame.to_csv(prepared / "targets.csv", index=False)
    return prepared / "targets.csv"


def training_rates(args, runs: dict, root: Path) -> dict:
    import torch

    from expreg.config import DataConfig
    from expreg.data import build_dataloaders, load_expression_dataset
    from expreg.data.dataset import image_files
    from expreg.data.image_cache import ensure_image_cache
    from expreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image

    files, shards = runs["files, 2 workers"]["out"], runs["shards, 2 workers"]["out"]
    batch, workers = 32, DataConfig().num_workers  # data.num_workers' default (recipes/base.yaml)
    datasets = {
        "files": load_expression_dataset(targets_csv(files), seed=0),
        "shards": load_expression_dataset(targets_csv(shards), seed=0, patches=shards / "patches"),
    }
    paths = [p for part in datasets["shards"].values() for p in image_files(part)]  # data.image_cache=true
    cache = ensure_image_cache(paths, args.image_size, cache_root=root / "image_cache", progress=False)
    loaders = {}
    for name, store, num_workers, image_cache in (
        (f"expreg, image files, {workers} workers", "files", workers, None),
        (f"expreg, Parquet shards, {workers} workers", "shards", workers, None),
        ("expreg, image files, 0 workers", "files", 0, None),
        ("expreg, Parquet shards, 0 workers", "shards", 0, None),
        ("expreg, shards + image cache, 0 workers", "shards", 0, cache),
    ):
        kwargs = dict(image_size=args.image_size, batch_size=batch, num_workers=num_workers, seed=0)
        loaders[name] = build_dataloaders(datasets[store], image_cache=image_cache, **kwargs)["train"]
    model = _map_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    count = (WARMUP + args.batches) * batch
    first = [b for _, b in zip(range(WARMUP + args.batches), loaders["expreg, image files, 0 workers"])]
    transform = ImageTransform(args.image_size, IMAGENET_MEAN, IMAGENET_STD, train=False)
    decoded = torch.stack([transform(load_image(str(p))[0], p) for b in first for p in _files(files, b["path"])])
    bare = [(decoded[i : i + batch], b["labels"]) for i, b in zip(range(0, count, batch), first)]

    def step(x, y) -> None:
        model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def side(batches):
        def rate() -> float:
            it = iter(batches())
            for _ in range(WARMUP):  # an epoch is thousands of batches: time the steady state, as a long epoch runs
                step(*_xy(next(it)))
            start, seen = time.perf_counter(), 0
            for _ in range(args.batches):  # every timed step fetches its own batch
                x, y = _xy(next(it))
                step(x, y)
                seen += len(y)
            return seen / (time.perf_counter() - start)

        return rate

    sides = {BARE: side(lambda: iter(bare))}
    sides.update({name: side(lambda loader=loader: iter(loader)) for name, loader in loaders.items()})
    values = alternate(sides, args.repeats)
    rates = {name: median(v) for name, v in values.items()}
    loading = {  # the main-process loaders alone (no model): ms per batch, what each adds to a step
        name: median([1e3 * _loader_seconds(loader, args.batches) / args.batches for _ in range(args.repeats)])
        for name, loader in loaders.items()
        if name.endswith(", 0 workers")
    }
    bare_rate = rates[BARE]
    print(
        f"\n2. training throughput: {args.backbone} at {args.image_size} px, batches of {batch}, {args.batches} "
        f"batches per side timed after {WARMUP} untimed ones (the loader's start), median of {args.repeats} (sides "
        f"alternated), one process ({environment()})"
    )
    for name, rate in rates.items():
        extra = f"   loader alone {loading[name]:5.0f} ms per batch" if name in loading else ""
        print(f"  {name:42}{rate:8.1f} images/s   ratio to bare {rate / bare_rate:.3f}{extra}")
    print(
        f"  a bare step takes {1e3 * batch / bare_rate:.0f} ms per batch. With {workers} workers (data.num_workers' "
        "default) loading overlaps the step; with 0, a side loses the loader's time over (step + loader)"
    )
    print(f"  targets: shards >= 0.95 x bare, and >= files (a training epoch: {workers} workers)")
    return {"rates": rates, "model": model, "shards": rates[f"expreg, Parquet shards, {workers} workers"]}


BARE = "bare loop (decoded beforehand)"


def _xy(batch):
    return (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch


def _loader_seconds(loader, count: int) -> float:
    start = time.perf_counter()
    for _ in zip(range(count), loader):
        pass
    return time.perf_counter() - start


def _files(folder: Path, paths) -> list[Path]:
    return [folder / p if not os.path.isabs(p) else Path(p) for p in paths]


# ---------------------------------------------------------------------------------------------
# 3. gene choice
# ---------------------------------------------------------------------------------------------


def gene_choice(args) -> float:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_gene_choice.py"), "--baseline", "none"]
    cmd += ["--spots", str(args.gene_spots), "--genes", "2000" if args.quick else "18000"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    print(f"\n3. gene choice (benchmarks/bench_gene_choice.py --baseline none --spots {args.gene_spots}):")
    print("  " + result.stdout.strip().replace("\n", "\n  "))
    line = [x for x in result.stdout.splitlines() if x.startswith("this checkout")][0]
    return float(line.split()[2])


# ---------------------------------------------------------------------------------------------
# 4. peak RSS against rows
# ---------------------------------------------------------------------------------------------


def row_store(root: Path, rows: int) -> Path:
    """``rows`` rows of 16-px patches in a patch store (unique paths; 1,000 distinct images), K=50 targets."""
    import io

    import pandas as pd
    import pyarrow as pa
    from PIL import Image

    from expreg.data.patch_store import ShardWriter, shard_schema

    folder = root / f"rows_{rows}"
    if (folder / "metadata.csv").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(rows)
    pool = []
    for _ in range(1000):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pool.append(buffer.getvalue())
    frame = pd.DataFrame({"path": [f"patches/p{i:07d}.png" for i in range(rows)]})
    frame["group_id"] = [f"G{i % 200:03d}" for i in range(rows)]
    values = rng.normal(size=(rows, GENES)).astype(np.float32)
    frame = pd.concat([frame, pd.DataFrame(values, columns=[f"y{k}" for k in range(GENES)])], axis=1)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    writer = ShardWriter(folder / "patches", shard_schema(table.schema))
    for start in range(0, rows, 10_000):
        chunk = table.slice(start, 10_000)
        writer.write(chunk, pa.array([pool[i % 1000] for i in range(start, start + chunk.num_rows)], pa.binary()))
    writer.finish()
    frame.to_csv(folder / "metadata.csv", index=False)
    return folder


def rss_against_rows(args, root: Path) -> dict:
    found = {}
    # 100 training steps (the rows' memory does not depend on how many are trained on); evaluation covers every row
    common = ["data.image_size=16", "data.batch_size=256", "data.num_workers=0", "train.epochs=1"]
    common += ["train.max_steps_per_epoch=100"]
    for rows in [int(r) for r in args.rows.split(",")]:
        folder = row_store(root, rows)
        data = [f"data.metadata_csv={folder / 'metadata.csv'}", f"data.patches={folder / 'patches'}"]
        out = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
        train = [sys.executable, str(REPO / "run_regression.py"), str(REPO / "recipes" / "tiny.yaml"), *data, *common]
        found[rows] = {"run_regression": run_measured([*train, f"logging.output_dir={out}", "logging.run_name=r"])}
        cv = [sys.executable, "-m", "expreg.cv", str(REPO / "recipes" / "tiny.yaml"), *data, *common]
        if "cv" in args.rss_commands.split(","):
            cv += ["--n_folds", "2", "--methods", "finetune,mean", "--no_tta", "--out_dir", str(out / "cv")]
            found[rows]["expreg.cv"] = run_measured(cv)
        shutil.rmtree(out, ignore_errors=True)
    print(
        "\n4. memory against rows (a patch store of 16-px PNGs, K=50 targets in the CSV, test_resnet, 1 epoch of 100 steps; "
        "cv: 2 folds, finetune + mean, --no_tta). Peak RSS (largest process) and its anonymous part (RSS without "
        "memory-mapped files: the Arrow tables and the store are mapped)"
    )
    for rows, r in found.items():
        print(
            "  "
            + f"{rows:>9,} rows: "
            + ", ".join(
                f"{name} {t:.0f} s, RSS {rss:.2f} GB, anonymous {anon:.2f} GB" for name, (t, rss, anon) in r.items()
            )
        )
    small, large = (found[k] for k in sorted(found))
    print(
        f"  ratio {max(found) / min(found):.0f}x the rows: "
        + ", ".join(
            f"{name} RSS {large[name][1] / small[name][1]:.2f}, anonymous {large[name][2] / small[name][2]:.2f}"
            for name in small
        )
    )
    return found


# ---------------------------------------------------------------------------------------------
# 5. a map, and the stage times of a whole cohort
# ---------------------------------------------------------------------------------------------


def _map_model(args):
    """Part 2's model, seeded: ``--backbone`` for 50 genes and 112 µm / 224 px patches (a map's time does not
    depend on the weights)."""
    import torch

    from expreg.modeling.model import build_model

    torch.manual_seed(0)
    genes = [f"GENE{k:02d}" for k in range(GENES)]
    return build_model(
        args.backbone, GENES, gene_names=genes, image_size=args.image_size, patch_um=112.0, patch_px=224
    )


def one_map(args, raw: Path, model, root: Path) -> tuple[float, int]:
    from transformers.utils import logging as hf_logging

    model_dir = root / "cohort_map_model"
    hf_logging.disable_progress_bar()  # "Writing model shards"
    model.save_pretrained(model_dir)
    slide = sorted(raw.glob("S000/*.tif"))[0]
    out = Path(tempfile.mkdtemp(prefix="bench-cohort-map-")) / "map"
    cmd = [sys.executable, "-m", "expreg.map", "--model", str(model_dir), "--slide", str(slide), "--out_dir", str(out)]
    seconds, peak, _ = run_measured([*cmd, "--um_per_px", str(args.um_per_px), "--num_workers", "0"])
    summary = json.loads((out / "summary.json").read_text())
    tiles = summary["tiles"]
    shutil.rmtree(out.parent, ignore_errors=True)
    print(
        f"\n5. one whole-slide map of a cohort section ({slide.name}, {tiles:,} tiles, {summary['tiles_per_s']} "
        f"tiles/s predicting): {seconds:.0f} s for the command, peak RSS {peak:.2f} GB"
    )
    return seconds, tiles


def stage_times(record: dict, args) -> None:
    """The stages of a 100-section / 300,000-spot cohort, from the rates of this run and earlier ``--parts`` runs."""
    fold_rows = FULL_SPOTS * 0.75 * 0.8  # 4-fold CV; 20 % of the training patients validate
    lines = {
        "prepare, 2 workers, shards": ("prepare_s_per_spot", lambda v: f"{v * FULL_SPOTS / 3600:6.1f} h"),
        "gene choice (hvg:50)": ("gene_s_per_spot", lambda v: f"{v * FULL_SPOTS / 60:6.1f} min"),
        "one CV fold, one epoch": (
            "train_images_per_s",  # training rows, then the validation rows at ~3x the training rate
            lambda v: (
                f"{(fold_rows / v + FULL_SPOTS * 0.75 * 0.2 / (3 * v)) / 3600:6.1f} h  "
                f"({args.backbone}, {args.image_size} px, this CPU, from shards with the default loader workers)"
            ),
        ),
        "one map (one section)": ("map_s", lambda v: f"{v / 60:6.1f} min  (x {FULL_SECTIONS} sections)"),
    }
    print(
        f"\nStage times for a {FULL_SECTIONS}-section, {FULL_SPOTS:,}-spot cohort on this machine, extrapolated "
        "linearly from the rates measured (this run and earlier --parts runs, in "
        f"{record['_file']}):"
    )
    for name, (key, show) in lines.items():
        print(f"  {name:32}{show(record[key]) if key in record else '  not measured (its --parts not run yet)'}")


def _record(root: Path, args) -> dict:
    path = (
        root / f"bench_cohort_{args.sections}x{args.spots}_{args.um_per_px:g}um_{args.backbone}_{args.image_size}.json"
    )
    record = json.loads(path.read_text()) if path.is_file() else {}
    return {**record, "_file": str(path)}


def _save(record: dict) -> None:
    Path(record["_file"]).write_text(json.dumps({k: v for k, v in record.items() if k != "_file"}, indent=1) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    root = work_dir(args.work_dir)
    start = time.perf_counter()
    print(f"bench_cohort: {environment()}; work folder {root}")
    parts = set(args.parts.split(","))
    record = _record(root, args)
    raw = cohort(args, root) if parts & {"prepare", "map"} else None  # genes and rss make their own data
    if "prepare" in parts:
        runs = prepare_runs(args, raw, root / "prepared")
        record["prepare_s_per_spot"] = runs["shards, 2 workers"]["seconds"] / runs["spots"]
    elif "train" in parts:
        runs = reuse_prepared(root / "prepared")
    model = None
    if "train" in parts:
        trained = training_rates(args, runs, root)
        record["train_images_per_s"] = trained["shards"]
        model = trained["model"]
    if "genes" in parts:
        record["gene_s_per_spot"] = gene_choice(args) / args.gene_spots
    if "rss" in parts:
        rss_against_rows(args, root)
    if "map" in parts:
        record["map_s"] = one_map(args, raw, model or _map_model(args), root)[0]
    _save(record)
    stage_times(record, args)
    print(f"\nbench_cohort: {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
