"""Gene choice (``data.genes=hvg:50``) memory and time: this checkout against a baseline checkout, side by side.

    python benchmarks/bench_gene_choice.py --baseline /path/to/old/checkout [--spots 20000] [--genes 12000]

Both run ``expreg.data.expression.choose_genes`` on the same seeded sparse raw counts (``--spots`` x
``--genes``, about 92 % zeros, library sizes varying 30-fold, every gene detected somewhere) (made once, saved,
loaded by each side) in fresh processes of this interpreter, alternating, ``--repeats`` times (best
time). Printed per side: the time and the memory gene choice adds on top of the counts (peak RSS of
the process minus its RSS once the counts are loaded), then their ratios (this checkout / baseline).
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
sp.save_npz(sys.argv[3], sp.vstack(blocks, format="csr"), compressed=False)
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


def run(repo: Path, counts_file: str, method: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    # cwd = the checkout: `python -c` puts the working directory before PYTHONPATH on sys.path
    result = subprocess.run(
        [sys.executable, "-c", CODE, counts_file, method], capture_output=True, text=True, env=env, cwd=repo
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
    args = parser.parse_args()
    sides = {"this checkout": REPO}
    if args.baseline != "none":  # none: this checkout alone (a size the dense baseline cannot hold)
        sides["baseline"] = Path(args.baseline).resolve()
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = str(Path(tmp) / "counts.npz")
        subprocess.run([sys.executable, "-c", MAKE, str(args.spots), str(args.genes), counts_file], check=True)
        for _ in range(args.repeats):
            for name, repo in sides.items():
                got = run(repo, counts_file, args.method)
                if name not in best or got["seconds"] < best[name]["seconds"]:
                    best[name] = got
    new = best["this checkout"]
    print(
        f"{args.method}:50 on {args.spots:,} spots x {args.genes:,} genes ({new['nnz']:,} non-zeros; "
        f"{new['eligible']:,} genes detected in >= 1 % of the spots)"
    )
    for name, r in best.items():
        print(
            f"{name:14} {r['seconds']:7.1f} s  +{r['extra_gb']:.2f} GB over the counts (peak RSS "
            f"{r['peak_gb']:.2f} GB)  first genes {r['genes']}"
        )
    if "baseline" not in best:
        return
    old = best["baseline"]
    assert new["genes"] == old["genes"], "the two checkouts chose different genes"
    print(
        f"ratio this / baseline: time {new['seconds'] / old['seconds']:.2f}, "
        f"extra memory {new['extra_gb'] / max(old['extra_gb'], 1e-9):.2f} (same genes: yes)"
    )


if __name__ == "__main__":
    main()
