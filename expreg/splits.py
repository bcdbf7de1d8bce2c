"""python -m expreg.splits --metadata_csv CSV --out_csv SPLIT_CSV [--seed S] [--val_frac F] [--test_frac F] [--n_folds K]

Make a group-aware split or group k-fold file from a metadata CSV (machinery: ``expreg.data.splits``), e.g.

    python -m expreg.splits --metadata_csv data.csv --out_csv splits/my_split.csv --seed 42
    python -m expreg.splits --metadata_csv data.csv --out_csv splits/folds.csv --n_folds 5

Also installed as ``expreg-splits``. Exit codes: 0 written; 2 bad metadata, or ``--out_csv`` exists
(without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import sys

from expreg.data import MetadataError, read_metadata
from expreg.data.splits import make_fold_table, make_split_table, write_table


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(
        prog="expreg-splits",
        description="Make a group-aware (e.g. patient-level) split or group k-fold file from a metadata CSV.",
    )
    parser.add_argument("--metadata_csv", required=True, help="metadata CSV with path, group_id, y0..")
    parser.add_argument("--out_csv", required=True, help="split file to write, e.g. splits/my_split.csv")
    parser.add_argument("--seed", type=int, default=42, help="seed of the group assignment (default 42)")
    parser.add_argument("--val_frac", type=float, default=0.2, help="validation fraction of samples (default 0.2)")
    parser.add_argument("--test_frac", type=float, default=0.0, help="test fraction of samples (default 0: no test)")
    parser.add_argument(
        "--n_folds", type=int, default=None, help="group k-fold instead of a split; = number of groups for LOGO"
    )
    parser.add_argument(
        "--check_images",
        choices=["none", "exists", "decode"],
        default="exists",
        help="image check before splitting: none, exists (default) or decode (open every image)",
    )
    parser.add_argument(
        "--patches", help="a patch store (expreg.prepare --store shards) holding the images of --metadata_csv"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out_csv if it exists")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metadata = read_metadata(args.metadata_csv, check_images=args.check_images, patches=args.patches)
        if args.n_folds is not None:
            table, summary = make_fold_table(metadata, args.n_folds, args.seed)
        else:
            table, summary = make_split_table(metadata, args.val_frac, args.test_frac, args.seed)
        out = write_table(table, args.out_csv, overwrite=args.overwrite)
    except (MetadataError, FileExistsError) as err:
        print(f"expreg-splits: error: {err}", file=sys.stderr)
        return 2
    n_groups = metadata.frame["group_id"].nunique()
    print(f"{len(table)} samples in {n_groups} groups from {metadata.csv_path} (seed {args.seed})")
    print(summary.format())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
