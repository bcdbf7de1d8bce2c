"""Genes joined across samples for ``expreg.prepare``: by feature id where every sample has ids, else by name.

A union of genes over the samples: one column per gene, the same column name in every sample (symbols
made unique once over the union: ``B``, ``B-1``), and per sample which of the union's genes it
measured (a gene it never measured is not a zero). Versioned Ensembl ids (``ENSG00000141510.17``) are joined
without their version.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from expreg.ingest.readers import make_unique

_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$")  # ENSG00000141510.17: a versioned Ensembl id


@dataclass
class GeneUnion:
    """Every gene measured by any section, joined across sections by feature id when every section has ids.

    Attributes:
        names: The column names (``var_names``): the symbols, made unique once over the union, so a
            gene has the same name in every section.
        ids: The feature ids of the columns (None when joined by name).
        symbols: The symbols as the files give them (repeats and all).
        columns: Per section, the union column of each of its own columns.
        how: How the genes were joined (``prepare.json``).
    """

    names: list[str]
    ids: list[str] | None
    symbols: list[str]
    columns: list[np.ndarray]
    how: str
    notes: list[str] = field(default_factory=list)

    def measured(self, i: int) -> np.ndarray:
        """Which union columns section ``i`` measured (bool)."""
        found = np.zeros(len(self.names), dtype=bool)
        found[self.columns[i]] = True
        return found


def join_genes(sections) -> GeneUnion:
    """The union of the sections' genes, in order of first appearance (see ``GeneUnion``)."""
    without_ids = [s.sample_id for s in sections if s.gene_ids is None]
    repeated_ids = [s.sample_id for s in sections if s.gene_ids is not None and len(set(s.gene_ids)) < len(s.gene_ids)]
    if not without_ids and not repeated_ids:
        return _join_by_id(sections)
    index: dict[str, int] = {}
    symbols: list[str] = []
    columns = []
    for section in sections:
        own = section.gene_symbols or section.gene_names
        for name, symbol in zip(section.gene_names, own):
            if name not in index:
                index[name] = len(index)
                symbols.append(str(symbol))
        columns.append(np.array([index[n] for n in section.gene_names], dtype=np.int64))
    names = list(index)
    why = (
        f"sample(s) without feature ids: {', '.join(without_ids)}"
        if without_ids
        else f"feature ids repeat within sample(s) {', '.join(repeated_ids)}"
    )
    return GeneUnion(
        names, None, names, columns, f"gene name ({why}; names repeated within a sample made unique there)"
    )


def _unversioned(gene_id: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``: references differ in versions, not in genes (only
    Ensembl ids: ``AL354828.1`` is a name whose suffix is part of it)."""
    return _ENSEMBL_VERSION.sub(r"\1", str(gene_id))


def _join_by_id(sections) -> GeneUnion:
    index: dict[str, int] = {}
    ids: list[str] = []
    symbols: list[str] = []
    renamed = 0
    columns = []
    for section in sections:
        own = section.gene_symbols or section.gene_names
        cols = []
        for gene_id, symbol in zip(section.gene_ids, own):
            key = _unversioned(gene_id)
            if key not in index:
                index[key] = len(index)
                ids.append(str(gene_id))
                symbols.append(str(symbol))
            elif symbols[index[key]] != str(symbol):
                renamed += 1
            cols.append(index[key])
        columns.append(np.asarray(cols, dtype=np.int64))
    names, repeated = make_unique(symbols)
    notes = _disjoint_ids(sections, columns, len(index))
    if repeated:
        notes.append(
            f"{len(repeated)} symbol(s) name several feature ids, made unique with -1, -2 ... in every sample alike "
            f"(e.g. {', '.join(repeated[:5])})"
        )
    if renamed:
        notes.append(
            f"{renamed} feature id(s) carry another symbol in a later sample; the first sample's symbol is used"
        )
    how = "feature id without version (every sample has them: 10x features/id, h5ad var gene_ids)"
    return GeneUnion(names, ids, symbols, columns, how, notes)


def _disjoint_ids(sections, columns: list[np.ndarray], joined: int) -> list[str]:
    """A note when far fewer ids than names are shared between samples (ids from another namespace)."""
    if len(sections) < 2:
        return []
    id_samples = np.zeros(joined, dtype=np.int64)
    for cols in columns:
        id_samples[np.unique(cols)] += 1
    names = Counter(n for s in sections for n in set(s.gene_symbols or s.gene_names))
    shared_ids, shared_names = int((id_samples > 1).sum()), sum(1 for c in names.values() if c > 1)
    if shared_ids >= 0.5 * shared_names:
        return []
    return [
        f"the feature ids join {shared_ids} genes across samples where the names would join {shared_names}: do the "
        "samples use different id namespaces (gene names as ids, another annotation)? Their genes then stand "
        "apart; check genes_not_measured"
    ]
