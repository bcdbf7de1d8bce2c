"""python -m expreg.prepare --samples samples.csv --out_dir data/my_set [--genes genes.txt] [--patch_um 112]
    [--patch_px 224] [--spot_pitch_um 100] [--image_format png|jpeg] [--target_transform log1p_cpm]

Command: Space Ranger / HEST-1k / AnnData sections with full-resolution H&E images -> patches at a
stated physical size, ``metadata.csv``, ``expression.h5ad`` (raw counts) and ``prepare.json``
(machinery: ``expreg.ingest``). Also installed as ``expreg-prepare``. Under ``accelerate launch`` (one
or several machines sharing the output's file system) each process cuts a share of the samples and
the main one writes the tables: the same output as one process. Exit codes: 0 done; 2 bad
input (named: file, row, column or item; nothing is written); 1 another failure (nothing is left
half-written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(
        prog="expreg-prepare",
        description="Cut patches and collect raw counts from spatial-transcriptomics sections.",
    )
    parser.add_argument(
        "--samples",
        required=True,
        help="sample sheet: sample_id, group_id, path [, image, um_per_px, spot_pitch_um, spot_diameter_um, bin_um]",
    )
    parser.add_argument("--out_dir", required=True, help="folder to create (never overwritten without --overwrite)")
    parser.add_argument("--genes", help="gene names, one per line: also write their targets y0.. and genes.txt")
    _patch_arguments(parser)
    parser.add_argument(
        "--spot_pitch_um",
        type=float,
        help="centre-to-centre spot distance in µm; the scale is fitted from the spot lattice (default: 100 for a "
        "hexagonal Visium lattice, 200 for a square ST one; a scale column of the sheet wins for its row)",
    )
    parser.add_argument(
        "--spot_diameter_um",
        type=float,
        help="instead of the lattice: spot diameter in µm / spot_diameter_fullres of scalefactors_json.json "
        "(not recommended: 10x define that field as a theoretical 65 µm spot; the log says which source won)",
    )
    parser.add_argument(
        "--target_transform",
        choices=["log1p_cpm", "log1p", "none"],
        default="log1p_cpm",
        help="with --genes: the targets (default log1p_cpm: log1p of counts per 10,000)",
    )
    parser.add_argument(
        "--hd_min_tissue",
        type=float,
        default=0.5,
        help="Visium HD: a --patch_um pseudo-spot is kept when it holds at least this share of the bins of a full "
        "cell (default 0.5); the bin size read is the sheet's bin_um (default 8)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="processes cutting patches, one sample each at a time (default 1; the output is the same, byte "
        "for byte); a cohort on N cores: N",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(argv)


def _patch_arguments(parser) -> None:
    """The patches' size, format and store (and their context patches)."""
    parser.add_argument("--patch_um", type=float, default=112.0, help="patch side in µm (default 112)")
    parser.add_argument("--patch_px", type=int, default=224, help="patch side in pixels (default 224: 0.5 µm/px)")
    parser.add_argument("--image_format", choices=["png", "jpeg"], default="png", help="patch files (default png)")
    parser.add_argument(
        "--store",
        choices=["files", "shards"],
        default="files",
        help="files: one image file per patch (default; small sets); shards: the patches inside Parquet shards "
        "of ~256 MB with every metadata column (patches/data-*.parquet; a cohort: train with "
        "data.patches=<out_dir>/patches)",
    )
    parser.add_argument(
        "--context_um",
        type=float,
        help="also cut a context patch per spot: this many µm wide (e.g. 3 x --patch_um), centred on the spot, "
        "resized to --patch_px, written to context/<sample>/ and the metadata's context_path column (for "
        "model.context=multiscale); parts outside the image are white, as for patches",
    )


def _processes():
    """Under ``accelerate launch`` (several processes, on one or several machines sharing the output's file
    system): this process's place among them; else None (this process alone)."""
    import os
    from datetime import timedelta

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    from expreg.ingest.processes import Processes

    # cutting patches is CPU work: gloo barriers, on GPU machines too; a share may take hours
    state = PartialState(cpu=True, timeout=timedelta(hours=24))
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise SystemExit(f"expreg-prepare: error: {os.environ['WORLD_SIZE']} processes launched, not connected")

    def agree(value):
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(value) -> list:
        return gather_object([value])

    return Processes(state.process_index, state.num_processes, state.wait_for_everyone, agree, gather)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    from expreg.ingest.errors import IngestError
    from expreg.ingest.images import SlideError
    from expreg.ingest.prepare import Options, prepare

    options = Options(
        patch_um=args.patch_um,
        patch_px=args.patch_px,
        spot_pitch_um=args.spot_pitch_um,
        spot_diameter_um=args.spot_diameter_um,
        image_format=args.image_format,
        genes_file=args.genes,
        target_transform=args.target_transform,
        hd_min_tissue=args.hd_min_tissue,
        num_workers=args.num_workers,
        store=args.store,
        context_um=args.context_um,
    )
    processes = _processes()
    if processes is not None and not processes.main:
        logging.getLogger().setLevel(logging.ERROR)  # the main process reports; the others only their errors
    try:
        summary = prepare(args.samples, args.out_dir, options, overwrite=args.overwrite, processes=processes)
    except (IngestError, SlideError) as err:
        print(f"expreg-prepare: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"expreg-prepare: error: {err}; nothing was written to {args.out_dir}", file=sys.stderr)
        return 1
    if summary is None:  # not the main process of an accelerate launch: the main one reports
        return 0
    for s in summary["samples"]:
        dropped = ", ".join(f"{n} {reason}" for reason, n in s["spots_dropped"].items()) or "none"
        print(
            f"{s['sample_id']} ({s['layout']}): {s['spots_kept']} spots, {s['um_per_px']:.4g} um/px ({s['um_per_px_source']}); dropped: {dropped}"
        )
    if "store" in summary:
        print(
            f"patches in {len(summary['store']['shards'])} Parquet shard(s) ({summary['store']['bytes'] / 1e6:.0f} "
            f"MB); train with data.patches={Path(args.out_dir).resolve() / 'patches'}"
        )
    print(
        f"wrote {summary['spots']} patches, metadata.csv, expression.h5ad ({summary['genes_measured']} genes) and prepare.json to {args.out_dir} (qc/<sample>.png: where each section's patches were cut)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
