"""The run directory: layout, names, atomic writes. Callers decide *when* (and check the main process).

::

    results/<run_name>/
        config_resolved.yaml    everything needed to rerun (split file included)
        split.csv               the split used, when the run made it
        metrics.json            status, best epoch and metrics, per-epoch history (written atomically)
        log.txt
        target_stats.json       training-split mean/std per gene
        split_summary.json      samples and groups of each split the run used
        checkpoints/last/       accelerator.save_state + trainer_state.json (resume from here)
        checkpoints/best/       save_pretrained of the best model by validation mean Spearman
        predictions_val.csv     path, group_id, one column per gene (expression units, best model)
        per_gene_metrics.csv    gene, spearman, pearson, mse, depth-adjusted spearman/pearson, depth oracle (best model)
        predictions_test.csv, per_gene_metrics_test.csv   the same on the held-out test split, if any
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG_FILE = "config_resolved.yaml"
METRICS_FILE = "metrics.json"
TRAINER_STATE_FILE = "trainer_state.json"
SPLIT_SUMMARY_FILE = "split_summary.json"


class RunDirError(RuntimeError):
    """A run directory cannot be created or used (exists, finished, not a checkpoint)."""


def default_run_name(backbone: str, batch: int, accum: int, world: int, lr: float, seed: int) -> str:
    """``<backbone>__bs<batch>x<accum>x<world>__lr<lr>__seed<seed>__<timestamp>``."""
    safe_backbone = backbone.replace("/", "-").replace(":", "-")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{safe_backbone}__bs{batch}x{accum}x{world}__lr{lr:g}__seed{seed}__{stamp}"


def create_run_dir(output_dir: str | os.PathLike, run_name: str, explicit_name: bool) -> Path:
    """Create a new, empty run directory; never reuse an existing one.

    A default (timestamped) name that is taken gets a ``-2``, ``-3``... suffix; an explicit
    ``logging.run_name`` that is taken is an error (resume it with ``--resume`` instead).
    """
    root = Path(output_dir)
    candidate, n = root / run_name, 1
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
            probe = candidate / ".write_test"
            probe.write_text("")  # fail now, not after hours of training, if the folder is not writable
            probe.unlink()
            return candidate
        except FileExistsError:
            if explicit_name:
                status = read_status(candidate)
                raise RunDirError(
                    f"run directory {candidate} already exists ({status}); choose another logging.run_name, "
                    f"or continue it with --resume {candidate / 'checkpoints' / 'last'}"
                ) from None
            n += 1
            candidate = root / f"{run_name}-{n}"
        except OSError as err:  # read-only filesystem, permissions, disk full, a file in the way
            raise RunDirError(f"cannot create the run directory {candidate}: {err.strerror or err}") from err


def read_status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / METRICS_FILE).read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "no metrics.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    atomic_write_lines(path, [text])


def atomic_write_lines(path: Path, pieces) -> None:
    """``atomic_write_text`` of the concatenated ``pieces`` (an iterable), written as they come."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.writelines(pieces)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file (e.g. the split file a run used), or None when there is none."""
    import hashlib

    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:  # in blocks: a cohort's metadata CSV is hundreds of MB
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _clean(value):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, default=_json_default) + "\n")


def write_table_csv(path: Path, header: list[str], rows) -> None:
    """A CSV with ``header`` and ``rows`` (floats as 6 significant digits), written atomically."""
    lines = (
        ",".join(f"{v:.6g}" if isinstance(v, (float, np.floating)) else _csv_cell(v) for v in row) + "\n"
        for row in rows
    )
    atomic_write_lines(Path(path), itertools.chain([",".join(_csv_cell(c) for c in header) + "\n"], lines))


def write_predictions(path: Path, paths, groups, gene_names: list[str], values) -> None:
    """``path, group_id, <gene>...`` in expression units; ``paths`` and ``groups`` are iterables (read as written)."""
    rows = ([p, g, *row.tolist()] for p, g, row in zip(paths, groups, np.asarray(values, dtype=np.float64)))
    write_table_csv(path, ["path", "group_id", *gene_names], rows)


PER_GENE_COLUMNS = (
    "spearman",
    "pearson",
    "mse",
    "spearman_depth_adjusted",
    "pearson_depth_adjusted",
    "depth_oracle_spearman",
)


def write_per_gene_metrics(path: Path, rows: list[dict]) -> None:
    """``gene, spearman, pearson, mse`` and the depth-adjusted Spearman and Pearson and the depth oracle's
    Spearman (empty cells for undefined correlations, and where the library size is unknown)."""
    lines = ["gene," + ",".join(PER_GENE_COLUMNS)]
    for r in rows:
        cells = [_csv_cell(r["gene"])] + ["" if r.get(k) is None else f"{r[k]:.6f}" for k in PER_GENE_COLUMNS]
        lines.append(",".join(cells))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_cell(value) -> str:
    text = str(value)
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a completely written ``tmp_dir`` to ``final_dir`` (replacing it) with renames only.

    The old folder is renamed aside first and removed last, so at any moment either the old or
    the new folder is complete under a known name (``final_dir`` or ``<final_dir>.old``).
    """
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)  # when final_dir was missing, .old (if any) is still the fallback until here
    if old.exists():
        shutil.rmtree(old)


def remove_abandoned_tmp(out_dir: Path) -> None:
    """Temporary siblings ``.<name>.<kind>-<pid>`` of ``out_dir`` whose process is gone (a killed run): removed."""
    for folder in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def package_versions(names) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (None where it is not installed), for a record."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
