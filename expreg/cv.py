"""python -m expreg.cv RECIPE [--n_folds K | --hest_task DIR] [--methods M,...] [--out_dir DIR] [section.key=value ...]

Patient-level cross-validation in one command (machinery: ``expreg.evaluation.cv``), e.g.

    python -m expreg.cv recipes/her2st.yaml data.metadata_csv=../shared/data/her2st_dev/metadata.csv
    python -m expreg.cv recipes/demo.yaml --n_folds 4 --methods finetune,ridge,mean
    python -m expreg.cv recipes/her2st.yaml --hest_task bench_data/IDC --methods linear_probe,ridge,mean

``--hest_task`` runs on a HEST-Benchmark task folder instead of the recipe's data: its samples,
its folds (``splits/test_<i>.csv``) and its targets (log1p of the counts of its genes), read by
``expreg.ingest.hest_bench`` and materialised once into ``$EXPREG_CACHE/hest_tasks``.

See ``expreg.evaluation.cv`` for what each method does and what is written. The ``finetune``
method trains through ``expreg.training.folds.finetune_fold``, bound here to the recipe's
accelerator. Exit codes: 0 done; 1 failed (training error, unreadable image, I/O error); 2 bad
recipe, arguments, metadata or encoder folder; 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from expreg.config import ConfigError, load_recipe
from expreg.data import MetadataError
from expreg.evaluation.cv import (
    DEFAULT_METHODS,
    HEST_PROBE,
    METHODS,
    PROBES,
    check_config,
    cross_validate,
    output_dir,
    parse_methods,
    render_markdown,
)
from expreg.formatting import command_error
from expreg.modeling.encoders import ModelError
from expreg.run_dir import RunDirError


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(prog="python -m expreg.cv", description="Patient-level cross-validation.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/her2st.yaml")
    parser.add_argument(
        "--n_folds", type=int, help="group folds (default: leave-one-group-out up to 10 groups, else 5)"
    )
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {', '.join(METHODS)}"
    )
    parser.add_argument("--out_dir", help="where to write (default <logging.output_dir>/cv__<recipe>__<timestamp>)")
    parser.add_argument(
        "--hest_task",
        help="a HEST-Benchmark task folder (bench_data/<TASK>): its samples, folds and genes replace the recipe's data",
    )
    parser.add_argument(
        "--no_tta",
        action="store_true",
        help="leave out finetune's test-time-augmentation score (it predicts every held-out image 8 more times: "
        "most of a large cohort's CV time)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for run_regression.py")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        masked = cfg.data.allow_unmeasured_genes  # HEST's probe cannot leave masked targets out
        methods = parse_methods(args.methods, hest_probe=not masked)
        if masked and args.methods == ",".join(DEFAULT_METHODS):
            methods = [m for m in methods if m != HEST_PROBE]
        check_config(cfg, methods, args.hest_task, args.n_folds)
        return _run(cfg, args, methods, output_dir(cfg, args.recipe, args.out_dir))
    except (ConfigError, MetadataError, RunDirError, ModelError) as err:
        command_error("expreg.cv", f"{err}")
        return 2


def _run(cfg, args, methods: list[str], out_dir: Path) -> int:
    """Cross-validate, mapping failures to exit codes as ``run_regression.py`` does (1 failure, 128+N signal)."""
    from expreg.data import UnreadableImageError, error_message
    from expreg.training.interrupts import Interrupted, TrainingError

    try:
        accelerator, finetune = _finetune(cfg, methods, tta=not args.no_tta)
        summary = cross_validate(
            cfg,
            Path(args.recipe).name,
            args.n_folds,
            methods,
            out_dir,
            finetune,
            hest_task=args.hest_task,
            accelerator=accelerator,
        )
        if accelerator is not None:
            accelerator.end_training()
    except Interrupted as err:
        print(f"expreg.cv: interrupted by {err}; {out_dir} is incomplete (no cv_summary.json)", file=sys.stderr)
        return 128 + err.signum
    except (TrainingError, UnreadableImageError, OSError) as err:
        command_error(
            "expreg.cv", f"{error_message(err)}; {out_dir} is incomplete (no cv_summary.json)", every_process=True
        )
        return 1
    except ModelError as err:  # weights that do not fit the encoder (read once embedding starts)
        command_error("expreg.cv", f"{err}; {out_dir} is incomplete (no cv_summary.json)")
        return 2
    print()
    print(render_markdown(summary))
    print(f"wrote {out_dir / 'cv_summary.json'} and {out_dir / 'cv_summary.md'}")
    return 0


def _finetune(cfg, methods: list[str], tta: bool = True):
    """``(accelerator, finetune)``: the recipe's accelerator when a method runs a model (training runs, and the
    probes' embeddings, built on its device), and the training of a fold bound to it (or None)."""
    if not {"finetune", "frozen", "depth_from_image", *PROBES} & set(methods):
        return None, None
    from expreg.training.folds import finetune_fold
    from expreg.training.launch import build_accelerator, unconnected_launch_error

    accelerator = build_accelerator(cfg)  # the recipe's precision, accumulation and trackers
    problem = unconnected_launch_error(accelerator)
    if problem:
        raise ConfigError(problem)
    trains = {"finetune", "frozen", "depth_from_image"} & set(methods)
    return accelerator, functools.partial(finetune_fold, accelerator=accelerator, tta=tta) if trains else None


if __name__ == "__main__":
    sys.exit(main())
