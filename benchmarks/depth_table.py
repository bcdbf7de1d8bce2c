"""The gene-choice table of docs/pages/evaluating.md ("What the score means"): raw and depth-adjusted held-out scores of
hvg (detection >= 0.1), hvg (detection >= 0.5), svg and a literature panel, leave-one-patient-out on
the six her2st_st sections, for finetune, the frozen linear probe and the two depth baselines.

    python -m expreg.prepare --samples examples/her2st_st_samples.csv --out_dir data/her2st_st
    python benchmarks/depth_table.py --out results/depth_table --seeds 42 43 44            # runs what is missing
    python benchmarks/depth_table.py --out results/depth_table --collect                   # prints the table

Each (gene set, seed) is one ``python -m expreg.cv recipes/her2st_st.yaml`` into ``<out>/<set>_s<seed>``
(a finished one, with its ``cv_summary.json``, is kept). ``depth_from_image`` (a model of each spot's
depth alone, the same for every gene set) runs with the first seed only; its score depends on the gene
set only through the genes it is scored on. The table gives mean over seeds of each method's mean over
the two folds, ± the std over seeds (over folds where there is one seed), and how many seeds ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = {
    "hvg01": ("hvg:50, detected in >= 10 %", ["data.min_gene_detection=0.1"]),
    "hvg05": ("hvg:50, detected in >= 50 % (the recipe before)", []),
    "svg": ("svg:50 (Moran's I), detected in >= 50 %", ["data.genes=svg:50"]),
    "panel": ("HER2+ panel (32 genes)", ["data.genes=recipes/genes/her2_breast_panel.txt"]),
}
METHODS = ["finetune", "linear_probe", "depth_from_image", "depth_oracle"]


def run(out: Path, seeds: list[int]) -> None:
    for seed in seeds:
        for name, (_, overrides) in SETS.items():
            folder = out / f"{name}_s{seed}"
            if (folder / "cv_summary.json").is_file():
                continue
            methods = METHODS if seed == seeds[0] else [m for m in METHODS if m != "depth_from_image"]
            command = [sys.executable, "-m", "expreg.cv", "recipes/her2st_st.yaml", "--out_dir", str(folder)]
            command += ["--methods", ",".join(methods), f"seed={seed}", *overrides]
            print(" ".join(command), flush=True)
            subprocess.run(command, cwd=REPO, check=True)


def collect(out: Path) -> str:
    """The markdown table of every finished run under ``out``."""
    lines = [
        "| genes (chosen per fold on the training patient) | method | mean Spearman | depth-adjusted | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, (label, _) in SETS.items():
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}_s*/cv_summary.json"))]
        for method in METHODS:
            runs = [s["methods"][method] for s in summaries if method in s["methods"]]
            if not runs:
                continue
            raw = _cell([r["spearman_mean"] for r in runs], runs[0].get("spearman_std"))
            adjusted = _cell(
                [r.get("spearman_depth_adjusted_mean") for r in runs], runs[0].get("spearman_depth_adjusted_std")
            )
            lines.append(f"| {label} | {method} | {raw} | {adjusted} | {len(runs)} |")
            label = ""
    return "\n".join(lines)


def _cell(values: list, fold_std) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}" + (f" (± {fold_std:.4f} over folds)" if fold_std is not None else "")
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/depth_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--collect", action="store_true", help="print the table of what has run; run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.collect:
        run(out, args.seeds)
    print(collect(out))


if __name__ == "__main__":
    main()
