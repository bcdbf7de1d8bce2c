"""Ingestion: Space Ranger / HEST-1k / AnnData sections -> patches, metadata CSV and expression.h5ad (``python -m expreg.prepare``)."""
