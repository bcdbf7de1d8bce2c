"""Ranking speed of ``expreg.metrics`` against scipy and the argsort floor.

    python benchmarks/bench_metrics.py [--rows 100000] [--genes 50] [--repeats 7]

For a (rows x genes) matrix, with ties (count-like values) and without, this times in one
process, alternating the candidates, median of ``--repeats``:

- ``expreg``: ``expreg.metrics.rank_columns`` (average ranks for ties),
- ``scipy loop``: ``scipy.stats.rankdata`` gene by gene,
- ``argsort``: one ``np.argsort(x, axis=0)`` of the whole matrix (the floor: ranking needs a sort),
- ``argsort (transposed copy)``: ``np.argsort`` of a gene-major copy, the sort expreg itself runs.

Targets (issue 2): expreg no slower than the scipy loop, and within 1.5x of the argsort floor.
The ratios are printed last.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy
import scipy.stats

from expreg.evaluation.metrics import rank_columns


def _median_times(candidates: dict, x: np.ndarray, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():  # alternate so drift hits all candidates alike
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    inputs = {
        "with ties (Poisson counts)": rng.poisson(2.0, size=(args.rows, args.genes)).astype(np.float64),
        "no ties (Gaussian)": rng.normal(size=(args.rows, args.genes)),
    }
    candidates = {
        "expreg": rank_columns,
        "scipy loop": lambda x: [scipy.stats.rankdata(x[:, j]) for j in range(x.shape[1])],
        "argsort": lambda x: np.argsort(x, axis=0),
        "argsort (transposed copy)": lambda x: np.argsort(np.ascontiguousarray(x.T), axis=1),
    }
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, {platform.machine()}"
    )
    print(f"{args.rows} x {args.genes}, median of {args.repeats}")
    ratios = []
    for label, x in inputs.items():
        assert np.array_equal(rank_columns(x), scipy.stats.rankdata(x, axis=0))
        t = _median_times(candidates, x, args.repeats)
        print(f"\n{label}")
        for name, seconds in t.items():
            print(f"  {name:<28}{seconds * 1000:9.1f} ms")
        ratios.append((label, t["expreg"] / t["scipy loop"], t["expreg"] / t["argsort"]))
    print()
    for label, vs_scipy, vs_floor in ratios:
        print(
            f"{label}: expreg/scipy loop = {vs_scipy:.2f} (target <= 1.0), expreg/argsort = {vs_floor:.2f} (target <= 1.5)"
        )


if __name__ == "__main__":
    main()
