"""HEST-Benchmark task folders (``bench_data/<TASK>``) read as HEST-Benchmark reads them, for ``expreg.cv --hest_task``.

A task folder holds ``splits/train_<i>.csv`` and ``splits/test_<i>.csv`` (columns ``sample_id``,
``patches_path``, ``expr_path``; the paths relative to the task folder), ``patches/<id>.h5``
(datasets ``img`` N x 224 x 224 x 3 uint8, ``barcode``, ``coords``), ``adata/<id>.h5ad`` (raw
counts) and ``var_50genes.json`` (``{"genes": [...]}``). Matched to mahmoodlab/HEST
``src/hest/bench/benchmark.py`` (``predict_folds``, ``predict_single_split``) and
``src/hest/bench/st_dataset.py`` (``load_adata``, ``normalize_adata``):

- folds: ``train_<i>.csv`` / ``test_<i>.csv`` for ``i = 0 .. n-1``; file paths are
  ``os.path.join(<task folder>, row["patches_path"])`` (the same for ``expr_path``);
- rows: every patch of ``patches/<id>.h5``, in file order (``hestcore``'s ``H5HESTDataset`` reads
  ``img``, ``barcode`` and ``coords`` in chunks, in order);
- targets: ``load_adata(expr_path, genes, barcodes, normalize=True)``: the h5ad's rows at the patch
  file's barcodes, the columns of the gene list in its order, ``X`` cast to float64, then
  ``log1p`` (``normalize_adata``'s docstring mentions total-count normalisation but its code
  only takes ``log1p``; ``normalize=True`` is the default of ``BenchmarkConfig``).

``materialise_task`` writes the task once into ``<$EXPREG_CACHE>/hest_tasks/<task>-<digest>/``
as expreg data: ``patches/<id>/<row>.png``, ``metadata.csv`` (``path``, ``group_id``,
``sample_id``, ``barcode``, ``y0..``), ``genes.txt``, ``folds.csv`` (the task's folds) and
``task.json``. The group of a row is its test split's samples joined with ``+``, so expreg's
inner CV and validation stay at the task's own grouping. The genes are the task's: HEST-Benchmark
chose them on all of the task's samples, the held-out ones included (``GENE_LEAK_NOTE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from expreg.ingest.errors import IngestError

SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
GENE_LIST = "var_50genes.json"  # BenchmarkConfig.gene_list
FORMAT_VERSION = 1  # of the materialised folder: a change makes a new folder
CHUNK = 256  # patches read from an .h5 at a time
TARGETS = "log1p of the raw counts (HEST-Benchmark load_adata(normalize=True)) at the patch file's barcodes"
GENE_LEAK_NOTE = (
    "The genes are the HEST-Benchmark task's own list ({file}): HEST-Benchmark chose them on all of the "
    "task's samples, the held-out ones included, so every held-out score on this task carries that leak."
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT_FILE = re.compile(r"^(train|test)_(\d+)\.csv$")


@dataclass(frozen=True)
class TaskSample:
    """One sample of a task: its patch file and expression file (absolute), and the split file naming them."""

    sample_id: str
    patches: Path
    expression: Path
    named_in: Path


@dataclass
class HestTask:
    """A task folder as read from its split files and gene list (nothing of the .h5/.h5ad read yet)."""

    root: Path
    samples: dict[str, TaskSample]
    splits: list[tuple[Path, Path]]  # (train_<i>.csv, test_<i>.csv)
    test_ids: list[list[str]]  # the samples of test_<i>.csv, sorted
    genes: list[str]
    gene_file: Path

    @property
    def name(self) -> str:
        return self.root.name

    def group_of(self, sample_id: str) -> str:
        """The group of a sample's rows: its test split's samples joined with ``+`` (e.g. ``TENX95+TENX99``)."""
        return "+".join(self.test_ids[self.fold_of(sample_id)])

    def fold_of(self, sample_id: str) -> int:
        return next(k for k, ids in enumerate(self.test_ids) if sample_id in ids)


def read_task(root, gene_list: str = GENE_LIST) -> HestTask:
    """Read a task folder's split files and gene list; an ``IngestError`` naming the file for anything amiss.

    Checks that ``train_<i>.csv`` and ``test_<i>.csv`` come in pairs numbered from 0, that every
    named ``.h5``/``.h5ad`` exists, that a sample names the same files everywhere, that the test
    splits are disjoint and cover every sample, and that each ``train_<i>.csv`` holds exactly the
    samples outside ``test_<i>.csv`` (``expreg.cv`` trains each fold on all other rows).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise IngestError(f"{root}: no such folder (expected a HEST-Benchmark task folder, e.g. bench_data/IDC)")
    splits = _split_files(root)
    samples: dict[str, TaskSample] = {}
    folds = []
    for train_csv, test_csv in splits:
        folds.append(tuple(_read_split(csv, root, samples) for csv in (train_csv, test_csv)))
    _check_folds(splits, folds, list(samples))
    genes_path = root / gene_list
    return HestTask(root, samples, splits, [sorted(test) for _, test in folds], _read_genes(genes_path), genes_path)


def _split_files(root: Path) -> list[tuple[Path, Path]]:
    split_dir = root / "splits"
    if not split_dir.is_dir():
        raise IngestError(
            f"{root}: not a HEST-Benchmark task folder: no {split_dir.name}/ (expected splits/train_0.csv, "
            "splits/test_0.csv, ...)"
        )
    found: dict[str, set[int]] = {"train": set(), "test": set()}
    for path in split_dir.iterdir():
        match = _SPLIT_FILE.match(path.name)
        if match:
            found[match.group(1)].add(int(match.group(2)))
    if not found["test"] and not found["train"]:
        raise IngestError(f"{split_dir}: no train_<i>.csv / test_<i>.csv split files")
    n = max(found["train"] | found["test"]) + 1
    for kind in ("train", "test"):
        missing = sorted(set(range(n)) - found[kind])
        if missing:
            raise IngestError(
                f"{split_dir / f'{kind}_{missing[0]}.csv'}: missing (HEST-Benchmark pairs train_<i>.csv with "
                f"test_<i>.csv for i = 0..{n - 1})"
            )
    return [(split_dir / f"train_{i}.csv", split_dir / f"test_{i}.csv") for i in range(n)]


def _read_split(csv: Path, root: Path, samples: dict[str, TaskSample]) -> set[str]:
    """The sample ids of one split file; new samples are added to ``samples`` (checked against earlier files)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise IngestError(f"{csv}: unreadable split file ({err})") from err
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise IngestError(
            f"{csv}: missing column(s) {', '.join(missing)} (HEST-Benchmark splits have {', '.join(SPLIT_COLUMNS)})"
        )
    if table.empty:
        raise IngestError(f"{csv}: no samples")
    ids = set()
    for line, row in enumerate(table.itertuples(index=False), start=2):
        sid = row.sample_id.strip()
        if not _SAFE_ID.match(sid) or sid in ids:
            why = "appears twice" if sid in ids else "is not a plain name (letters, digits, . _ -)"
            raise IngestError(f"{csv}: line {line}, column 'sample_id': {sid!r} {why}")
        ids.add(sid)
        sample = TaskSample(sid, root / row.patches_path.strip(), root / row.expr_path.strip(), csv)
        for column, path in (("patches_path", sample.patches), ("expr_path", sample.expression)):
            if not path.is_file():
                raise IngestError(f"{csv}: line {line}, column '{column}': {path} not found")
        known = samples.setdefault(sid, sample)
        if (known.patches, known.expression) != (sample.patches, sample.expression):
            raise IngestError(f"{csv}: line {line}: sample {sid} names other files than in {known.named_in.name}")
    return ids


def _check_folds(splits: list[tuple[Path, Path]], folds: list[tuple[set, set]], all_ids: list[str]) -> None:
    every = set(all_ids)
    for i, (train, test) in enumerate(folds):
        train_csv, test_csv = splits[i]
        for j in range(i):
            shared = test & folds[j][1]
            if shared:
                raise IngestError(
                    f"{test_csv} and {splits[j][1]}: test splits share sample(s) "
                    f"{', '.join(sorted(shared))}; each sample must be held out once"
                )
        if train & test:
            raise IngestError(f"{train_csv}: sample(s) {', '.join(sorted(train & test))} also in {test_csv.name}")
        if train | test != every:
            raise IngestError(
                f"{train_csv}: leaves out sample(s) {', '.join(sorted(every - train - test))} "
                f"(neither train nor {test_csv.name}); expreg.cv trains on every other sample"
            )
    untested = every - set().union(*(test for _, test in folds))
    if untested:
        raise IngestError(f"{splits[0][0].parent}: sample(s) {', '.join(sorted(untested))} in no test split")


def _read_genes(path: Path) -> list[str]:
    if not path.is_file():
        raise IngestError(f'{path}: not found (the task\'s gene list, {{"genes": [...]}})')
    try:
        genes = json.loads(path.read_text(encoding="utf-8"))["genes"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise IngestError(f'{path}: expected a JSON object {{"genes": [...]}} ({type(err).__name__}: {err})') from err
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise IngestError(f"{path}: 'genes' must be a non-empty list of gene names")
    if len(set(genes)) != len(genes):
        raise IngestError(f"{path}: gene(s) listed twice: {sorted({g for g in genes if genes.count(g) > 1})[:5]}")
    return genes


def patch_barcodes(path: Path) -> tuple[list[str], tuple]:
    """The ``barcode`` of every patch of a HEST ``.h5`` (file order) and the shape of ``img``."""
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in ("img", "barcode") if name not in f]
            if missing:
                raise IngestError(
                    f"{path}: no dataset {', '.join(missing)} (a HEST patch file has img, barcode, coords)"
                )
            raw = np.asarray(f["barcode"][...]).reshape(-1)
            shape = f["img"].shape
    except OSError as err:
        raise IngestError(f"{path}: unreadable HEST patch file ({err})") from err
    barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in raw]
    if len(shape) != 4 or shape[-1] not in (3, 4) or shape[0] != len(barcodes):
        raise IngestError(f"{path}: img has shape {shape} for {len(barcodes)} barcodes (expected N x H x W x 3)")
    if not barcodes:
        raise IngestError(f"{path}: no patches")
    return barcodes, shape


def sample_targets(
    sample: TaskSample, genes: list[str], gene_file: Path | None = None
) -> tuple[list[str], np.ndarray]:
    """``(barcodes, targets)`` of one sample as HEST-Benchmark makes them (see the module docstring).

    Returns:
        The patch file's barcodes (its row order) and ``log1p`` of the raw counts at those
        barcodes for ``genes`` (float64, ``(num_patches, num_genes)``).
    """
    from expreg.data.h5ad import read_h5ad

    barcodes, _ = patch_barcodes(sample.patches)
    adata = read_h5ad(sample.expression)
    obs = pd.Index(adata.obs.index.astype(str))
    rows = obs.get_indexer(barcodes) if obs.is_unique else _unique_rows(obs, barcodes, sample.expression)
    if (rows < 0).any():
        lost = [b for b, r in zip(barcodes, rows) if r < 0]
        raise IngestError(
            f"{sample.patches}: {len(lost)} of {len(barcodes)} barcodes are not in {sample.expression} "
            f"(e.g. {', '.join(lost[:3])})"
        )
    var = pd.Index(adata.var_names)
    cols = var.get_indexer(genes) if var.is_unique else _unique_rows(var, genes, sample.expression)
    if (cols < 0).any():
        unknown = [g for g, c in zip(genes, cols) if c < 0]
        raise IngestError(
            f"{gene_file or 'the gene list'}: gene(s) {', '.join(unknown[:5])} not in the var of {sample.expression}"
        )
    counts = adata.X[rows][:, cols].toarray().astype(np.float64)
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise IngestError(
            f"{sample.expression}: negative or non-finite values in X for the task's genes "
            "(raw counts expected; log1p is undefined)"
        )
    return barcodes, np.log1p(counts)


def _unique_rows(index: pd.Index, names: list[str], path: Path) -> np.ndarray:
    """``index.get_indexer(names)`` for an index with duplicates: an error when a wanted name is ambiguous."""
    twice = sorted(set(index[index.duplicated()]) & set(names))
    if twice:
        raise IngestError(f"{path}: {', '.join(twice[:3])} appear(s) more than once (ambiguous)")
    first = pd.Series(np.arange(len(index)), index=index)
    first = first[~index.duplicated()]
    return first.reindex(names).fillna(-1).to_numpy(dtype=np.int64)


# ------------------------------------------------------------------------------------- materialising


@dataclass
class MaterialisedTask:
    """A task written as expreg data (``folder``), and whether an earlier build was reused."""

    task: HestTask
    folder: Path
    reused: bool

    @property
    def metadata_csv(self) -> Path:
        return self.folder / "metadata.csv"

    @property
    def folds_csv(self) -> Path:
        return self.folder / "folds.csv"

    @property
    def genes_file(self) -> Path:
        return self.folder / "genes.txt"

    def record(self) -> dict:
        """What ``cv_summary.json`` says about the task (``task.json`` of the folder plus where it is)."""
        return {**json.loads((self.folder / "task.json").read_text()), "materialised": str(self.folder)}


def task_digest(task: HestTask) -> str:
    """Digest of a task's inputs: the split files and gene list (content), each ``.h5``/``.h5ad`` (path
    relative to the task, size and modification time, as ``expreg.data.image_cache`` does for images)."""
    digest = hashlib.sha256(f"expreg-hest-task v{FORMAT_VERSION}\n".encode())
    for path in [task.gene_file, *(p for pair in task.splits for p in pair)]:
        digest.update(f"{path.name}\0".encode() + path.read_bytes() + b"\n")
    for sample in task.samples.values():
        for path in (sample.patches, sample.expression):
            st = path.stat()
            digest.update(
                f"{sample.sample_id}\0{_relative(path, task.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def materialise_task(root, cache_dir=None, progress: bool = True) -> MaterialisedTask:
    """The task folder ``root`` as expreg data under ``<cache>/hest_tasks/<task>-<digest>/``, built once.

    Everything is read and checked before anything is written (an ``IngestError`` naming the file
    leaves nothing behind); the folder is built under a temporary name and renamed into place, and
    reused while the inputs (``task_digest``) stay the same. ``cache_dir``: the folder holding the
    materialised tasks (default ``<$EXPREG_CACHE or ~/.cache/expreg>/hest_tasks``).
    """
    from expreg.data.demo import default_cache_dir

    task = read_task(root)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "hest_tasks"
    folder = base / f"{task.name}-{task_digest(task)[:12]}"
    if (folder / "task.json").is_file():
        return MaterialisedTask(task, folder, reused=True)
    arrays = {sid: sample_targets(s, task.genes, task.gene_file) for sid, s in task.samples.items()}
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task.name}-tmp-", dir=base))
    try:
        _write_task(task, arrays, tmp, progress)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same build first
            if not (folder / "task.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MaterialisedTask(task, folder, reused=False)


def _write_task(task: HestTask, arrays: dict, tmp: Path, progress: bool) -> None:
    """PNG patches, ``metadata.csv``, ``genes.txt``, ``folds.csv`` and ``task.json`` into ``tmp``."""
    from expreg.progress import progress_bar

    order = [sid for ids in task.test_ids for sid in ids]  # fold 0's samples first
    frames = []
    bar = progress_bar(
        total=sum(len(arrays[sid][0]) for sid in order), desc=f"HEST task {task.name}", unit="patch", enabled=progress
    )
    with bar:
        for sid in order:
            barcodes, targets = arrays[sid]
            paths = _write_patches(task.samples[sid], tmp, bar)
            frame = pd.DataFrame(
                {"path": paths, "group_id": task.group_of(sid), "sample_id": sid, "barcode": barcodes}
            )
            frames.append(
                pd.concat([frame, pd.DataFrame(targets, columns=[f"y{i}" for i in range(targets.shape[1])])], axis=1)
            )
    metadata = pd.concat(frames, ignore_index=True)
    metadata.to_csv(tmp / "metadata.csv", index=False, lineterminator="\n")  # floats round-trip exactly
    (tmp / "genes.txt").write_text("\n".join(task.genes) + "\n")
    folds = metadata[["path", "group_id"]].assign(fold=[task.fold_of(s) for s in metadata["sample_id"]])
    folds.to_csv(tmp / "folds.csv", index=False, lineterminator="\n")
    (tmp / "task.json").write_text(json.dumps(_task_record(task, arrays), indent=2) + "\n")


def _write_patches(sample: TaskSample, tmp: Path, bar) -> list[str]:
    """Every patch of the sample's ``.h5`` as ``patches/<id>/<row>.png``; their paths relative to ``tmp``."""
    from PIL import Image

    folder = tmp / "patches" / sample.sample_id
    folder.mkdir(parents=True)
    paths = []
    try:
        with h5py.File(sample.patches, "r") as f:
            images = f["img"]
            for start in range(0, images.shape[0], CHUNK):
                for row, pixels in enumerate(np.asarray(images[start : start + CHUNK]), start=start):
                    name = f"patches/{sample.sample_id}/{row:06d}.png"
                    Image.fromarray(pixels[..., :3].astype(np.uint8), "RGB").save(tmp / name)
                    paths.append(name)
                bar.update(min(CHUNK, images.shape[0] - start))
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise IngestError(f"{sample.patches}: patch {len(paths)} unreadable ({type(err).__name__}: {err})") from err
    return paths


def _task_record(task: HestTask, arrays: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "task": task.name,
        "source": str(task.root),
        "digest": task_digest(task),
        "genes_file": _relative(task.gene_file, task.root),
        "genes": task.genes,
        "targets": TARGETS,
        "gene_leak": GENE_LEAK_NOTE.format(file=task.gene_file.name),
        "folds": [
            {"fold": k, "train": _relative(tr, task.root), "test": _relative(te, task.root), "test_samples": ids}
            for k, ((tr, te), ids) in enumerate(zip(task.splits, task.test_ids))
        ],
        "samples": {
            sid: {
                "patches": _relative(s.patches, task.root),
                "expression": _relative(s.expression, task.root),
                "patches_count": len(arrays[sid][0]),
                "group_id": task.group_of(sid),
            }
            for sid, s in task.samples.items()
        },
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
