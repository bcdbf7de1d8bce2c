"""A positive control for spatial context: synthetic sections where part of each spot's expression follows its
neighbours' tissue, which no image of the spot alone shows. Does the neighbourhood model find it?

    python benchmarks/context_control.py --out results/context_control --seeds 42 1 2   # runs what is missing
    python benchmarks/context_control.py --out results/context_control --collect        # prints the table

The data are the demo generator's (``expreg.data.demo.make_synthetic_dataset``: 8 patients, ~60 spots each,
64 px) with ``neighbourhood_effect`` 0 (none: the demo as it is, placed on a lattice) and 0.5 (half of the
hidden factors behind expression are the mean of the spot's four lattice neighbours'). Each (effect, seed):
``expreg.cv`` with 4 group folds of recipes/demo.yaml, the single-spot methods (linear probe, frozen encoder
with a trained head) and the neighbourhood ones (linear probe and trained head on each spot's embedding beside
its neighbourhood's mean, one lattice ring), on the same folds. Random-init resnet18, as everywhere here.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EFFECTS = (0.0, 0.5)
RUNS = {  # name: (arguments, methods)
    "single": ([], "linear_probe,linear_probe_neighbourhood,frozen"),
    "neighbourhood": (["model.context=neighbourhood", "train.mode=frozen"], "frozen"),
}
ROWS = [  # (run, method, label)
    ("single", "linear_probe", "linear probe"),
    ("single", "linear_probe_neighbourhood", "linear probe + neighbourhood"),
    ("single", "frozen", "frozen encoder, trained head"),
    ("neighbourhood", "frozen", "frozen encoder, trained head + neighbourhood (model.context=neighbourhood)"),
]


def data(out: Path, effect: float) -> Path:
    """The control data set of ``effect`` (made once, with positions even at 0)."""
    from expreg.data.demo import make_synthetic_dataset

    folder = out / f"data_w{effect:g}"
    csv = folder / "metadata.csv"
    if not csv.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        make_synthetic_dataset(folder, neighbourhood_effect=effect, positions=True)
    return csv


def run(out: Path, seeds: list[int]) -> None:
    for effect in EFFECTS:
        csv = data(out, effect)
        for seed in seeds:
            for name, (arguments, methods) in RUNS.items():
                folder = out / f"w{effect:g}_{name}_s{seed}"
                if (folder / "cv_summary.json").is_file():
                    continue
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted run: expreg.cv never reuses a folder
                command = [sys.executable, "-m", "expreg.cv", "recipes/demo.yaml", f"data.metadata_csv={csv}"]
                command += ["data.num_workers=0", *arguments, f"seed={seed}", "--n_folds", "4"]
                command += ["--methods", methods, "--out_dir", str(folder)]
                print("+", " ".join(command), flush=True)
                subprocess.run(command, cwd=REPO, check=True)


def collect(out: Path) -> str:
    lines = [
        "| planted neighbourhood effect | method | held-out mean Spearman (mean over seeds ± std over seeds) "
        "| std over folds | seeds |",
        "|---|---|---|---|---|",
    ]
    for effect in EFFECTS:
        for name, method, label in ROWS:
            found = sorted(out.glob(f"w{effect:g}_{name}_s*/cv_summary.json"))
            summaries = [json.loads(f.read_text()) for f in found if re.fullmatch(r".*_s\d+", f.parent.name)]
            folds = [[f["spearman_mean"] for f in s["methods"][method]["folds"]] for s in summaries]
            if not folds:
                continue
            means = [statistics.mean(f) for f in folds]
            spread = statistics.stdev(means) if len(means) > 1 else 0.0
            fold_std = statistics.mean(statistics.stdev(f) for f in folds)
            lines.append(
                f"| {effect:g} | {label} | {statistics.mean(means):.4f} ± {spread:.4f} | {fold_std:.4f} | {len(means)} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/context_control")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--collect", action="store_true", help="only print the table of what has run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if not args.collect:
        run(out, args.seeds)
    print(collect(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
