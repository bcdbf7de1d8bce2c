"""The error of ingestion: every bad input of ``expreg.prepare`` (a ``MetadataError``: exit code 2)."""

from __future__ import annotations

from expreg.data.metadata import MetadataError


class IngestError(MetadataError):
    """Bad ingestion input; the message names the file and the item (line and column for the sample sheet)."""
