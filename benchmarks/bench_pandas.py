"""pandas 2.x (what anndata allows on Python 3.11) against pandas 3.x, side by side in one run.

    python benchmarks/bench_pandas.py --python /path/to/pandas3-venv/bin/python [--rows 1000000] [--repeats 2]

The interpreter running this script is one side (its pandas, e.g. 2.3 with anndata installed);
``--python`` names the other (e.g. a venv of the same expreg with pandas 3.1). Both run this
checkout's code (``PYTHONPATH`` = the repository). Each measurement runs in a fresh process, the
two interpreters alternating, ``--repeats`` times; the best time and the peak RSS are printed:

1. ``expreg-splits`` on a ``--rows``-row metadata CSV (``benchmarks/bench_scale.py``'s synthetic
   CSV: 50 integer-count genes, 50 rows per group);
2. ``load_expression_dataset`` with that split (read + validate + stream each split to Arrow);
3. start-up: ``import expreg`` and ``import expreg.splits`` (pandas included), wall time of the
   import in a fresh process.

The last lines print each figure of the first interpreter over the second (ratio > 1: slower).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402
from bench_scale import BUILD, MEASURE, SPLITS, write_csv  # noqa: E402

IMPORT = """import json, resource, time
start = time.perf_counter()
import {module}
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))
"""


def run(python: str, code: str, *args: str) -> dict:
    """``code`` in a fresh ``python`` process with this checkout first on its path; its last JSON line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(f"{python}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step(code: str) -> str:
    imports, body = (part.strip() for part in code.split("---"))
    return MEASURE.format(imports=imports, body=body)


def versions(python: str) -> str:
    code = "import json, pandas, sys; print(json.dumps({'v': f'pandas {pandas.__version__}, Python {sys.version.split()[0]}'}))"
    return run(python, code)["v"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="the other interpreter (e.g. a venv with pandas 3)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sides = {versions(sys.executable): sys.executable, versions(args.python): args.python}
    if len(sides) != 2:
        sys.exit("both interpreters have the same pandas and Python: nothing to compare")
    tasks = {
        "expreg-splits": lambda csv, split: (step(SPLITS), str(csv), str(split.with_name(f"s{next(count)}.csv"))),
        "dataset build": lambda csv, split: (step(BUILD), str(csv), str(split), str(args.rows)),
        "import expreg": lambda csv, split: (IMPORT.format(module="expreg"),),
        "import expreg.splits": lambda csv, split: (IMPORT.format(module="expreg.splits"),),
    }
    best: dict = {name: {side: None for side in sides} for name in tasks}
    count = itertools.count()  # each splits run writes a new file (the split the build reads: the first)
    with tempfile.TemporaryDirectory() as tmp:
        csv, split = Path(tmp) / "metadata.csv", Path(tmp) / "s0.csv"
        write_csv(csv, args.rows)
        for _ in range(args.repeats):
            for name, make in tasks.items():
                for side, python in sides.items():  # alternating: both see the same machine load
                    got = run(python, *make(csv, split))
                    old = best[name][side]
                    if old is None or got["seconds"] < old["seconds"]:
                        best[name][side] = got
    first, second = list(sides)
    print(f"{args.rows:,} rows; best of {args.repeats} fresh processes; peak RSS of the process")
    print(f"{'':22} | {first:>36} | {second:>36} | ratio (time, RSS)")
    for name, by_side in best.items():
        a, b = by_side[first], by_side[second]
        print(
            f"{name:22} | {a['seconds']:>9.2f} s {a['peak_rss_gb']:>9.2f} GB {'':14} | "
            f"{b['seconds']:>9.2f} s {b['peak_rss_gb']:>9.2f} GB {'':14} | "
            f"{a['seconds'] / b['seconds']:.2f}, {a['peak_rss_gb'] / b['peak_rss_gb']:.2f}"
        )


if __name__ == "__main__":
    main()
