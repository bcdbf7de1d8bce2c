"""python -m expreg.aggregate [--results_dir results] [--out_md results/summary.md]

One Markdown table of all runs under a folder (machinery: ``expreg.evaluation.aggregate``). Also
installed as ``expreg-aggregate``. Exit codes: 0 done; 2 ``--results_dir`` is not a folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expreg.evaluation.aggregate import collect, render


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(prog="expreg-aggregate", description="One Markdown table of all runs.")
    parser.add_argument("--results_dir", default="results", help="folder holding run directories (default results)")
    parser.add_argument("--out_md", help="also write the table to this Markdown file")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    try:
        table = render(collect(results_dir), results_dir)
    except FileNotFoundError as err:
        print(f"expreg-aggregate: error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out_md:
        from expreg.run_dir import atomic_write_text

        atomic_write_text(Path(args.out_md), table)
        print(f"\nwrote {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
