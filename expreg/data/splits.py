"""Group-aware train/validation/test splits and group k-folds, persisted as CSV files.

A split file has the columns ``path``, ``group_id`` and ``split`` (``train``/``validation``/
``test``); a fold file has ``path``, ``group_id`` and ``fold`` (0..K-1). Whole groups (e.g.
patients) are assigned, so no group ever appears on both sides. The result depends only on the
CSV's content and the seed: rows are handled by sorted group id and written sorted by path.

Owns all split assignment: making split and fold tables, writing and checking split files, and
``split_rows`` (metadata + split file, fold file or nothing -> the split name of every row), the
one step every "metadata -> split -> ``DatasetDict``" path shares. Imports neither torch nor
``datasets``.

Command line::

    python -m expreg.splits --metadata_csv data.csv --out_csv splits/my_split.csv --seed 42
    python -m expreg.splits --metadata_csv data.csv --out_csv splits/folds.csv --n_folds 5
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from expreg.data.metadata import Metadata, MetadataError, describe_rows
from expreg.data.paths import row_chunks
from expreg.run_dir import atomic_write_lines

SPLIT_NAMES = ("train", "validation", "test")
# Random group orders tried when searching the split closest to the requested fractions.
_MAX_TRIALS = 2000


@dataclass
class SplitSummary:
    """How a split or fold assignment came out, per part."""

    rows: list[dict]

    def format(self) -> str:
        lines = [f"{'part':<12}{'groups':>8}{'samples':>10}{'fraction':>10}{'requested':>11}{'off by':>9}"]
        for r in self.rows:
            req = "" if r["requested"] is None else f"{r['requested']:.3f}"
            off = "" if r["requested"] is None else f"{r['fraction'] - r['requested']:+.3f}"
            lines.append(f"{r['part']:<12}{r['groups']:>8}{r['samples']:>10}{r['fraction']:>10.3f}{req:>11}{off:>9}")
        return "\n".join(lines)


def _group_sizes(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique group ids and their sample counts (independent of row order)."""
    counts = frame["group_id"].value_counts()
    groups = np.array(sorted(counts.index), dtype=object)
    return groups, counts.loc[groups].to_numpy(dtype=np.int64)


def _check_enough_groups(n_groups: int, needed: int, what: str) -> None:
    if n_groups < needed:
        raise MetadataError(
            f"too few groups for {what}: {n_groups} group(s) in the metadata, at least {needed} needed"
        )


def assign_splits(groups: np.ndarray, sizes: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign whole groups to splits so that sample fractions come closest to ``fractions``.

    Random group orders (from ``seed``) are each cut into consecutive blocks at the cumulative
    counts nearest to the targets; the order whose blocks miss the targets least wins. Every
    requested split gets at least one group.

    Args:
        groups: Unique group ids, sorted.
        sizes: Samples per group.
        fractions: Split name to requested sample fraction; must sum to 1.
        seed: Seed of the group orders.

    Returns:
        Group id to split name.
    """
    names = [n for n in SPLIT_NAMES if fractions.get(n, 0) > 0]
    _check_enough_groups(len(groups), len(names), f"the splits {', '.join(names)}")
    rng = np.random.default_rng(seed)
    total = sizes.sum()
    targets = np.array([fractions[n] for n in names]) * total
    bounds_target = np.cumsum(targets)[:-1]
    n_trials = min(_MAX_TRIALS, max(1, 2_000_000 // max(len(groups), 1)))
    best, best_err = None, np.inf
    for _ in range(n_trials):
        order = rng.permutation(len(groups))
        cum = np.cumsum(sizes[order])
        cuts = _nearest_cuts(cum, bounds_target)
        parts = np.diff(np.concatenate([[0], cum[cuts - 1], [total]]))
        err = np.abs(parts - targets).sum()
        if err < best_err:
            best, best_err = (order, cuts), err
            if err == 0:
                break
    order, cuts = best
    labels = np.repeat(np.arange(len(names)), np.diff(np.concatenate([[0], cuts, [len(groups)]])))
    return {groups[g]: names[lab] for g, lab in zip(order, labels)}


def _nearest_cuts(cum: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Group-count cut positions whose cumulative samples are nearest to ``bounds``.

    Each block keeps at least one group: cut ``i`` lies in ``[i + 1, n_groups - n_cuts + i]``.
    """
    n, m = len(cum), len(bounds)
    right = np.searchsorted(cum, bounds)  # first index with cum >= bound
    cuts = np.empty(m, dtype=np.int64)
    for i, (b, r) in enumerate(zip(bounds, right)):
        options = [c for c in (r, r + 1) if 1 <= c <= n]
        c = min(options, key=lambda c: abs(cum[c - 1] - b)) if options else 1
        low = (cuts[i - 1] + 1) if i else 1
        cuts[i] = min(max(c, low), n - (m - i))
    return cuts


def assign_folds(groups: np.ndarray, sizes: np.ndarray, n_folds: int, seed: int) -> dict[str, int]:
    """Assign whole groups to ``n_folds`` folds with balanced sample counts.

    Groups, in a seeded random order, are taken largest first and each given to the fold with
    the fewest samples so far. With ``n_folds == len(groups)`` this is leave-one-group-out.
    """
    if n_folds < 2:
        raise MetadataError(f"--n_folds must be at least 2, got {n_folds}")
    _check_enough_groups(len(groups), n_folds, f"{n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(groups))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(n_folds, dtype=np.int64)
    n_groups = np.zeros(n_folds, dtype=np.int64)
    folds = {}
    for g in order:
        # Fewest samples first; a fold without groups yet goes before any other.
        f = int(np.lexsort((load, n_groups > 0))[0])
        folds[groups[g]] = f
        load[f] += sizes[g]
        n_groups[f] += 1
    return folds


def make_split_table(
    metadata: Metadata, val_frac: float = 0.2, test_frac: float = 0.0, seed: int = 42
) -> tuple[pd.DataFrame, SplitSummary]:
    """Build the ``path, group_id, split`` table for a metadata table."""
    if not 0 < val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise MetadataError(
            f"invalid fractions: val_frac={val_frac}, test_frac={test_frac}; need 0 < val_frac, "
            "0 <= test_frac and val_frac + test_frac < 1"
        )
    fractions = {"train": 1 - val_frac - test_frac, "validation": val_frac, "test": test_frac}
    groups, sizes = _group_sizes(metadata.frame)
    mapping = assign_splits(groups, sizes, fractions, seed)
    table = _table(metadata.frame, "split", mapping)
    requested = {k: v for k, v in fractions.items() if v > 0}
    return table, _summarize(table, "split", list(requested), requested)


def make_fold_table(metadata: Metadata, n_folds: int, seed: int = 42) -> tuple[pd.DataFrame, SplitSummary]:
    """Build the ``path, group_id, fold`` table for a metadata table."""
    groups, sizes = _group_sizes(metadata.frame)
    mapping = assign_folds(groups, sizes, n_folds, seed)
    table = _table(metadata.frame, "fold", mapping)
    return table, _summarize(table, "fold", list(range(n_folds)), {f: 1 / n_folds for f in range(n_folds)})


def _table(frame: pd.DataFrame, column: str, mapping: dict) -> pd.DataFrame:
    table = frame[["path", "group_id"]].copy()
    table[column] = table["group_id"].map(mapping)
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def _summarize(table: pd.DataFrame, column: str, parts: list, requested: dict) -> SplitSummary:
    rows = []
    for part in parts:
        sel = table[column] == part
        rows.append(
            {
                "part": str(part),
                "groups": int(table.loc[sel, "group_id"].nunique()),
                "samples": int(sel.sum()),
                "fraction": float(sel.mean()),
                "requested": requested.get(part),
            }
        )
    return SplitSummary(rows)


def write_table(table: pd.DataFrame, out_csv: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a split/fold table atomically (temporary file, then rename)."""
    out = Path(out_csv)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out_csv or pass --overwrite")
    chunks = (
        table.iloc[rows.start : rows.stop].to_csv(index=False, header=rows.start == 0, lineterminator="\n")
        for rows in row_chunks(len(table))
    )  # a cohort's table is written a chunk at a time, not made into one string
    atomic_write_lines(out, chunks if len(table) else [table.to_csv(index=False, lineterminator="\n")])
    return out


def read_split_file(split_csv: str | os.PathLike, metadata: Metadata) -> pd.DataFrame:
    """Read a split or fold file and check it against the metadata.

    Checks that every metadata row is assigned exactly once, that no other paths appear, that
    each path's group matches the metadata and that no group sits in two splits or folds.

    Returns:
        The split table, rows in the metadata's order (columns ``path``, ``group_id`` and
        ``split`` or ``fold``).

    Raises:
        MetadataError: Naming the file, lines and column of the first problem.
    """
    path = Path(split_csv).resolve()
    if not path.is_file():
        raise MetadataError(f"{path}: split file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MetadataError(f"{path}: could not read the split file: {err}") from err
    column = "split" if "split" in table.columns else "fold" if "fold" in table.columns else None
    missing = [c for c in ("path", "group_id") if c not in table.columns]
    if missing or column is None:
        need = missing + ([] if column else ["split or fold"])
        raise MetadataError(f"{path}: missing column(s) {', '.join(need)}")
    _check_split_values(path, table, column)
    rows = _check_split_rows(path, table, metadata)
    _check_no_leakage(path, table, column)
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = np.arange(len(rows))  # split-file row of each metadata row
    table = table.iloc[order].reset_index(drop=True)
    if column == "fold":
        table["fold"] = table["fold"].astype(int)
    return table


def _check_split_values(path: Path, table: pd.DataFrame, column: str) -> None:
    values = table[column].str.strip()
    table[column] = values
    bad = ~values.isin(SPLIT_NAMES) if column == "split" else ~values.str.fullmatch(r"\d+")
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())
        allowed = "train, validation or test" if column == "split" else "a fold number 0, 1, ..."
        raise MetadataError(
            f"{path}: column '{column}', {describe_rows(rows + 2)}: value {values.iloc[rows[0]]!r} is not {allowed}"
        )


def _check_split_rows(path: Path, table: pd.DataFrame, metadata: Metadata) -> np.ndarray:
    """Check that the split file assigns exactly the metadata's rows, with their groups.

    Returns:
        The metadata row of each split-file row.
    """
    dup = table["path"].duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        raise MetadataError(
            f"{path}: column 'path', {describe_rows(rows + 2)}: path assigned more than once "
            f"(e.g. {table['path'].iloc[rows[0]]!r})"
        )
    meta_rows = pd.Index(metadata.frame["path"]).get_indexer(table["path"])  # one hash join (1M rows: ~1 s)
    unknown = meta_rows < 0
    if unknown.any():
        rows = np.flatnonzero(unknown)
        raise MetadataError(
            f"{path}: column 'path', {describe_rows(rows + 2)}: path not in the metadata {metadata.csv_path} "
            f"(e.g. {table['path'].iloc[rows[0]]!r}); was the split made from another CSV?"
        )
    assigned = np.zeros(len(metadata.frame), dtype=bool)
    assigned[meta_rows] = True
    if not assigned.all():
        rows = np.flatnonzero(~assigned)
        raise MetadataError(
            f"{metadata.csv_path}: column 'path', {describe_rows(rows + 2)}: row not assigned by the split file "
            f"{path} (e.g. {metadata.frame['path'].iloc[rows[0]]!r})"
        )
    known = metadata.frame["group_id"].to_numpy()[meta_rows]
    wrong_group = table["group_id"].to_numpy() != known
    if wrong_group.any():
        rows = np.flatnonzero(wrong_group)
        r = rows[0]
        raise MetadataError(
            f"{path}: column 'group_id', {describe_rows(rows + 2)}: group differs from the metadata "
            f"(e.g. {table['path'].iloc[r]!r}: {table['group_id'].iloc[r]!r} here, "
            f"{known[r]!r} in {metadata.csv_path.name})"
        )
    return meta_rows


def _check_no_leakage(path: Path, table: pd.DataFrame, column: str) -> None:
    parts_per_group = table.groupby("group_id")[column].nunique()
    leaking = parts_per_group[parts_per_group > 1].index
    if len(leaking):
        rows = np.flatnonzero(table["group_id"].isin(leaking).to_numpy())
        raise MetadataError(
            f"{path}: column '{column}', {describe_rows(rows + 2)}: group(s) {', '.join(map(str, leaking[:5]))} "
            f"appear in more than one {column} (leakage)"
        )


# ---------------------------------------------------------------------------------------------
# The split of every metadata row
# ---------------------------------------------------------------------------------------------


@dataclass
class RowSplit:
    """The split of a metadata table's rows.

    Attributes:
        names: The split name (``train``/``validation``/``test``) of every metadata row, in row order.
        table: The split table when it was made here (``split_csv`` None), for the caller to save.
        summary: Its summary (``SplitSummary.format()`` gives the printed table).
    """

    names: np.ndarray
    table: pd.DataFrame | None = None
    summary: SplitSummary | None = None


def split_rows(
    metadata: Metadata,
    split_csv: str | os.PathLike | None,
    *,
    fold: int | None = None,
    seed: int = 42,
    val_frac: float = 0.2,
) -> RowSplit:
    """Assign every metadata row to a split.

    Args:
        metadata: The validated table.
        split_csv: A split file (``split`` column) or fold file (``fold`` column). When None, a
            group-aware train/validation split is made here (``make_split_table``).
        fold: With a fold file: the fold held out as ``test``; the other folds' groups are split
            into ``train`` and ``validation`` (``val_frac``, ``seed``).
        seed: Seed of any split made here.
        val_frac: Validation fraction of any split made here.
    """
    if split_csv is None:
        table, summary = make_split_table(metadata, val_frac=val_frac, seed=seed)
        names = table.set_index("path").loc[metadata.frame["path"], "split"].to_numpy()
        return RowSplit(names, table, summary)
    table = read_split_file(split_csv, metadata)
    if "split" in table.columns:
        if fold is not None:
            raise MetadataError(f"{split_csv}: fold={fold} given but this is a split file, not a fold file")
        return RowSplit(table["split"].to_numpy())
    folds = table["fold"].to_numpy()
    if fold is None or fold not in set(folds.tolist()):
        raise MetadataError(
            f"{split_csv}: a fold file; choose the held-out fold (one of {sorted(set(folds.tolist()))})"
        )
    return RowSplit(_split_training_folds(table, folds == fold, seed, val_frac))


def split_assignment(
    metadata: Metadata,
    split_csv: str | os.PathLike | None,
    *,
    fold: int | None = None,
    seed: int = 42,
    val_frac: float = 0.2,
) -> np.ndarray:
    """The split name (``train``/``validation``/``test``) of every metadata row, in row order."""
    return split_rows(metadata, split_csv, fold=fold, seed=seed, val_frac=val_frac).names


def _split_training_folds(table, is_test: np.ndarray, seed: int, val_frac: float) -> np.ndarray:
    train_part = table.loc[~is_test]
    counts = train_part["group_id"].value_counts()
    groups = np.array(sorted(counts.index), dtype=object)
    if len(groups) < 2:
        # One training group (e.g. leave-one-patient-out with two patients): validation, used only
        # to pick the best epoch, is a seeded random fraction of its samples. The test fold stays
        # untouched; the validation score is optimistic (same patient), the test score is not.
        rng = np.random.default_rng(seed)
        order = np.argsort(train_part["path"].to_numpy(), kind="stable")  # independent of row order
        n_val = max(1, int(round(val_frac * len(order))))
        val_rows = train_part.index[order[rng.permutation(len(order))[:n_val]]]
        out = np.where(is_test, "test", "train").astype(object)
        out[table.index.get_indexer(val_rows)] = "validation"
        return out
    mapping = assign_splits(
        groups, counts.loc[groups].to_numpy(), {"train": 1 - val_frac, "validation": val_frac}, seed
    )
    out = np.where(is_test, "test", table["group_id"].map(mapping).fillna("test").to_numpy())
    return out.astype(object)
