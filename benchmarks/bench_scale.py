"""Scale: splits and dataset building at 10k, 100k and 1M rows, and training memory over epochs.

    python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--epochs 8]

1. Synthetic metadata CSVs (50 integer-count genes, 50 rows per group, 20,000 groups at 1M
   rows; the images do not exist, so image checks are switched off: ``--check_images none``).
2. For each size, each in a fresh process (wall time after the imports, peak RSS of the process):
   ``expreg-splits`` (``expreg.splits.main``: read + validate the CSV, assign groups, write the
   split file), and
   ``load_expression_dataset`` with that split (read + validate + stream each split to Arrow).
3. Training memory: ``recipes/her2st.yaml`` (her2st_dev images; ``test_resnet`` at 64 px so that
   it takes about a minute) for ``--epochs`` epochs through ``Trainer.setup()`` and ``train()``;
   resident memory of the training process after every epoch (after its ``Trainer.evaluate()``).

The last lines print the 1M-row figures against the targets (splits < 30 s, dataset build
peak RSS < 2 GB) and the training RSS of the last epoch over the first (target <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, real_data  # noqa: E402

MEASURE = """
import json, resource, sys, time
{imports}
start = time.perf_counter()  # after the imports: the figures grow with rows, not with start-up
{body}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))
"""

SPLITS = """from expreg.splits import main
---
assert main(["--metadata_csv", sys.argv[1], "--out_csv", sys.argv[2], "--check_images", "none", "--seed", "0"]) == 0
"""

BUILD = """import datasets
from expreg.data import load_expression_dataset
---
ds = load_expression_dataset(sys.argv[1], sys.argv[2], check_images="none")
assert sum(len(part) for part in ds.values()) == int(sys.argv[3])
"""

TRAIN_RSS = """
import json, sys
from expreg.config import load_recipe
from expreg.training.launch import build_accelerator
from expreg.training.trainer import Trainer

def rss_gb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6

rss = []

class RecordingTrainer(Trainer):
    # a run that records its resident memory after each epoch's validation pass
    def evaluate(self):
        result = super().evaluate()
        rss.append(rss_gb())
        return result

cfg = load_recipe(sys.argv[1], sys.argv[2:])
trainer = RecordingTrainer(cfg, build_accelerator(cfg, cpu=True))
trainer.setup()
trainer.train()
print(json.dumps({"rss_gb": rss}))
"""


def write_csv(path: Path, rows: int) -> None:
    """``rows`` rows, 50 rows per group (20,000 groups at 1M), Poisson counts as targets."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    groups = rng.integers(0, max(2, rows // 50), rows)
    frame = pd.DataFrame(rng.poisson(3.0, (rows, 50)).astype(np.int32), columns=[f"y{i}" for i in range(50)])
    frame.insert(0, "group_id", [f"patient_{g:05d}" for g in groups])
    frame.insert(0, "path", [f"images/patient_{g:05d}/spot_{i:07d}.png" for i, g in enumerate(groups)])
    frame.to_csv(path, index=False)


def measure(code: str, *args: str) -> dict:
    """Run ``imports --- body`` in a fresh process; the time covers the body only, the RSS the whole process."""
    imports, body = (part.strip() for part in code.split("---"))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE.format(imports=imports, body=body), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_rss(epochs: int, metadata_csv: str, out: str) -> list[float]:
    overrides = [
        f"data.metadata_csv={metadata_csv}",
        "data.image_size=64",
        "model.backbone=test_resnet",
        f"train.epochs={epochs}",
        "train.early_stopping_patience=null",
        f"logging.output_dir={out}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_RSS, str(REPO / "recipes" / "her2st.yaml"), *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["rss_gb"]


def slope(sizes: list[int], seconds: list[float]) -> str:
    """Growth exponent between the two largest sizes (1.0 = linear in rows)."""
    if len(sizes) < 2:
        return "n/a"
    return f"{math.log(seconds[-1] / seconds[-2]) / math.log(sizes[-1] / sizes[-2]):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the training-memory run (0: skip it)")
    parser.add_argument("--metadata_csv", default=None, help="images for the training-memory run (default her2st_dev)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            csv, split = Path(tmp) / f"m{rows}.csv", Path(tmp) / f"s{rows}.csv"
            write_csv(csv, rows)
            results[rows] = {
                "splits": measure(SPLITS, str(csv), str(split)),
                "build": measure(BUILD, str(csv), str(split), str(rows)),
            }
            csv.unlink()
        rss = training_rss(args.epochs, real_data(args.metadata_csv), tmp) if args.epochs else []
    print(f"{'rows':>10} {'splits s':>9} {'splits GB':>10} {'build s':>8} {'build GB':>9}   (peak RSS of the process)")
    for rows, r in results.items():
        s, b = r["splits"], r["build"]
        print(
            f"{rows:>10} {s['seconds']:>9.1f} {s['peak_rss_gb']:>10.2f} {b['seconds']:>8.1f} {b['peak_rss_gb']:>9.2f}"
        )
    sizes = list(results)
    print(
        f"growth exponent between the two largest sizes (1 = linear): splits "
        f"{slope(sizes, [results[n]['splits']['seconds'] for n in sizes])}, build "
        f"{slope(sizes, [results[n]['build']['seconds'] for n in sizes])}"
    )
    if rss:
        print("training process RSS after each epoch (GB): " + ", ".join(f"{v:.3f}" for v in rss))
    print()
    top = results[sizes[-1]]
    print(
        f"splits at {sizes[-1]} rows: {top['splits']['seconds']:.1f} s / 30 s target = {top['splits']['seconds'] / 30:.2f}"
    )
    print(
        f"dataset build at {sizes[-1]} rows: peak RSS {top['build']['peak_rss_gb']:.2f} GB / 2 GB target = "
        f"{top['build']['peak_rss_gb'] / 2:.2f}"
    )
    if rss:
        print(f"training RSS, last epoch / first epoch = {rss[-1] / rss[0]:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
