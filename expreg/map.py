"""python -m expreg.map --model results/<run>/checkpoints/best --slide section.tif --out_dir maps/section
    [--um_per_px 0.5] [--stride_um 112] [--genes ERBB2,CD74] [--measured <prepare output or sample>] [--tta]

Command: a trained model and a whole H&E image -> predicted expression over the tissue ("virtual
spatial transcriptomics"): ``predictions.h5ad`` / ``.csv``, ``thumbnail.png``, ``maps/<gene>.png``,
``overview.png`` and ``summary.json``; with ``--measured``, the comparison at the measured spots
(``spot_metrics.json``, ``measured_vs_predicted.csv`` / ``.png``). Machinery: ``expreg.maps``. Also
installed as ``expreg-map``; ``accelerate launch -m expreg.map ...`` splits the tiles over processes.
Exit codes: 0 done; 2 bad input (named; nothing is written, except ``thumbnail.png``, ``mask.png`` and
``no_tissue.json`` when no tissue is found); 1 another failure (nothing is left half-written).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    p = argparse.ArgumentParser(prog="expreg-map", description="Predict a whole slide's spatial expression map.")
    p.add_argument("--model", required=True, help="checkpoints/best folder, run directory or hub model id")
    p.add_argument("--slide", required=True, help="the H&E image: JPEG, PNG, plain or tiled pyramidal TIFF (SVS)")
    p.add_argument("--out_dir", required=True, help="folder to create (never overwritten without --overwrite)")
    p.add_argument(
        "--um_per_px", type=float, help="µm per level-0 pixel (default: --measured's scale, then the TIFF's tags)"
    )
    p.add_argument("--stride_um", type=float, help="distance between tiles in µm (default: the model's patch size)")
    p.add_argument(
        "--genes", help="comma-separated genes to draw (default: all; the overview: top 12 by spatial variance)"
    )
    _add_measured_arguments(p)
    p.add_argument("--mask", help="tissue mask image of the slide (any size, same aspect; non-zero = tissue)")
    p.add_argument("--min_tissue", type=float, default=0.5, help="least tissue fraction of a kept tile (default 0.5)")
    p.add_argument("--tta", action="store_true", help="average over the 8 dihedral views (8x slower)")
    p.add_argument("--batch_size", type=int, default=64, help="tiles per forward pass (default 64)")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers reading tiles (default 2)")
    p.add_argument("--thumbnail_px", type=int, default=2048, help="longer side of the thumbnail (mask, pictures)")
    p.add_argument("--overview_genes", type=int, default=12, help="genes in overview.png (default 12)")
    p.add_argument(
        "--alpha",
        type=_opacity,
        default=0.9,
        help="opacity of the predicted tiles over the H&E in the pictures, 0-1 (default 0.9; 0.5 shows the tissue)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out_dir if it exists")
    return p


def _add_measured_arguments(p: argparse.ArgumentParser) -> None:
    """``--measured`` and how its spots are read (scale, Visium HD bins, targets)."""
    p.add_argument(
        "--measured", help="the section's expreg.prepare output folder, or its Space Ranger / HEST / .h5ad sample"
    )
    p.add_argument("--sample_id", help="with --measured: which sample of a prepare folder (or HEST id) this slide is")
    p.add_argument(
        "--spot_pitch_um",
        type=float,
        help="with a Space Ranger / HEST / .h5ad --measured: centre-to-centre spot distance in µm (default: "
        "100 for a hexagonal Visium lattice, 200 for a square ST one; the scale is fitted from the lattice)",
    )
    p.add_argument(
        "--spot_diameter_um",
        type=float,
        help="with a Space Ranger --measured, instead of the lattice: spot µm / spot_diameter_fullres",
    )
    p.add_argument(
        "--bin_um",
        type=float,
        help="with a Visium HD --measured: the bin size to read (default 8), summed into pseudo-spots of the "
        "model's patch (give what expreg.prepare used, for the same pseudo-spots)",
    )
    p.add_argument(
        "--hd_min_tissue",
        type=float,
        default=0.5,
        help="with a Visium HD --measured: keep pseudo-spots with at least this share of a full cell's bins "
        "(default 0.5, as expreg.prepare)",
    )
    p.add_argument(
        "--target_transform",
        choices=["log1p_cpm", "log1p", "none"],
        help="with --measured, for a model that does not record it",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    return p.parse_args(argv)


def _options(args):
    from expreg.maps.plan import MapOptions

    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    keys = set(MapOptions.__dataclass_fields__) - {"genes"}
    return MapOptions(genes=genes, **{k: v for k, v in vars(args).items() if k in keys})


def _report(summary: dict, out_dir: str, seconds: float) -> None:
    from expreg.formatting import fmt_float

    print(
        f"mapped {summary['tiles']:,} tiles ({summary['tissue_area_mm2']:.1f} mm² of tissue) x {summary['genes']} genes: "
        f"predicted in {summary['seconds_predict']:.1f} s ({summary['tiles_per_s']} tiles/s, {summary['processes']} process(es)) "
        f"-> {out_dir}"
    )
    measured = summary.get("measured")
    if measured:
        print(
            f"{measured['what']}: mean Spearman {measured['spearman_mean']:.4f}, mean Pearson "
            f"{measured['pearson_mean']:.4f} ({measured['num_genes']} genes; spot_metrics.json); depth-adjusted "
            f"mean Spearman {fmt_float(measured['spearman_depth_adjusted_mean'])}, library size alone "
            f"{fmt_float(measured['depth_oracle_spearman_mean'])}"
        )
    print(f"done in {seconds:.1f} s (the whole command: model, tissue, tiles, pictures)")
    print(f"scale: {summary['um_per_px']:.4g} µm/px from {summary['um_per_px_source']}")
    for warning in summary.get("warnings") or []:
        print(f"warning: {warning}")


def _opacity(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: an opacity from 0 (tiles invisible) to 1 (H&E hidden)")
    return value


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    from expreg.progress import quiet_library_bars

    quiet_library_bars()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    from expreg.inference import PredictError, load_model
    from expreg.maps.plan import MapError, plan_map
    from expreg.maps.run import check_out_dir, make_map
    from expreg.maps.tiles import TileReadError

    try:
        options = _options(args)
        check_out_dir(Path(args.out_dir).resolve(), args.overwrite, (args.slide, args.model, args.measured, args.mask))
        plan = plan_map(options, load_model(args.model))
    except (MapError, PredictError) as err:
        print(f"expreg-map: error: {err}", file=sys.stderr)
        return 2
    from expreg.training.launch import build_accelerator, unconnected_launch_error

    accelerator = build_accelerator()
    problem = unconnected_launch_error(accelerator)
    try:
        if problem:
            raise MapError(problem)
        summary = make_map(plan, accelerator)
        accelerator.end_training()  # every rank: ends the process group before exit (no teardown abort)
    except (MapError, TileReadError) as err:
        from expreg.data import error_message

        print(f"expreg-map: error: {error_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"expreg-map: error: {err}; nothing was written to {args.out_dir}", file=sys.stderr)
        return 1
    finally:
        plan.slide.close()
    if summary is not None:
        _report(summary, args.out_dir, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
