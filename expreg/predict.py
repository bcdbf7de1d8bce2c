"""Apply a trained model to new images: a metadata CSV or a folder of images -> expression CSV.

    python -m expreg.predict --model results/<run>/checkpoints/best --metadata_csv new.csv --out_csv pred.csv
    python -m expreg.predict --model org/expreg-model --image_dir patches/ --out_csv pred.csv
    accelerate launch -m expreg.predict ...      # several processes / GPUs; rows are never duplicated

The output has ``path`` then one column per gene (named by gene), in expression units (the
model's stored training-split normalisation undone). When the CSV also has targets
(``y0..``), the metrics (mean Spearman, mean Pearson, per gene) are printed and written beside
the output as ``<out>.metrics.json`` and ``<out>.per_gene.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from expreg.data.metadata import MetadataError, read_metadata, resolve_image_path
from expreg.inference import (  # noqa: F401 - also the public names of expreg.predict
    ImageFiles,
    PredictError,
    dihedral_views,
    forward_tta,
    load_model,
    predict_files,
    resolve_model_dir,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def list_images(image_dir: str | os.PathLike) -> list[str]:
    """Image files under ``image_dir`` (recursive), sorted, as paths joined onto ``image_dir``."""
    root = Path(image_dir)
    if not root.is_dir():
        raise PredictError(f"--image_dir {image_dir}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise PredictError(f"--image_dir {image_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [str(p) for p in files]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' command reference is made from them: ``expreg.reference``)."""
    parser = argparse.ArgumentParser(
        prog="expreg-predict", description="Predict gene expression for images with a trained expreg model."
    )
    parser.add_argument("--model", required=True, help="checkpoints/best folder, run directory or hub model id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--metadata_csv", help="CSV with a path column (group_id and y0.. optional)")
    source.add_argument("--image_dir", help="folder of images (searched recursively)")
    parser.add_argument(
        "--patches", help="a patch store (expreg.prepare --store shards) holding the images of --metadata_csv"
    )
    parser.add_argument("--out_csv", required=True, help="predictions to write: path, then one column per gene")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers reading images (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out_csv if it exists")
    parser.add_argument("--tta", action="store_true", help="average over the 8 dihedral views (8x slower)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.patches and not args.metadata_csv:
        parser.error("--patches goes with --metadata_csv (the store's images are named by the CSV's paths)")
    return args


def _inputs(args, model_config):
    """(paths as written in the output, files to open (multiscale: (patch, context) pairs), (targets or None,
    library sizes or None), a neighbourhood model's averaging matrix over the rows or None)."""
    genes = list(model_config.gene_names)
    context = getattr(model_config, "context", "none")
    if args.image_dir:
        if context != "none":
            raise PredictError(
                "this model reads each spot's patch and its context patch (context=multiscale): give --metadata_csv "
                "with a context_path column (python -m expreg.prepare --context_um), not --image_dir"
                if context == "multiscale"
                else "this model reads each spot beside its neighbourhood (context=neighbourhood): give --metadata_csv "
                "with each spot's section and position (sample_id, x_px, y_px, um_per_px as python -m expreg.prepare "
                "writes them, or the HER2ST patch CSV's sample_id, pixel_x, pixel_y, src_um_per_px), not --image_dir"
            )
        files = list_images(args.image_dir)
        return files, files, (None, None), None
    metadata = read_metadata(args.metadata_csv, num_genes=None, for_prediction=True, patches=args.patches)
    if metadata.target_columns and metadata.num_genes != len(genes):
        raise PredictError(
            f"{metadata.csv_path}: the CSV has K={metadata.num_genes} targets but the model predicts {len(genes)} genes"
        )
    if metadata.target_columns and metadata.gene_names != metadata.target_columns and metadata.gene_names != genes:
        differ = [f"y{i}: {a} vs {b}" for i, (a, b) in enumerate(zip(metadata.gene_names, genes)) if a != b]
        raise PredictError(
            f"{metadata.csv_path}: the targets' gene names differ from the model's ({'; '.join(differ[:3])}"
            f"{' ...' if len(differ) > 3 else ''}); metrics would compare different genes"
        )
    files = [resolve_image_path(metadata.csv_path, p) for p in metadata.frame["path"]]
    if context == "multiscale":
        contexts = metadata.context_paths()
        if contexts is None:
            raise PredictError(
                f"{metadata.csv_path}: this model reads each spot's context patch too (context=multiscale, "
                f"{model_config.context_um} um): the CSV needs a context_path column (python -m expreg.prepare "
                "--context_um)"
            )
        files = list(zip(files, contexts))
    targets = metadata.targets().astype(np.float64) if metadata.target_columns else None
    depth = None
    if "library_size" in metadata.frame.columns:  # the depth-adjusted scores need it; empty cells: n/a
        import pandas as pd

        depth = pd.to_numeric(metadata.frame["library_size"].replace("", "nan"), errors="coerce").to_numpy(float)
    return list(metadata.frame["path"]), files, (targets, depth), _neighbourhood(metadata, model_config)


def _neighbourhood(metadata, model_config):
    """A neighbourhood model's averaging matrix over the CSV's rows (the radius it was trained with), else None."""
    from expreg.data.neighbours import model_radius, neighbourhood_matrix, spot_positions

    try:
        radius = model_radius(model_config)
    except ValueError as err:
        raise PredictError(str(err)) from err
    return None if radius is None else neighbourhood_matrix(*spot_positions(metadata), radius)


def main(argv=None) -> int:
    args = parse_args(argv)
    from expreg.progress import quiet_library_bars

    quiet_library_bars()
    out = Path(args.out_csv)
    try:
        if out.exists() and not args.overwrite:
            raise PredictError(f"{out} exists; choose another --out_csv or pass --overwrite")
        model = load_model(args.model)
        paths, files, (targets, depth), neighbourhood = _inputs(args, model.config)
    except (PredictError, MetadataError) as err:
        print(f"expreg-predict: error: {err}", file=sys.stderr)
        return 2

    from expreg.evaluation.metrics import compute_metrics
    from expreg.run_dir import write_json, write_per_gene_metrics, write_table_csv
    from expreg.training.launch import build_accelerator, unconnected_launch_error

    accelerator = build_accelerator()
    problem = unconnected_launch_error(accelerator)
    if problem:
        print(f"expreg-predict: error: {problem}", file=sys.stderr)
        return 2
    from expreg.data import UnreadableImageError, error_message

    try:
        expression = predict_files(
            model, files, accelerator, args.batch_size, args.num_workers, tta=args.tta, neighbourhood=neighbourhood
        )
    except UnreadableImageError as err:
        print(f"expreg-predict: error: {error_message(err)}", file=sys.stderr)
        return 2
    accelerator.end_training()  # every rank: ends the process group before exit (no teardown abort)
    if not accelerator.is_main_process:
        return 0
    genes = list(model.config.gene_names)
    write_table_csv(out, ["path", *genes], [[p, *row] for p, row in zip(paths, expression)])
    print(f"wrote {len(paths)} predictions x {len(genes)} genes to {out} ({accelerator.num_processes} process(es))")
    if targets is not None:
        metrics = compute_metrics(expression, targets, genes, library_size=depth)
        write_json(
            out.with_suffix(".metrics.json"),
            {**metrics.summary, "model": args.model, "inputs": str(args.metadata_csv)},
        )
        write_per_gene_metrics(out.with_suffix(".per_gene.csv"), metrics.per_gene_rows())
        print(metrics.format())
        print(metrics.format_genes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
