"""The table of docs/pages/spatial-context.md: single patch vs multiscale (fine-tuned) and the frozen linear probe
with and without neighbourhood features, leave-one-patient-out, the same folds, genes and seeds.

    python -m expreg.prepare --samples examples/her2st_st_samples.csv --out_dir data/her2st_st_context --context_um 336
    python benchmarks/context_table.py --out results/context_table --seeds 42 1 2        # runs what is missing
    python benchmarks/context_table.py --out results/context_table --collect             # prints the table

Each (experiment, seed) is one ``python -m expreg.cv`` into ``<out>/<experiment>_s<seed>`` (a finished
one, with its ``cv_summary.json``, is kept). The fine-tuned runs leave out the 8-view TTA score
(``--no_tta``). The table gives, per method, the mean over seeds of its mean over the two folds, ± the
std over seeds, the std over folds (mean over seeds), and how many seeds ran.
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
DEV = "../shared/data/her2st_dev/metadata.csv"
PROBES = "linear_probe,linear_probe_neighbourhood"
RINGS2 = ["data.neighbourhood_rings=2", "--methods", "linear_probe_neighbourhood"]
NEIGHBOURHOOD = "model.context=neighbourhood"
FROZEN = ["train.mode=frozen", "data.hed_jitter=0", "--methods", "frozen"]  # the trained head on cached embeddings
EXPERIMENTS = {  # name: (data set, recipe, arguments)
    "dev_probe": ("her2st_dev", "recipes/her2st.yaml", [f"data.metadata_csv={DEV}", "--methods", PROBES]),
    "dev_probe2": ("her2st_dev", "recipes/her2st.yaml", [f"data.metadata_csv={DEV}", *RINGS2]),
    "dev_frozen": ("her2st_dev", "recipes/her2st.yaml", [f"data.metadata_csv={DEV}", *FROZEN]),
    "dev_frozen_nb": ("her2st_dev", "recipes/her2st.yaml", [f"data.metadata_csv={DEV}", NEIGHBOURHOOD, *FROZEN]),
    "st_probe": ("her2st_st", "recipes/her2st_st_context.yaml", ["model.context=none", "--methods", PROBES]),
    "st_probe2": ("her2st_st", "recipes/her2st_st_context.yaml", ["model.context=none", *RINGS2]),
    "st_frozen": ("her2st_st", "recipes/her2st_st_context.yaml", ["model.context=none", *FROZEN]),
    "st_frozen_nb": ("her2st_st", "recipes/her2st_st_context.yaml", [NEIGHBOURHOOD, *FROZEN]),
    "st_single": ("her2st_st", "recipes/her2st_st_context.yaml", ["model.context=none", "--methods", "finetune"]),
    "st_multi": ("her2st_st", "recipes/her2st_st_context.yaml", ["--methods", "finetune"]),
    "st_multi_gated": ("her2st_st", "recipes/her2st_st_context.yaml", ["model.fusion=gated", "--methods", "finetune"]),
    "st_multi_separate": (
        "her2st_st",
        "recipes/her2st_st_context.yaml",
        ["model.context_encoder=separate", "--methods", "finetune"],
    ),
}
ROWS = [  # (experiment, method, label)
    ("dev_probe", "linear_probe", "linear probe"),
    ("dev_probe", "linear_probe_neighbourhood", "linear probe + neighbourhood (one ring)"),
    ("dev_probe2", "linear_probe_neighbourhood", "linear probe + neighbourhood (two rings)"),
    ("dev_frozen", "frozen", "frozen encoder, trained head"),
    ("dev_frozen_nb", "frozen", "frozen encoder, trained head + neighbourhood (one ring)"),
    ("st_probe", "linear_probe", "linear probe"),
    ("st_probe", "linear_probe_neighbourhood", "linear probe + neighbourhood (one ring)"),
    ("st_probe2", "linear_probe_neighbourhood", "linear probe + neighbourhood (two rings)"),
    ("st_frozen", "frozen", "frozen encoder, trained head"),
    ("st_frozen_nb", "frozen", "frozen encoder, trained head + neighbourhood (one ring)"),
    ("st_single", "finetune", "fine-tuned, single patch (112 µm)"),
    ("st_multi", "finetune", "fine-tuned, multiscale (112 + 336 µm), shared encoder, concatenated"),
    ("st_multi_gated", "finetune", "fine-tuned, multiscale, shared encoder, gated fusion"),
    ("st_multi_separate", "finetune", "fine-tuned, multiscale, separate context encoder, concatenated"),
]


def run(out: Path, seeds: list[int], only: list[str] | None = None) -> None:
    for seed in seeds:
        for name, (_, recipe, arguments) in EXPERIMENTS.items():
            if only and name not in only:
                continue
            folder = out / f"{name}_s{seed}"
            if (folder / "cv_summary.json").is_file():
                continue
            if folder.exists():  # an interrupted run: expreg.cv never writes into an existing folder
                print(f"{folder}: incomplete (no cv_summary.json), run again", flush=True)
                shutil.rmtree(folder)
            command = [sys.executable, "-m", "expreg.cv", recipe, *arguments, f"seed={seed}", "--out_dir", str(folder)]
            if "finetune" in arguments:
                command.append("--no_tta")
            print("+", " ".join(command), flush=True)
            subprocess.run(command, cwd=REPO, check=True)


def collect(out: Path) -> str:
    lines = [
        "| data | method | held-out mean Spearman (mean over seeds ± std over seeds) | std over folds | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, method, label in ROWS:
        summaries = [json.loads(f.read_text()) for f in _summaries(out, name)]
        folds = [
            [f["spearman_mean"] for f in s["methods"][method]["folds"]] for s in summaries if method in s["methods"]
        ]
        if not folds:
            continue
        means = [statistics.mean(f) for f in folds]
        spread = statistics.stdev(means) if len(means) > 1 else 0.0
        fold_std = statistics.mean(statistics.stdev(f) for f in folds)
        data = EXPERIMENTS[name][0]
        lines.append(
            f"| {data} | {label} | {statistics.mean(means):.4f} ± {spread:.4f} | {fold_std:.4f} | {len(means)} |"
        )
    return "\n".join(lines)


def _summaries(out: Path, name: str) -> list[Path]:
    """The finished runs of experiment ``name`` (``<name>_s<seed>``, not another experiment named like it)."""
    found = out.glob(f"{name}_s*/cv_summary.json")
    return sorted(f for f in found if re.fullmatch(rf"{re.escape(name)}_s\d+", f.parent.name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/context_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--collect", action="store_true", help="only print the table of what has run")
    parser.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), help="run these experiments alone")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.collect:
        run(out, args.seeds, args.only)
    print(collect(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
