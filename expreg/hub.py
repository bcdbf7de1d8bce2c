"""python -m expreg.hub RUN_DIR --hub_model_id ORG/NAME [--private]

Push a run's best model to the HuggingFace Hub, or retry a failed push, e.g.
``python -m expreg.hub results/<run> --hub_model_id org/name`` (machinery: ``expreg.modeling.hub``).
Exit codes: 0 pushed; 3 the push failed (no network, no permission, no saved best model).
"""

from __future__ import annotations

import argparse
import sys

from expreg.modeling.hub import HubError, push_best_model


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(prog="python -m expreg.hub", description="Push a run's best model to the Hub.")
    parser.add_argument("run_dir", help="a run directory (its checkpoints/best is pushed, with the model card)")
    parser.add_argument("--hub_model_id", required=True, help="repository id, e.g. my-org/expreg-her2st")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        url = push_best_model(args.run_dir, args.hub_model_id, args.private)
    except HubError as err:
        print(f"expreg.hub: error: {err}", file=sys.stderr)
        return 3
    print(f"pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
