"""Group-aware splits: no leakage, close fractions, deterministic, independent of row order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from expreg.data.metadata import MetadataError, read_metadata
from expreg.data.splits import assign_splits, make_fold_table, make_split_table, read_split_file, write_table
from expreg.splits import main


def _run(csv, out, *extra) -> int:
    return main(["--metadata_csv", str(csv), "--out_csv", str(out), *map(str, extra)])


def test_split_has_no_leakage_and_close_fractions(make_dataset, tmp_path, capsys):
    csv = make_dataset(num_groups=12, samples_per_group=10)
    out = tmp_path / "s.csv"
    assert _run(csv, out, "--val_frac", 0.2, "--test_frac", 0.2) == 0
    table = pd.read_csv(out)
    assert table.groupby("group_id")["split"].nunique().max() == 1
    assert set(table["split"]) == {"train", "validation", "test"}
    fractions = table["split"].value_counts(normalize=True)
    assert abs(fractions["validation"] - 0.2) < 0.05 and abs(fractions["test"] - 0.2) < 0.05
    printed = capsys.readouterr().out
    assert "off by" in printed and "validation" in printed  # says how close it came


def test_split_file_is_byte_identical_whatever_the_row_order(dataset_csv, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _run(dataset_csv, a, "--seed", 3) == 0
    frame = pd.read_csv(dataset_csv, dtype=str, keep_default_na=False)
    frame.sample(frac=1.0, random_state=1).to_csv(dataset_csv, index=False)
    assert _run(dataset_csv, b, "--seed", 3) == 0
    assert a.read_bytes() == b.read_bytes()


def test_seed_changes_the_assignment():
    groups = np.array([f"g{i:02d}" for i in range(20)], dtype=object)
    sizes = np.full(20, 10)
    splits = [assign_splits(groups, sizes, {"train": 0.8, "validation": 0.2}, seed) for seed in range(4)]
    assert len({tuple(sorted(s.items())) for s in splits}) > 1
    for s in splits:  # equal groups: the requested fraction is reachable exactly
        assert sum(v == "validation" for v in s.values()) == 4


def test_the_split_command_uses_its_seed(make_dataset, tmp_path):
    """Through ``expreg.splits``: the file is the seed's ``assign_splits``, other seeds give other splits."""
    csv = make_dataset(num_groups=10, samples_per_group=4)
    sizes = pd.read_csv(csv)["group_id"].value_counts().sort_index()
    groups = np.array(sizes.index, dtype=object)
    fractions = {"train": 0.6, "validation": 0.2, "test": 0.2}
    made = {}
    for seed in (0, 1, 2, 3, 0):
        out = tmp_path / f"seed{seed}.csv"
        assert _run(csv, out, "--seed", seed, "--val_frac", 0.2, "--test_frac", 0.2, "--overwrite") == 0
        by_group = pd.read_csv(out).groupby("group_id")["split"].first().to_dict()
        assert by_group == assign_splits(groups, sizes.to_numpy(), fractions, seed)  # this seed's split
        assert made.setdefault(seed, by_group) == by_group  # the same seed: the same split
    assert len({tuple(sorted(v.items())) for v in made.values()}) >= 3  # other seeds: other splits


def test_uneven_groups_come_as_close_as_whole_groups_allow():
    groups = np.array(["a", "b", "c", "d"], dtype=object)
    sizes = np.array([50, 30, 15, 5])
    s = assign_splits(groups, sizes, {"train": 0.8, "validation": 0.2}, seed=0)
    val = sum(size for g, size in zip(groups, sizes) if s[g] == "validation")
    assert val == 20  # 15 + 5: the only exact solution


def test_too_few_groups(make_dataset, tmp_path, capsys):
    csv = make_dataset(num_groups=2)
    assert _run(csv, tmp_path / "s.csv", "--test_frac", 0.2) != 0
    assert "too few groups" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(MetadataError, match="too few groups for 3 folds"):
        make_fold_table(read_metadata(csv), n_folds=3)


def test_group_kfold_and_leave_one_group_out(make_dataset):
    md = read_metadata(make_dataset(num_groups=7, samples_per_group=10))
    table, summary = make_fold_table(md, n_folds=3, seed=0)
    assert table.groupby("group_id")["fold"].nunique().max() == 1
    counts = table["fold"].value_counts()
    assert set(counts.index) == {0, 1, 2} and counts.max() - counts.min() <= 12
    logo, _ = make_fold_table(md, n_folds=7, seed=0)
    assert logo.groupby("fold")["group_id"].nunique().eq(1).all() and logo["fold"].nunique() == 7


def test_existing_output_is_not_overwritten(dataset_csv, tmp_path, capsys):
    out = tmp_path / "s.csv"
    out.write_text("keep me")
    assert _run(dataset_csv, out) != 0
    assert out.read_text() == "keep me"
    assert _run(dataset_csv, out, "--overwrite") == 0


@pytest.fixture
def split_and_metadata(dataset_csv, tmp_path):
    md = read_metadata(dataset_csv)
    table, _ = make_split_table(md, val_frac=0.2, seed=0)
    return md, table, tmp_path / "split.csv"


def _write(table, path):
    table.to_csv(path, index=False)
    return path


def test_read_split_file_accepts_a_matching_file(split_and_metadata):
    md, table, path = split_and_metadata
    write_table(table, path)
    read = read_split_file(path, md)
    assert read["path"].tolist() == md.frame["path"].tolist()  # metadata order


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop(index=3), "row not assigned by the split file"),
        (lambda t: pd.concat([t, t.iloc[[0]]]), "path assigned more than once"),
        (lambda t: t.assign(path=t["path"].where(t.index != 2, "other.png")), "path not in the metadata"),
        (lambda t: t.assign(group_id=t["group_id"].where(t.index != 1, "P99")), "group differs from the metadata"),
        (lambda t: t.assign(split=t["split"].where(t.index != 0, "valid")), "is not train, validation or test"),
        (lambda t: t.drop(columns=["split"]), "missing column(s) split or fold"),
    ],
)
def test_read_split_file_rejects_mismatches(split_and_metadata, edit, message):
    md, table, path = split_and_metadata
    with pytest.raises(MetadataError, match="split.csv") as info:
        read_split_file(_write(edit(table), path), md)
    assert message in str(info.value)


def test_read_split_file_detects_leakage(split_and_metadata):
    md, table, path = split_and_metadata
    first_group = table["group_id"].iloc[0]
    rows = table.index[table["group_id"] == first_group]
    table.loc[rows[0], "split"] = "validation" if table.loc[rows[1], "split"] == "train" else "train"
    with pytest.raises(MetadataError, match=f"group\\(s\\) {first_group} appear in more than one split"):
        read_split_file(_write(table, path), md)
