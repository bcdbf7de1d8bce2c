"""Command: patient-level cross-validation in one command (machinery: ``expreg.evaluation.cv``).

    python -m expreg.cv recipes/her2st.yaml data.metadata_csv=../shared/data/her2st_dev/metadata.csv
    python -m expreg.cv recipes/demo.yaml --n_folds 4 --methods finetune,ridge,mean

See ``expreg.evaluation.cv`` for what each method does and what is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from expreg.config import ConfigError, load_recipe
from expreg.data.metadata import MetadataError
from expreg.evaluation.cv import METHODS, cross_validate, render_markdown
from expreg.run_dir import RunDirError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expreg.cv", description="Patient-level cross-validation.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/her2st.yaml")
    parser.add_argument(
        "--n_folds", type=int, help="group folds (default: leave-one-group-out up to 10 groups, else 5)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--out_dir", help="where to write (default <logging.output_dir>/cv__<recipe>__<timestamp>)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for run_regression.py")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(
                f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
            )
        cfg = load_recipe(args.recipe, args.overrides)
        if cfg.data.split_csv is not None or cfg.data.fold is not None:
            raise ConfigError("expreg.cv makes its own group folds: do not set data.split_csv or data.fold")
        if cfg.train.stop_after_steps is not None and "finetune" in methods:
            raise ConfigError("train.stop_after_steps: every fold of expreg.cv trains to the end; unset it")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_dir = Path(args.out_dir or Path(cfg.logging.output_dir) / f"cv__{Path(args.recipe).stem}__{stamp}")
        if out_dir.exists():
            raise ConfigError(f"--out_dir {out_dir} exists; cross-validation results are never overwritten")
        return _run(cfg, args, methods, out_dir)
    except (ConfigError, MetadataError, RunDirError) as err:
        print(f"expreg.cv: error: {err}", file=sys.stderr)
        return 2


def _run(cfg, args, methods: list[str], out_dir: Path) -> int:
    """Cross-validate, mapping failures to exit codes as ``run_regression.py`` does (1 failure, 128+N signal)."""
    from expreg.data.dataset import UnreadableImageError, error_message
    from expreg.training.trainer import Interrupted, TrainingError

    try:
        summary = cross_validate(cfg, Path(args.recipe).name, args.n_folds, methods, out_dir)
    except Interrupted as err:
        print(f"expreg.cv: interrupted by {err}; {out_dir} is incomplete (no cv_summary.json)", file=sys.stderr)
        return 128 + err.signum
    except (TrainingError, UnreadableImageError, OSError) as err:
        print(f"expreg.cv: error: {error_message(err)}; {out_dir} is incomplete (no cv_summary.json)", file=sys.stderr)
        return 1
    print()
    print(render_markdown(summary))
    print(f"wrote {out_dir / 'cv_summary.json'} and {out_dir / 'cv_summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
