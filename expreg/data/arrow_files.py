"""This process's temporary Arrow files: the datasets' split files and the metadata CSV, memory-mapped.

A table read into a memory-mapped file costs the process page cache, not anonymous memory: every
process that maps it shares the pages, and a 400,000-row cohort's metadata holds no Python object per
row (``benchmarks/bench_cohort.py --parts rss``). The folder is ``$TMPDIR/expreg-arrow-<host>-<pid>-*``,
removed when the process exits, or by the next run on the same machine if it was killed.

Imports neither torch nor datasets (``expreg.data.metadata`` reads its CSV here).
"""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

# CSV text parsed at a time (8 MB blocks: 0.24 GB of read-ahead at 400,000 rows; 1 MB: 0.07 GB)
CSV_BLOCK_BYTES = 1 << 20
_ARROW_DIRS: dict[int, Path] = {}  # pid -> this process's folder (a forked child makes its own)
_FILE_IDS = itertools.count()


def host_name() -> str:
    """This machine's name as it appears in temporary-folder names (no ``-``, which separates the parts)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def arrow_dir() -> Path:
    """This process's folder for Arrow files: ``$TMPDIR/expreg-arrow-<host>-<pid>-*``, removed at exit.

    Folders left by killed processes of *this* machine (no exit handler ran) are removed on first
    use; a TMPDIR shared between nodes also holds other machines' folders, whose process ids mean
    nothing here, and those are never touched.
    """
    pid = os.getpid()
    if pid not in _ARROW_DIRS:
        import atexit
        import shutil
        import tempfile

        from expreg.run_dir import process_alive

        prefix = f"expreg-arrow-{host_name()}-"
        for old in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
            owner = old.name[len(prefix) :].split("-")[0]
            if owner.isdigit() and not process_alive(int(owner)):
                shutil.rmtree(old, ignore_errors=True)
        _ARROW_DIRS[pid] = Path(tempfile.mkdtemp(prefix=f"{prefix}{pid}-"))
        atexit.register(_remove_arrow_dir, pid)
    return _ARROW_DIRS[pid]


def _remove_arrow_dir(pid: int) -> None:
    import shutil

    if os.getpid() == pid:  # not in a forked child that inherited the exit handler
        shutil.rmtree(_ARROW_DIRS[pid], ignore_errors=True)


def new_path(stem: str) -> Path:
    """A fresh path ``<arrow_dir>/<stem>-<n>`` (nothing is created)."""
    return arrow_dir() / f"{stem}-{next(_FILE_IDS)}"


def space_error(path: Path, err: OSError, megabytes: float) -> OSError:
    """The error for an Arrow file that could not be written: how much room it needs and where to find it."""
    return OSError(
        f"cannot write the Arrow file {path}: {err}. It needs about {megabytes:.0f} MB in the temporary folder: "
        "set TMPDIR to a folder with space"
    )


_MAPPED: dict[tuple, object] = {}  # (pid, CSV identity, column types) -> its mapped table, read once a process


def read_csv_mapped(csv_path: Path, column_types: dict):
    """The CSV parsed block by block into an Arrow IPC file and memory-mapped back: a ``pyarrow.Table`` whose
    columns live in the page cache. ``column_types``: each header name's Arrow type. None when Arrow cannot
    read the file so (ragged rows, bad UTF-8, a cell that is not of its column's type).

    A file read again unchanged (``expreg.cv`` reads the metadata once, then each fold run reads it) gets
    the table already mapped: one file in the temporary folder, not one per read."""
    stat = csv_path.stat()
    key = (
        os.getpid(),
        str(csv_path),
        stat.st_size,
        stat.st_mtime_ns,
        tuple((k, str(v)) for k, v in column_types.items()),
    )
    if key not in _MAPPED:
        _MAPPED[key] = _read_csv_mapped(csv_path, column_types)
    return _MAPPED[key]


def _read_csv_mapped(csv_path: Path, column_types: dict):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    target = new_path("metadata").with_suffix(".arrow")
    try:
        reader = pacsv.open_csv(
            csv_path,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types=column_types, null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as err:
        target.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise space_error(target, err, 2 * csv_path.stat().st_size / 1e6) from err
        return None
    return pa.ipc.open_file(pa.memory_map(str(target), "r")).read_all()
