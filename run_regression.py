"""Train an expreg model from a recipe.

accelerate launch run_regression.py recipes/demo.yaml [--dry_run] [section.key=value ...]
accelerate launch run_regression.py --resume results/<run>/checkpoints/last
python run_regression.py recipes/tiny.yaml          # the same, in one process
torchrun --standalone --nproc_per_node=2 run_regression.py --config recipes/demo.yaml   # DDP via torchrun (CPU: ACCELERATE_USE_CPU=1)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="recipe YAML (e.g. recipes/demo.yaml)")
    parser.add_argument("--config", dest="config", help="recipe YAML (alternative to the positional argument)")
    parser.add_argument("--resume", help="continue a run from its checkpoints/last folder")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="3 training steps, a short evaluation and all artifacts, in under a minute (default run names end in __dry_run)",
    )
    parser.add_argument(
        "--push_to_hub", action="store_true", help="push the best model to train.hub_model_id at the end"
    )
    parser.add_argument(
        "--allow_data_change",
        action="store_true",
        help="with --resume: go on although the metadata CSV or split file changed since the run started (warned)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides += [u for u in unknown if "=" in u and not u.startswith("-")]
    bad = [u for u in unknown if u not in args.overrides]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.recipe and "=" in args.recipe:  # only overrides were given
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.recipe and args.config:
        parser.error("give the recipe once: positionally or with --config")
    args.recipe = args.recipe or args.config
    if args.push_to_hub:
        args.overrides.append("train.push_to_hub=true")
    if not args.recipe and not args.resume:
        parser.error("a recipe is required (or --resume DIR)")
    if args.allow_data_change and not args.resume:
        parser.error("--allow_data_change goes with --resume")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from expreg.config import ConfigError, load_recipe
    from expreg.data.metadata import MetadataError
    from expreg.formatting import command_error
    from expreg.modeling.hub import HubError
    from expreg.modeling.model import ModelError
    from expreg.run_dir import RunDirError

    try:
        if args.resume:
            from expreg.training.checkpoint import resume_config

            requested = load_recipe(args.recipe, args.overrides) if args.recipe else None
            cfg = resume_config(args.resume, requested, args.overrides)
        else:
            cfg = load_recipe(args.recipe, args.overrides)
    except (ConfigError, RunDirError) as err:
        command_error("run_regression", f"{err}")
        return 2

    from expreg.data import UnreadableImageError, error_message
    from expreg.training.interrupts import Interrupted, TrainingError
    from expreg.training.launch import build_accelerator, unconnected_launch_error
    from expreg.training.trainer import Trainer

    accelerator = build_accelerator(cfg)
    problem = unconnected_launch_error(accelerator)
    if problem:
        command_error("run_regression", f"{problem}")
        return 2
    try:
        trainer = Trainer(
            cfg, accelerator, resume_from=args.resume, dry_run=args.dry_run, allow_data_change=args.allow_data_change
        )
        trainer.setup()
        trainer.train()
    except (ConfigError, RunDirError, MetadataError, ModelError) as err:
        command_error("run_regression", f"{err}")
        return 2
    except HubError as err:
        command_error("run_regression", f"{err}", every_process=True)
        return 3
    except Interrupted as err:
        print(
            f"run_regression: interrupted by {err}; a checkpoint was saved. Continue with the same launcher "
            f"and number of processes: accelerate launch run_regression.py --resume {resume_hint(cfg, args, trainer.run_dir)} "
            "(or python / torchrun ... run_regression.py --resume ...)",
            file=sys.stderr,
        )
        return 128 + err.signum
    except (TrainingError, UnreadableImageError) as err:
        command_error("run_regression", f"{error_message(err)}", every_process=True)
        return 1
    except OSError as err:  # disk full, read-only output, ...: metrics.json says the run did not finish
        command_error("run_regression", f"{err}", every_process=True)
        return 1
    accelerator.end_training()
    return 0


def resume_hint(cfg, args, run_dir) -> str:
    """Where the interrupted run's checkpoint is (the main process names it in the log)."""
    from pathlib import Path

    if args.resume:
        return args.resume
    return (
        str(Path(run_dir) / "checkpoints" / "last") if run_dir else f"{cfg.logging.output_dir}/<run>/checkpoints/last"
    )


if __name__ == "__main__":
    sys.exit(main())
