"""python -m expreg.datasets hest (--ids ID ... | --where column=value ...) --out DIR [--list] [--patches]

Public datasets by id into the layouts ``expreg.prepare`` reads. Today: HEST-1k (``MahmoodLab/hest`` on
the HuggingFace Hub, gated: accept its terms on the dataset page, then ``hf auth login``), e.g.

    python -m expreg.datasets hest --where organ=Breast --where "st_technology=Spatial Transcriptomics" --list
    python -m expreg.datasets hest --ids TENX95 TENX99 --out data/hest
    python -m expreg.prepare --samples data/hest/samples.csv --out_dir data/hest_prepared

(machinery: ``expreg.ingest.hest_hub``). Exit codes: 0 done; 2 bad arguments, unknown ids, no access
or no network (one line saying what to do); 1 an I/O error.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(prog="python -m expreg.datasets", description="Public datasets by id.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    hest = sub.add_parser("hest", help="HEST-1k samples by id or metadata, from the HuggingFace Hub")
    hest.add_argument("--ids", nargs="+", default=[], help="HEST-1k sample ids (the metadata table's id column)")
    hest.add_argument(
        "--where",
        action="append",
        default=[],
        help="column=value[,value...] of the metadata table, e.g. organ=Breast (repeatable: all must hold)",
    )
    hest.add_argument("--out", help="folder for the HEST layout and samples.csv (required unless --list)")
    hest.add_argument("--list", action="store_true", help="print the matching samples; download nothing else")
    hest.add_argument("--patches", action="store_true", help="also patches/<id>.h5 (HEST's 224 px patches)")
    hest.add_argument("--repo", default="MahmoodLab/hest", help="the dataset repository (default MahmoodLab/hest)")
    hest.add_argument("--revision", help="a branch, tag or commit of the dataset (default: main)")
    hest.add_argument("--metadata", help="the metadata table's file name (default: the newest HEST_v*.csv)")
    hest.add_argument("--cache_dir", help="the HuggingFace cache (default: HF_HUB_CACHE / HF_HOME's)")
    hest.add_argument("--overwrite", action="store_true", help="replace samples.csv and the links in --out")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.ids and not args.where:
        parser.error("hest: give --ids or --where")
    if not args.list and not args.out:
        parser.error("hest: give --out (or --list to see what matches)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from expreg.ingest import hest_hub

    try:
        table, source = hest_hub.metadata_table(args.repo, args.cache_dir, args.revision, args.metadata)
        chosen = hest_hub.select(table, args.ids, args.where, source=source.name)
        columns = [c for c in ("id", "patient", "organ", "st_technology", "oncotree_code", "species") if c in chosen]
        if args.list:
            print(chosen[columns].to_string(index=False))
            print(f"{len(chosen)} sample(s) of {len(table)} in {source.name}")
            return 0
        folders = ("st", "wsis", "metadata", *(("patches",) if args.patches else ()))
        snapshot = hest_hub.download(list(chosen["id"]), args.repo, args.cache_dir, args.revision, folders)
        sheet, warnings = hest_hub.materialise(snapshot, chosen, Path(args.out), folders, args.overwrite)
    except hest_hub.HestHubError as err:
        print(f"expreg.datasets: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a network or disk failure mid-download: one line, not a traceback
        print(
            f"expreg.datasets: error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            file=sys.stderr,
        )
        return 1
    for warning in warnings:
        print(f"warning: {warning}")
    print(
        f"{len(chosen)} HEST-1k sample(s) ({', '.join(chosen['id'][:10])}) from {args.repo} ({source.name}) in {args.out}"
    )
    print(f"sample sheet: {sheet}  (next: python -m expreg.prepare --samples {sheet} --out_dir <folder>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
