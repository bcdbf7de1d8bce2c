"""python -m expreg.plots RUN_DIR

(Re)draw the plots of a finished run, e.g. ``python -m expreg.plots results/<run>`` (machinery:
``expreg.evaluation.plots.redraw_run_plots``).
"""

from __future__ import annotations

import argparse
import sys

from expreg.evaluation.plots import redraw_run_plots


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(prog="python -m expreg.plots", description="Draw a finished run's plots.")
    parser.add_argument(
        "run_dir", help="a finished run's directory (results/<run>); its plots are drawn again from its files"
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in redraw_run_plots(args.run_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
