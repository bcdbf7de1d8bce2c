"""A folder written by ``python -m expreg.prepare`` as a recipe meets it: ``data.prepared``, and the keys a
recipe needs for one (its targets come from the raw counts of ``expression.h5ad``, not y0.. columns)."""

from __future__ import annotations

from pathlib import Path

RECORD = "prepare.json"  # what expreg.prepare writes last, beside metadata.csv and expression.h5ad


def prepared_hint(csv_path: Path) -> str:
    """For a CSV written by ``expreg.prepare`` (targets come from its counts): the keys to set."""
    folder = csv_path.parent
    if not (folder / RECORD).is_file():
        return ""
    return (
        f". {folder / RECORD} says expreg.prepare wrote this folder: its targets come from the raw counts, "
        f"chosen on the training rows. Set data.prepared={folder} and data.genes (e.g. hvg:50), as "
        f"recipes/visium.yaml does (or data.expression_file={folder / 'expression.h5ad'} beside data.metadata_csv)"
    )


def prepared_folder_problem(prepared: str | None) -> str | None:
    """Why ``data.prepared`` is not a finished ``expreg.prepare`` folder, or None when it is (or is unset)."""
    if prepared is None:
        return None
    folder = Path(prepared)
    if (folder / RECORD).is_file():
        return None
    what = "does not exist" if not folder.exists() else f"has no {RECORD} (expreg.prepare writes it when it ends)"
    return (
        f"data.prepared={prepared}: {folder.resolve()} {what}; make it with "
        f"python -m expreg.prepare --samples <your sample sheet> --out_dir {prepared}"
    )
