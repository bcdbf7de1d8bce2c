"""Gene choice (``data.genes=hvg:50``) memory and time: this checkout against a baseline checkout, side by side.

    python benchmarks/bench_gene_choice.py --baseline /path/to/old/checkout [--spots 20000] [--genes 12000]
                                           [--source file|memory]

Both sides work on the same seeded sparse raw counts (``--spots`` x ``--genes``, about 92 % zeros, library
sizes varying 30-fold, every gene detected somewhere; made once, saved, read by each side) in fresh
processes of this interpreter, alternating, ``--repeats`` times (best time).

- ``--source file`` (default, what a run does): the counts in an ``expression.h5ad`` (one section per
  3,000 spots); ``expreg.data.expression.expression_targets`` chooses the genes on every spot and makes
  their targets. Printed per side: the time and the process's peak RSS (the counts are not loaded first:
  whatever the code holds of them counts).
- ``--source memory``: ``choose_genes`` on the counts loaded first; printed: the time and the memory gene
  choice adds on top of the counts (peak RSS minus the RSS once they are loaded).

Then their ratios (this checkout / baseline) and whether both chose the same genes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAKE = """
import sys
import numpy as np, scipy.sparse as sp
spots, genes = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
weight = rng.lognormal(0.0, 1.2, genes)  # a few genes everywhere, most in 1-20 % of the spots
cdf = np.cumsum(weight / weight.sum())
blocks = []
for start in range(0, spots, 20_000):  # built 20,000 spots at a time: memory ~ the final matrix
    n = min(20_000, spots - start)
    nnz = int(0.08 * n * genes)
    rows = rng.integers(0, n, nnz)
    cols = np.minimum(np.searchsorted(cdf, rng.random(nnz)), genes - 1)
    block = sp.csr_matrix((rng.integers(1, 6, nnz).astype(np.float32), (rows, cols)), shape=(n, genes))
    block.sum_duplicates()
    blocks.append(sp.csr_matrix(block.multiply(rng.uniform(0.2, 6.0, (n, 1))).astype(np.float32).ceil()))
counts = sp.vstack(blocks, format="csr")
if sys.argv[4] == "memory":
    sp.save_npz(sys.argv[3], counts, compressed=False)
    raise SystemExit
import pandas as pd
from expreg.data.h5ad import write_h5ad
section = np.arange(spots) // 3000
obs = pd.DataFrame({"sample_id": [f"S{s:03d}" for s in section], "barcode": [f"b{i}" for i in range(spots)],
                    "x_px": rng.uniform(0, 1e4, spots), "y_px": rng.uniform(0, 1e4, spots)},
                   index=[f"r{i}" for i in range(spots)])
write_h5ad(sys.argv[3], counts, obs, [f"G{i}" for i in range(genes)])
"""
FROM_FILE = """
import json, resource, sys, time
import h5py, numpy as np, pandas as pd
from expreg.data.expression import expression_targets
from expreg.data.metadata import Metadata

path, method = sys.argv[1], sys.argv[2]
from expreg.data.h5ad import read_h5ad
backed = read_h5ad(path, backed=True)
frame = backed.obs[["sample_id", "barcode"]].astype(str).reset_index(drop=True)
backed.file.close()
frame["group_id"], frame["path"] = "P1", "p.png"
start = time.perf_counter()
table, choice = expression_targets(Metadata(path, frame, [], []), path, np.ones(len(frame), bool), method + ":50",
                                   min_detection=0.01, transform="log1p_cpm")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
with h5py.File(path) as f:
    nnz, genes = int(f["X"]["indptr"][-1]), int(f["X"].attrs["shape"][1])
print(json.dumps({"seconds": seconds, "peak_gb": peak, "extra_gb": None, "genes": choice.genes[:5], "nnz": nnz,
                  "eligible": genes - choice.excluded_rare}))
"""
CODE = """
import json, resource, sys, time
import numpy as np, scipy.sparse as sp
from expreg.data.expression import choose_genes

def rss_gb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6

counts = sp.load_npz(sys.argv[1]).tocsr()
method, (spots, genes) = sys.argv[2], counts.shape
base, start = rss_gb(), time.perf_counter()
rng = np.random.default_rng(1)
choice = choose_genes(counts, [f"G{i}" for i in range(genes)], method + ":50", min_detection=0.01,
                      transform="log1p_cpm", train_groups=["P1"],
                      spots=(rng.uniform(0, 1e4, (spots, 2)), np.arange(spots) // 4000))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
eligible = int((np.bincount(counts.indices, minlength=genes) >= 0.01 * spots).sum())
print(json.dumps({"seconds": seconds, "extra_gb": peak - base, "peak_gb": peak, "genes": choice.genes[:5],
                  "nnz": int(counts.nnz),
                  "eligible": eligible}))
"""


def run(repo: Path, counts_file: str, method: str, source: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    # cwd = the checkout: `python -c` puts the working directory before PYTHONPATH on sys.path
    code = FROM_FILE if source == "file" else CODE
    result = subprocess.run(
        [sys.executable, "-c", code, counts_file, method], capture_output=True, text=True, env=env, cwd=repo
    )
    if result.returncode != 0:
        sys.exit(f"{repo}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="a checkout to compare against, or none (this one alone)")
    parser.add_argument("--spots", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=12_000)
    parser.add_argument("--method", default="hvg", choices=["hvg", "var", "mean", "svg"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--source",
        default="file",
        choices=["file", "memory"],
        help="file: expression_targets on an .h5ad (what a run does); memory: choose_genes on loaded counts",
    )
    args = parser.parse_args()
    sides = {"this checkout": REPO}
    if args.baseline != "none":  # none: this checkout alone (a size the dense baseline cannot hold)
        sides["baseline"] = Path(args.baseline).resolve()
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = str(Path(tmp) / ("expression.h5ad" if args.source == "file" else "counts.npz"))
        make = [sys.executable, "-c", MAKE, str(args.spots), str(args.genes), counts_file, args.source]
        subprocess.run(make, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        for _ in range(args.repeats):
            for name, repo in sides.items():
                got = run(repo, counts_file, args.method, args.source)
                if name not in best or got["seconds"] < best[name]["seconds"]:
                    best[name] = got
    new = best["this checkout"]
    print(
        f"{args.method}:50 on {args.spots:,} spots x {args.genes:,} genes ({new['nnz']:,} non-zeros; "
        f"{new['eligible']:,} genes detected in >= 1 % of the spots)"
    )
    what = "expression_targets from the .h5ad" if args.source == "file" else "choose_genes on loaded counts"
    print(f"({what}; best of {args.repeats})")
    for name, r in best.items():
        extra = "" if r["extra_gb"] is None else f"+{r['extra_gb']:.2f} GB over the counts, "
        print(f"{name:14} {r['seconds']:7.1f} s  {extra}peak RSS {r['peak_gb']:.2f} GB  first genes {r['genes']}")
    if "baseline" not in best:
        return
    old = best["baseline"]
    assert new["genes"] == old["genes"], "the two checkouts chose different genes"
    print(
        f"ratio this / baseline: time {new['seconds'] / old['seconds']:.2f}, "
        f"peak RSS {new['peak_gb'] / old['peak_gb']:.2f}"
        + ("" if new["extra_gb"] is None else f", extra memory {new['extra_gb'] / max(old['extra_gb'], 1e-9):.2f}")
        + " (same genes: yes)"
    )


if __name__ == "__main__":
    main()
