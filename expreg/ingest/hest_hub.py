"""HEST-1k samples by id (or by their metadata) from the HuggingFace Hub into the layout ``expreg.prepare`` reads.

HEST-1k is the gated dataset ``MahmoodLab/hest``: a metadata table at its root (``HEST_v<version>.csv``:
``id``, ``patient``, ``organ``, ``st_technology``, ``oncotree_code``, ``species``,
``pixel_size_um_estimated``, ...) and one file per sample in ``st/<id>.h5ad``, ``wsis/<id>.tif``,
``metadata/<id>.json`` and ``patches/<id>.h5``. Everything goes through ``huggingface_hub``
(``snapshot_download`` with ``allow_patterns``): its token (``hf auth login`` or ``HF_TOKEN``), its cache
(files already there are not downloaded again) and its offline mode (``HF_HUB_OFFLINE=1``: the
cache only). The output folder links each file from the cache (a copy where links are not possible)
and holds ``samples.csv``, a sample sheet with ``group_id`` = HEST's ``patient``.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from pathlib import Path

import pandas as pd

REPO_ID = "MahmoodLab/hest"
FILES = {"st": "{id}.h5ad", "wsis": "{id}.tif", "metadata": "{id}.json", "patches": "{id}.h5"}
_VERSION = re.compile(r"^HEST_v(\d+(?:_\d+)*)\.csv$")


class HestHubError(Exception):
    """The Hub, the cache or the selection cannot give what was asked; the message says what to do."""


def _hub_call(fn, repo_id: str, **kwargs):
    """``fn(repo_id, repo_type="dataset", **kwargs)`` with the Hub's errors as one line saying what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    page = f"https://huggingface.co/datasets/{repo_id}"
    try:
        return fn(repo_id, repo_type="dataset", **kwargs)
    except GatedRepoError as err:
        raise HestHubError(
            f"{repo_id} is gated: accept its terms at {page} with your account, then log in here "
            f"(`hf auth login`, or set HF_TOKEN) and run again ({type(err).__name__})"
        ) from err
    except RepositoryNotFoundError as err:
        raise HestHubError(
            f"{repo_id}: no such dataset, or it is gated and you are not logged in: accept its terms at {page}, "
            "then `hf auth login` (or set HF_TOKEN)"
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise HestHubError(
            f"{repo_id} is not in the HuggingFace cache{' given' if kwargs.get('cache_dir') else ''} and the Hub "
            "cannot be reached (no network, or HF_HUB_OFFLINE=1): run this once where the Hub is reachable, "
            "with the same cache (HF_HOME / --cache_dir), then again here"
        ) from err
    except HfHubHTTPError as err:
        raise HestHubError(f"{repo_id}: the Hub refused ({str(err).splitlines()[0]})") from err


def metadata_table(repo_id: str = REPO_ID, cache_dir=None, revision=None, name: str | None = None):
    """``(HEST's metadata table, its file)``: ``name``, or the newest ``HEST_v*.csv`` of the dataset."""
    from huggingface_hub import snapshot_download

    pattern = name or "HEST_v*.csv"
    folder = Path(
        _hub_call(snapshot_download, repo_id, allow_patterns=[pattern], cache_dir=cache_dir, revision=revision)
    )
    found = sorted(
        (p for p in folder.glob(pattern) if name or _VERSION.match(p.name)),
        key=lambda p: [int(v) for v in _VERSION.match(p.name).group(1).split("_")] if _VERSION.match(p.name) else [],
    )
    if not found:
        raise HestHubError(f"{repo_id}: no metadata table {pattern} in {folder}")
    table = pd.read_csv(found[-1], dtype=str, keep_default_na=False)
    if "id" not in table.columns:
        raise HestHubError(f"{found[-1]}: no 'id' column (columns: {', '.join(table.columns[:10])})")
    return table, found[-1]


def select(table: pd.DataFrame, ids=(), where=(), source: str = "the metadata table") -> pd.DataFrame:
    """The rows of ``ids`` (each must exist) and/or of every ``key=value[,value...]`` of ``where`` (ANDed,
    case-insensitive); an error naming what is unknown, with the closest ids or the known values."""
    rows = pd.Series(True, index=table.index)
    for condition in where:
        key, sep, values = condition.partition("=")
        key = key.strip()
        if not sep or key not in table.columns:
            raise HestHubError(
                f"--where {condition!r}: expected column=value with a column of {source} ({', '.join(table.columns)})"
            )
        wanted = {v.strip().lower() for v in values.split(",")}
        match = table[key].str.strip().str.lower().isin(wanted)
        if not match.any():
            known = sorted(set(table[key]))[:20]
            raise HestHubError(f"--where {condition!r}: no sample has it; {key} takes values {', '.join(known)}")
        rows &= match
    if ids:
        known = set(table["id"])
        unknown = [i for i in ids if i not in known]
        if unknown:
            hints = [
                f"{i} (did you mean {', '.join(difflib.get_close_matches(i, known, 3)) or 'nothing close'}?)"
                for i in unknown
            ]
            raise HestHubError(f"unknown HEST-1k id(s) in {source}: {'; '.join(hints)}")
        rows &= table["id"].isin(ids)
    chosen = table[rows]
    if chosen.empty:
        raise HestHubError(f"no sample of {source} matches {' and '.join([*where, *(['--ids'] if ids else [])])}")
    return chosen


def download(ids, repo_id=REPO_ID, cache_dir=None, revision=None, folders=("st", "wsis", "metadata")) -> Path:
    """The snapshot folder (in the HuggingFace cache) holding the ``folders`` files of ``ids``."""
    from huggingface_hub import snapshot_download

    patterns = [f"{folder}/{FILES[folder].format(id=i)}" for i in ids for folder in folders]
    return Path(_hub_call(snapshot_download, repo_id, allow_patterns=patterns, cache_dir=cache_dir, revision=revision))


def materialise(
    snapshot: Path, chosen: pd.DataFrame, out: Path, folders, overwrite: bool = False
) -> tuple[Path, list]:
    """``out/<folder>/<file>`` linked from the snapshot and ``out/samples.csv``; returns the sheet and warnings."""
    out = Path(out)
    if (out / "samples.csv").exists() and not overwrite:
        raise HestHubError(f"--out {out} already holds samples.csv; choose another folder or pass --overwrite")
    warnings, rows = [], []
    if overwrite:  # the links of an earlier selection go; files that are not links stay
        for folder in FILES:
            for link in (out / folder).glob("*") if (out / folder).is_dir() else []:
                if link.is_symlink():
                    link.unlink()
    for _, sample in chosen.iterrows():
        sid = sample["id"]
        present = {f: snapshot / f / FILES[f].format(id=sid) for f in folders}
        present = {f: p for f, p in present.items() if p.exists()}
        if "st" not in present or not ({"wsis", "patches"} & set(present)):
            raise HestHubError(
                f"{snapshot}: sample {sid} lacks st/{sid}.h5ad or both its wsis/{sid}.tif and patches/{sid}.h5 "
                f"(found {', '.join(sorted(present)) or 'nothing'}); is the id in this revision of the dataset?"
            )
        for folder, source in present.items():
            _link(source, out / folder / source.name)
        patient = str(sample.get("patient", "")).strip()
        if not patient:
            warnings.append(f"sample {sid}: no patient in the metadata; its group_id is its own id")
        rows.append({"sample_id": sid, "group_id": patient or sid, "path": "."})
    if "dataset_title" in chosen.columns:
        titles = chosen.groupby(chosen["patient"] if "patient" in chosen.columns else chosen["id"])["dataset_title"]
        for patient, n in titles.nunique().items():
            if patient and n > 1:
                warnings.append(
                    f"patient {patient!r} appears in {n} datasets: their samples share one group (never a leak); "
                    "edit samples.csv if they are different people"
                )
    tmp = out / ".samples.csv.tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, out / "samples.csv")
    return out / "samples.csv", warnings


def _link(source: Path, target: Path) -> None:
    """``target`` -> the cached file (a symbolic link to the resolved blob; a copy where links fail). A file
    that is not a link is never replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_symlink():
        raise HestHubError(f"{target} exists and is not a link into the HuggingFace cache; move it away first")
    if target.is_symlink():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, target)
