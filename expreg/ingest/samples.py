"""The sample sheet of ``expreg.prepare``: one row per tissue section.

Required columns ``sample_id, group_id, path``; optional ``image`` (the full-resolution H&E),
``um_per_px`` (µm per full-resolution pixel), ``spot_pitch_um`` (centre-to-centre distance of the
array's spots: 100 Visium, 200 ST; the default follows the lattice) and ``spot_diameter_um``. Relative paths are taken
relative to the sheet's folder. Every problem is an ``IngestError`` naming the sheet, the line
and the column.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from expreg.ingest.errors import IngestError

REQUIRED = ("sample_id", "group_id", "path")
OPTIONAL = ("image", "um_per_px", "spot_pitch_um", "spot_diameter_um", "bin_um")
# sample ids become folder names (patches/<sample_id>/): keep them portable
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SampleSpec:
    """One row of the sheet, paths resolved."""

    sample_id: str
    group_id: str
    path: Path
    image: Path | None = None
    um_per_px: float | None = None
    spot_diameter_um: float | None = None
    line: int = 0  # line of the sheet (for messages)
    spot_pitch_um: float | None = None
    bin_um: float | None = None  # Visium HD: the bin size to read (None: visium_hd.DEFAULT_BIN_UM)


def read_sample_sheet(sheet: str | os.PathLike) -> list[SampleSpec]:
    """Read and check the sample sheet (see the module docstring)."""
    sheet = Path(sheet)
    if not sheet.is_file():
        raise IngestError(f"--samples {sheet}: no such file")
    try:
        frame = pd.read_csv(sheet, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise IngestError(f"{sheet}: not a readable CSV ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise IngestError(
            f"{sheet}: missing column(s) {', '.join(missing)}; a sample sheet needs {', '.join(REQUIRED)} "
            f"(optional: {', '.join(OPTIONAL)})"
        )
    if frame.empty:
        raise IngestError(f"{sheet}: no samples")
    specs = [_row(sheet, frame.loc[i], i + 2) for i in range(len(frame))]
    _check_unique(sheet, specs)
    return specs


def _row(sheet: Path, row: pd.Series, line: int) -> SampleSpec:
    def text(column: str) -> str:
        return str(row.get(column, "")).strip()

    for column in REQUIRED:
        if not text(column):
            raise IngestError(f"{sheet}: line {line}, column '{column}': empty")
    sample_id = text("sample_id")
    if not _SAFE_ID.match(sample_id):
        raise IngestError(
            f"{sheet}: line {line}, column 'sample_id': {sample_id!r} is not a portable name "
            "(letters, digits, '.', '_', '-'; it becomes a folder name)"
        )
    return SampleSpec(
        sample_id=sample_id,
        group_id=text("group_id"),
        path=_existing(sheet, line, "path", text("path")),
        image=_existing(sheet, line, "image", text("image")) if text("image") else None,
        um_per_px=_positive(sheet, line, "um_per_px", text("um_per_px")),
        spot_diameter_um=_positive(sheet, line, "spot_diameter_um", text("spot_diameter_um")),
        line=line,
        spot_pitch_um=_positive(sheet, line, "spot_pitch_um", text("spot_pitch_um")),
        bin_um=_positive(sheet, line, "bin_um", text("bin_um")),
    )


def _resolve(sheet: Path, value: str) -> Path:
    try:
        path = Path(value).expanduser()
    except RuntimeError as err:  # ~unknownuser
        raise IngestError(f"{sheet}: path {value!r}: {err}") from err
    return path if path.is_absolute() else (sheet.parent / path).resolve()


def _existing(sheet: Path, line: int, column: str, value: str) -> Path:
    """``value`` resolved (``_resolve``); an error naming the line, the rule and the path looked for when nothing
    is there."""
    path = _resolve(sheet, value)
    if not path.exists():
        rule = (
            ""
            if Path(value).expanduser().is_absolute()
            else f"; relative paths start at the sheet's folder {sheet.resolve().parent}"
        )
        raise IngestError(
            f"{sheet}: line {line}, column '{column}': {value!r} does not exist (looked for {path}{rule})"
        )
    return path


def _positive(sheet: Path, line: int, column: str, value: str) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number) or number <= 0:
        raise IngestError(f"{sheet}: line {line}, column '{column}': {value!r} is not a positive number")
    return number


def _check_unique(sheet: Path, specs: list[SampleSpec]) -> None:
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.sample_id in seen:
            raise IngestError(
                f"{sheet}: line {spec.line}, column 'sample_id': {spec.sample_id!r} repeats line {seen[spec.sample_id]}"
            )
        seen[spec.sample_id] = spec.line
