"""``expreg.prepare --store shards``: each sample's encoded patches into a part file (in the worker that
cuts it), then every part, in sample order and beside its metadata rows, into the store's Parquet
shards (``expreg.data.patch_store``).

The patches are encoded exactly as the files of ``--store files`` would be (same encoder, same
options), so the two stores hold the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

PARTS = ".parts"  # per-sample part files, inside the output's temporary folder, removed by ``pack``
_FORMATS = {".png": "PNG", ".jpg": "JPEG"}


class PartWriter:
    """One sample's patches (relative path + encoded bytes) into ``<tmp>/.parts/<n>.parquet``."""

    def __init__(self, path: Path, ext: str, save_kwargs: dict) -> None:
        self.path, self.format, self.kwargs = path, _FORMATS[ext], save_kwargs
        self.paths: list[str] = []
        self.images: list[bytes] = []
        self._writer = None

    def add(self, relative: str, patch) -> None:
        buffer = io.BytesIO()
        patch.save(buffer, format=self.format, **self.kwargs)
        self.paths.append(relative)
        self.images.append(buffer.getvalue())
        if len(self.paths) >= 256:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": pa.array(self.paths, pa.string()), "bytes": pa.array(self.images, pa.binary())})
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(str(self.path), table.schema, compression="none")
        self._writer.write_table(table)
        self.paths, self.images = [], []

    def close(self) -> None:
        if self.paths or self._writer is None:
            self._flush()
        self._writer.close()


def missing(tmp: Path, results, store: str) -> list[str]:
    """The samples whose patches are not in ``tmp`` (another machine that wrote elsewhere, a lost file)."""
    if store == "shards":
        return [r.spec.sample_id for i, r in enumerate(results) if not part_path(tmp, i).is_file()]
    return [r.spec.sample_id for r in results if not all((tmp / f).is_file() for f in r.files)]


def part_path(tmp: Path, index: int) -> Path:
    return tmp / PARTS / f"{index:06d}.parquet"


def pack(tmp: Path, frame, num_samples: int) -> dict:
    """Parts ``0 .. num_samples-1`` + ``frame`` (``metadata.csv``'s rows, same order) -> ``<tmp>/patches/``.

    Returns the store's summary for ``prepare.json``.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from expreg.data.patch_store import ShardWriter, shard_schema
    from expreg.ingest.errors import IngestError

    table = pa.Table.from_pandas(frame, preserve_index=False)
    writer = ShardWriter(tmp / "patches", shard_schema(table.schema))
    start = 0
    for index in range(num_samples):
        for batch in pq.ParquetFile(str(part_path(tmp, index))).iter_batches(batch_size=1024):
            rows = table.slice(start, batch.num_rows)
            expected = rows.column("path").cast(pa.string()).to_pylist()
            if expected != batch.column("path").cast(pa.string()).to_pylist():
                raise IngestError(f"patch store: sample {index + 1}'s patches are out of step with metadata.csv")
            writer.write(rows, batch.column("bytes"))
            start += batch.num_rows
    if start != len(frame):
        raise IngestError(f"patch store: {start} patches for {len(frame)} metadata rows")
    files = writer.finish()
    shutil.rmtree(tmp / PARTS)
    return {
        "kind": "shards",
        "folder": "patches",
        "shards": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "recipe": "data.patches=<this folder>/patches",
    }
