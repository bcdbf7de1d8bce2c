"""Raw counts -> the run's target genes and their targets, chosen on training rows only.

The transform itself lives in ``expreg.data.counts`` (re-exported here); the scores that choose genes
in ``expreg.data.gene_scores``; this module reads the expression file, aligns it with the metadata,
chooses (or reads) the genes and masks what a sample never measured. The counts are never read whole:
``expreg.data.count_rows`` streams the file's rows in blocks for gene choice and for the targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from expreg.data.count_rows import CountRows
from expreg.data.counts import CPM_TARGET_SUM, transform_counts  # noqa: F401 - re-exported: the targets' one place
from expreg.data.gene_scores import detection_rate, gene_scores

GENE_METHODS = ("hvg", "var", "mean", "svg")


def parse_gene_spec(spec: str) -> tuple[str, int | None, str | None]:
    """``"hvg:50"`` -> ``("hvg", 50, None)``; a file path -> ``("file", None, path)``."""
    method, sep, k = spec.partition(":")
    if sep and method in GENE_METHODS:
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"data.genes {spec!r}: the number after '{method}:' must be a positive integer")
        return method, int(k), None
    return "file", None, spec


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores (NaN last), highest first; ties keep column order."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    return order[:k]


@dataclass
class GeneChoice:
    """The genes a run predicts and how they were chosen (recorded in the run directory and model card)."""

    genes: list[str]
    spec: str  # data.genes as given: "hvg:50", "var:50", "mean:50" or a file
    transform: str
    min_detection: float
    num_train_spots: int
    train_groups: list[str]
    excluded_rare: int = 0  # genes left out for detection below min_detection
    provenance: str | None = None  # a given list: how it was chosen, when a <list>.json beside it says so
    # genes left out because a training sample never measured them: sample -> how many (their zeros are no data)
    excluded_unmeasured: dict[str, int] = field(default_factory=dict)
    num_excluded_unmeasured: int = 0
    unmeasured_scope: str = "training sample"  # whose panels decide eligibility ("sample of the run" by default)
    # chosen genes some sample did not measure (data.allow_unmeasured_genes): sample -> genes; masked, never zeros
    masked_unmeasured: dict[str, list[str]] = field(default_factory=dict)
    # per chosen gene, on the training spots: detection rate and Spearman with the library size (genes.json)
    gene_stats: dict[str, dict] = field(default_factory=dict)

    @property
    def chosen_here(self) -> bool:
        """Chosen by this call on its training rows (not a list given from outside)."""
        return parse_gene_spec(self.spec)[0] != "file"

    def describe(self) -> str:
        """One sentence for logs and model cards."""
        masked = self._masked_note()
        if not self.chosen_here:
            origin = f"chosen earlier: {self.provenance}" if self.provenance else "not checked for leakage"
            return f"{len(self.genes)} genes listed in {self.spec} ({origin}); {self.transform} values{masked}"
        notes = []
        if self.num_excluded_unmeasured:
            by_sample = ", ".join(f"{s}: {n}" for s, n in sorted(self.excluded_unmeasured.items()))
            notes.append(
                f"leaving out {self.num_excluded_unmeasured} gene(s) not measured by every {self.unmeasured_scope} "
                f"({by_sample})"
            )
        if self.excluded_rare:
            notes.append(f"leaving out {self.excluded_rare} gene(s) detected in < {self.min_detection:g} of them")
        rare = f", after {' and '.join(notes)}" if notes else ""
        return (
            f"{len(self.genes)} genes by {self.spec} on {self.num_train_spots} training spots of group(s) "
            f"{', '.join(self.train_groups)} ({self.transform} values{rare}){masked}"
        )

    def _masked_note(self) -> str:
        if not self.masked_unmeasured:
            return ""
        parts = [
            f"{s}: {', '.join(g[:5])}{' ...' if len(g) > 5 else ''}" for s, g in sorted(self.masked_unmeasured.items())
        ]
        return f"; not measured, left out of the loss and the metrics: {'; '.join(parts)}"

    def record(self) -> dict:
        """What ``<list>.json`` beside a written gene list holds (read back as ``provenance``)."""
        return {
            "genes": self.genes,
            "spec": self.spec,
            "how": self.describe(),
            "transform": self.transform,
            "excluded_not_measured": self.num_excluded_unmeasured,
            "excluded_not_measured_by_every": self.unmeasured_scope,
            "excluded_not_measured_per_sample": dict(sorted(self.excluded_unmeasured.items())),
            "excluded_rare": self.excluded_rare,
            "masked_not_measured": dict(sorted(self.masked_unmeasured.items())),
            "per_gene_on_training_spots": self.gene_stats,
        }


def choose_genes(
    train_counts,
    gene_names: list[str],
    spec: str,
    *,
    min_detection: float,
    transform: str,
    train_groups,
    not_measured: dict[str, np.ndarray] | None = None,
    spots=None,
) -> GeneChoice:
    """Choose the target genes from the training spots only (never from validation or test).

    Args:
        train_counts: Raw counts of the training spots ``(spots, genes)``.
        gene_names: Names of the count columns.
        spec: ``hvg:K`` (scanpy's Seurat-flavour highly variable genes), ``var:K`` (top variance),
            ``mean:K`` (top mean), ``svg:K`` (spatially variable: Moran's I on each training
            section's spots, ``expreg.data.spatial_genes``), all on transformed values of the genes
            detected in at least ``min_detection`` of the training spots and measured by every
            sample considered; or a file with one gene name per line.
        not_measured: Sample -> the count columns it never measured (its zeros there are no data):
            never eligible.
        spots: ``(positions (spots, 2) in pixels, section of each spot)`` of the training spots, for ``svg``.
    """
    method, k, path = parse_gene_spec(spec)
    common = {"spec": spec, "transform": transform, "min_detection": min_detection}
    common |= {"num_train_spots": int(train_counts.shape[0]), "train_groups": sorted(set(map(str, train_groups)))}
    if method == "file":
        genes, provenance = _genes_from_file(path, gene_names)
        return GeneChoice(genes, provenance=provenance, **common)
    if method in ("hvg", "svg") and transform == "none":
        raise ValueError(f"data.genes={spec} works on log values: set data.target_transform to log1p_cpm or log1p")
    if method == "svg" and spots is None:
        raise ValueError(
            f"data.genes={spec}: spatially variable genes need each spot's position and section (obs x_px, y_px "
            "and sample_id of an expression.h5ad written by expreg.prepare)"
        )
    measured = np.ones(len(gene_names), dtype=bool)
    for columns in (not_measured or {}).values():
        measured[np.asarray(columns, dtype=np.int64)] = False
    detected = detection_rate(train_counts) >= min_detection
    eligible = np.flatnonzero(detected & measured)
    if len(eligible) < k:
        unmeasured = f" and measured by every sample ({int((~measured).sum())} are not)" if not measured.all() else ""
        raise ValueError(
            f"data.genes={spec}: only {len(eligible)} genes are detected in >= {min_detection:g} of the "
            f"{train_counts.shape[0]} training spots{unmeasured}; lower data.min_gene_detection or K"
        )
    chosen = eligible[top_k(gene_scores(train_counts, eligible, transform, method, spots), k)]
    excluded = {s: len(c) for s, c in (not_measured or {}).items() if len(c)}
    return GeneChoice(
        [gene_names[i] for i in chosen],
        excluded_rare=int((measured & ~detected).sum()),
        excluded_unmeasured=excluded,
        num_excluded_unmeasured=int((~measured).sum()),
        **common,
    )


def read_gene_list(path, what: str = "data.genes") -> list[str]:
    """One gene name per line (blank lines and ``#`` comments skipped); repeats are an error."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{what} {path}: not hvg:K, var:K, mean:K or an existing file of gene names")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    genes = [line for line in lines if line and not line.startswith("#")]
    from collections import Counter

    repeated = sorted(g for g, n in Counter(genes).items() if n > 1)  # linear: 30,000 genes in milliseconds
    if repeated:
        raise ValueError(f"{what} {path}: repeated gene name(s) {', '.join(repeated[:5])}")
    return genes


def _genes_from_file(path, gene_names: list[str]) -> tuple[list[str], str | None]:
    """The genes of a list file (all in the expression file) and, from ``<list>.json`` beside it, how they were chosen."""
    import json
    from pathlib import Path

    genes = read_gene_list(path)
    record = Path(path).with_suffix(".json")
    provenance = json.loads(record.read_text()).get("how") if record.is_file() else None
    known = set(gene_names)
    unknown = [g for g in genes if g not in known]
    if unknown or not genes:
        raise ValueError(
            f"data.genes {path}: {len(unknown)} gene(s) not in the expression file: {', '.join(unknown[:10])}"
            if unknown
            else f"data.genes {path}: no gene names"
        )
    return genes, provenance


def expression_targets(
    metadata,
    expression_file,
    is_train: np.ndarray,
    spec: str,
    *,
    min_detection: float,
    transform: str,
    allow_unmeasured: bool = False,
):
    """The metadata with targets ``y0..`` computed from raw counts for genes chosen on the training rows.

    A gene a sample never measured (``uns["genes_not_measured"]``, written by ``expreg.prepare``) is
    never counted as zero: it is not eligible for ``hvg/var/mean`` when a sample of the rows lacks it
    (a training sample, with ``allow_unmeasured``), and a listed gene that any sample of the rows
    lacks is an error naming the sample, unless ``allow_unmeasured`` (``data.allow_unmeasured_genes``):
    then those targets are NaN, which the loss and the metrics leave out.

    Args:
        metadata: A metadata table without target columns (``expreg.prepare``'s ``metadata.csv``).
        expression_file: Its ``expression.h5ad`` (raw counts; rows matched by ``sample_id`` and
            ``barcode``, else by ``path``).
        is_train: Which metadata rows are training rows: the only rows genes are chosen on.

    Returns:
        ``(Metadata with y0..y{K-1} and the chosen gene names, GeneChoice)``.
    """
    from expreg.config import ConfigError

    table, counts, samples, rows = _read_rows(metadata, expression_file)  # counts: streamed from the file
    not_measured = _not_measured(table, samples, expression_file)
    considered = _eligibility_samples(samples, is_train, allow_unmeasured)
    groups = metadata.frame["group_id"].to_numpy()[is_train]
    try:
        choice = choose_genes(
            counts.select(is_train),
            list(table.var_names),
            spec,
            min_detection=min_detection,
            transform=transform,
            train_groups=groups,
            not_measured={s: not_measured[s] for s in considered if s in not_measured},
            spots=_training_spots(table, rows, is_train),
        )
        choice.unmeasured_scope = "training sample" if allow_unmeasured else "sample of the run"
    except ValueError as err:
        raise ConfigError(str(err)) from err
    index = {g: i for i, g in enumerate(table.var_names)}
    columns = [index[g] for g in choice.genes]
    targets, library = _targets_and_depth(counts, columns, transform)
    choice.masked_unmeasured = _mask_unmeasured(
        targets, samples, is_train, not_measured, columns, choice, allow_unmeasured, expression_file
    )
    choice.gene_stats = _gene_stats(library[is_train], targets[is_train], choice.genes)
    return _with_targets(metadata, targets, library, choice.genes), choice


def _targets_and_depth(counts: CountRows, columns: list[int], transform: str) -> tuple[np.ndarray, np.ndarray]:
    """The targets of the count ``columns`` for every row and each row's library size, one block of rows at a
    time (a row's targets need its own total only)."""
    targets = np.zeros((counts.shape[0], len(columns)), dtype=np.float32)
    library = np.zeros(counts.shape[0])
    for where, block in counts.blocks():
        totals = np.asarray(block.sum(axis=1), dtype=np.float64).reshape(-1)
        targets[where] = transform_counts(block, columns, transform, totals)
        library[where] = totals
    return targets, library


def _with_targets(metadata, targets: np.ndarray, library: np.ndarray, genes: list[str]):
    """The metadata with ``y0..`` and each spot's ``library_size``: its total over all its measured genes
    (what the depth-adjusted scores regress out)."""
    from expreg.data.metadata import Metadata

    frame = metadata.frame.copy()
    names = [f"y{k}" for k in range(len(genes))]
    frame[names] = targets.astype(np.float64)
    frame["library_size"] = library
    return Metadata(metadata.csv_path, frame, names, list(genes))


LOW_DETECTION = 0.3  # median detection of the chosen genes below this: their scores mostly follow depth


def _gene_stats(library: np.ndarray, train_targets: np.ndarray, genes: list[str]) -> dict[str, dict]:
    """Per chosen gene on the training spots: its detection rate and the Spearman of its target with the
    spot's library size; a warning when the median detection is below ``LOW_DETECTION``. A target is 0
    exactly where the count is (every transform maps 0 to 0 and a count >= 1 above it)."""
    import logging

    from scipy.stats import rankdata

    detection, stats = np.zeros(len(genes)), {}
    for k, gene in enumerate(genes):
        values = train_targets[:, k]
        rows = ~np.isnan(values)  # the spots whose sample measured the gene (zeros elsewhere are no data)
        detection[k] = (values[rows] != 0).mean() if rows.any() else np.nan
        ranks, depth = rankdata(values[rows]), rankdata(library[rows])
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant gene or depth: undefined, said as None
            both = np.corrcoef(ranks, depth)[0, 1] if rows.sum() > 1 and np.ptp(ranks) > 0 else np.nan
        stats[gene] = {
            "detection": float(detection[k]),
            "spearman_with_library_size": None if np.isnan(both) else float(both),
        }
    median = float(np.nanmedian(detection)) if len(detection) and not np.isnan(detection).all() else 1.0
    if median < LOW_DETECTION:
        logging.getLogger("expreg").warning(
            f"the chosen genes are detected in a median {100 * median:.0f} % of the training spots (< "
            f"{100 * LOW_DETECTION:.0f} %): their targets are mostly 'detected or not', which follows sequencing "
            "depth; read the depth-adjusted scores, or raise data.min_gene_detection"
        )
    return stats


def _training_spots(table, rows: np.ndarray, is_train: np.ndarray):
    """``(positions, sections)`` of the training rows (``svg``), or None when the file does not record them."""
    if not {"x_px", "y_px", "sample_id"} <= set(table.obs.columns):
        return None
    obs = table.obs.iloc[rows[is_train]]
    return obs[["x_px", "y_px"]].to_numpy(dtype=np.float64), obs["sample_id"].astype(str).to_numpy()


def _eligibility_samples(samples, is_train: np.ndarray, allow_unmeasured: bool) -> list[str]:
    """The samples whose gene panels decide which genes are eligible: every sample of the rows (a panel is
    experimental design, not an outcome; a gene a held-out sample never measured could not be scored
    there), or only the training samples when unmeasured targets may be masked."""
    if samples is None:
        return []
    return sorted(set(samples[is_train] if allow_unmeasured else samples))


def _read_expression(path):
    """``(the expression file's obs, var and uns as an AnnData without X, its counts as CountRows)``, read once
    per process while the file is unchanged: ``expreg.cv`` chooses each fold's genes and trains each fold in
    one process. The counts stay on disk (``CountRows`` streams them: a 300,000-spot cohort's are
    gigabytes). Keyed on the file's path, size and modification time; read-only."""
    from pathlib import Path

    stat = Path(path).stat() if Path(path).is_file() else None
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns) if stat else None
    if key is None or _EXPRESSION_CACHE.get("key") != key:
        _EXPRESSION_CACHE.clear()  # one file at a time
        table, counts = _tables_and_counts(path)
        _EXPRESSION_CACHE.update(key=key, table=table, counts=counts)
        return table, counts
    return _EXPRESSION_CACHE["table"], _EXPRESSION_CACHE["counts"]


def _tables_and_counts(path):
    """obs, var and uns of an ``.h5ad`` (X left on disk), and its X as ``CountRows``."""
    from expreg.data.h5ad import H5adError, read_h5ad_tables

    table, counts = read_h5ad_tables(path), CountRows.open(path)
    if counts.shape != table.shape:
        raise H5adError(
            f"{path}: X is {counts.shape[0]} x {counts.shape[1]} but obs x var is {table.shape[0]} x {table.shape[1]}"
        )
    return table, counts


_EXPRESSION_CACHE: dict = {}


def _read_rows(metadata, expression_file):
    """``(the expression file, its counts in metadata row order, each row's sample or None, those rows)``."""
    from expreg.data.metadata import MetadataError

    if metadata.target_columns:
        raise MetadataError(
            f"{metadata.csv_path}: has target columns y0..; with data.expression_file the targets come from the "
            "raw counts: use a metadata CSV without y columns (expreg.prepare without --genes)"
        )
    table, counts = _read_expression(expression_file)
    rows = _aligned_rows(metadata, table.obs, expression_file)
    samples = table.obs["sample_id"].astype(str).to_numpy()[rows] if "sample_id" in table.obs.columns else None
    return table, counts.select(rows), samples, rows


def _not_measured(table, samples, expression_file) -> dict[str, np.ndarray]:
    """Sample -> the count columns it never measured, from ``uns["genes_not_measured"]``."""
    import logging

    record = table.uns.get("genes_not_measured")
    if not isinstance(record, dict):
        if samples is not None and len(set(samples)) > 1:
            logging.getLogger("expreg").warning(
                f"{expression_file} does not record which genes each sample measured (written by an older "
                "expreg.prepare): a gene measured only by other samples counts as zeros; prepare it again to fix"
            )
        return {}
    index = {g: i for i, g in enumerate(table.var_names)}
    found = {}
    for sample, names in record.items():
        names = [str(g) for g in np.asarray(names).ravel().tolist()]
        found[str(sample)] = np.array([index[g] for g in names if g in index], dtype=np.int64)
    return found


def _mask_unmeasured(targets, samples, is_train, not_measured, columns, choice, allow, expression_file):
    """Targets of genes a sample did not measure -> NaN (``allow``), else an error naming the samples."""
    from expreg.config import ConfigError

    if samples is None or not not_measured:
        return {}
    masked, problems = {}, []
    for sample in sorted(set(samples)):
        lacking = set(not_measured.get(sample, np.array([], np.int64)).tolist())
        missing = [k for k, c in enumerate(columns) if c in lacking]
        if not missing:
            continue
        rows = samples == sample
        role = (
            "training" if is_train[rows].all() else "held-out" if not is_train[rows].any() else "training and held-out"
        )
        genes = [choice.genes[k] for k in missing]
        problems.append(
            f"sample {sample} ({role} rows) did not measure {', '.join(genes[:10])}{' ...' if len(genes) > 10 else ''}"
        )
        masked[sample] = genes
        targets[np.ix_(rows, np.asarray(missing))] = np.nan
    if problems and not allow:
        raise ConfigError(
            f"data.genes={choice.spec}: {'; '.join(problems)} ({expression_file} records it in "
            "uns['genes_not_measured']); their zeros are not measurements: leave those genes out of the list, or set "
            "data.allow_unmeasured_genes=true to leave those targets out of the loss and the metrics"
        )
    never = [c for k, c in enumerate(choice.genes) if is_train.any() and not np.isfinite(targets[is_train, k]).any()]
    if never:
        raise ConfigError(
            f"data.genes={choice.spec}: no training sample measured {', '.join(never[:10])}: such a gene cannot be "
            "learned; leave it out of the list"
        )
    return masked


def _aligned_rows(metadata, obs, expression_file) -> np.ndarray:
    """For every metadata row, its row in the expression file (an error names rows that have none)."""
    from expreg.data.metadata import MetadataError, describe_rows

    frame = metadata.frame
    if {"sample_id", "barcode"} <= set(frame.columns) and {"sample_id", "barcode"} <= set(obs.columns):
        keys = frame["sample_id"].astype(str) + "\t" + frame["barcode"].astype(str)
        available = obs["sample_id"].astype(str) + "\t" + obs["barcode"].astype(str)
        how = "sample_id and barcode"
    elif "path" in obs.columns:
        keys, available, how = frame["path"].astype(str), obs["path"].astype(str), "path"
    else:
        raise MetadataError(
            f"{expression_file}: its obs has neither sample_id + barcode nor path columns to match the rows of "
            f"{metadata.csv_path}"
        )
    position = {key: i for i, key in enumerate(available.to_numpy())}
    rows = np.array([position.get(key, -1) for key in keys.to_numpy()], dtype=np.int64)
    missing = np.flatnonzero(rows < 0)
    if len(missing):
        raise MetadataError(
            f"{metadata.csv_path}: {describe_rows(missing + 2)}: no row with the same {how} in {expression_file}"
        )
    return rows
