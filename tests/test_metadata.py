"""The data contract: every validation error names file, lines and column, and writes nothing."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from expreg.config import ConfigError
from expreg.data.metadata import MetadataError, read_metadata
from expreg.splits import main as splits_main


def _rewrite(csv, edit):
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame = edit(frame)
    frame.to_csv(csv, index=False)
    return csv


def _error(csv, **kwargs) -> str:
    with pytest.raises(MetadataError) as info:
        read_metadata(csv, **kwargs)
    message = str(info.value)
    assert str(csv.resolve()) in message or csv.name in message
    return message


def test_valid_csv_reads_with_gene_names_and_extra_columns(dataset_csv):
    md = read_metadata(dataset_csv)
    assert md.num_genes == 50
    assert md.gene_names[:2] == ["GENE00", "GENE01"]  # from genes.txt beside the CSV
    assert md.extra_columns == ["sample_id"]
    assert md.targets().dtype.name == "float32" and md.targets().shape == (len(md.frame), 50)
    assert all(p.startswith(str(dataset_csv.parent)) for p in md.image_paths())


def test_without_gene_file_names_are_column_names(dataset_csv):
    (dataset_csv.parent / "genes.txt").unlink()
    assert read_metadata(dataset_csv).gene_names[:3] == ["y0", "y1", "y2"]


def test_missing_required_column(dataset_csv):
    _rewrite(dataset_csv, lambda f: f.drop(columns=["group_id"]))
    assert "missing required column(s) group_id" in _error(dataset_csv)


def test_no_target_columns(dataset_csv):
    _rewrite(dataset_csv, lambda f: f[["path", "group_id"]])
    assert "no target columns" in _error(dataset_csv)


def test_gap_in_target_columns(dataset_csv):
    _rewrite(dataset_csv, lambda f: f.drop(columns=["y7"]))
    assert "y7 missing" in _error(dataset_csv)


def test_wrong_k(dataset_csv):
    assert "K=50" in _error(dataset_csv, num_genes=20)


def _set(frame, rows, col, value):
    frame.loc[rows, col] = value
    return frame


@pytest.mark.parametrize(
    ("value", "expected"),
    [("abc", "not a number"), ("", "not a number"), ("nan", "NaN or infinite"), ("inf", "NaN or infinite")],
)
def test_bad_target_values_name_lines_and_column(dataset_csv, value, expected):
    _rewrite(dataset_csv, lambda f: _set(f, [2, 5], "y3", value))
    message = _error(dataset_csv)
    assert "column 'y3'" in message and "lines 4, 7" in message and expected in message


def test_many_bad_rows_are_counted(dataset_csv):
    _rewrite(dataset_csv, lambda f: _set(f, list(range(12)), "y0", "x"))
    assert "(and 7 more; 12 rows in all)" in _error(dataset_csv)


def test_empty_group_id(dataset_csv):
    _rewrite(dataset_csv, lambda f: _set(f, [3], "group_id", " "))
    message = _error(dataset_csv)
    assert "column 'group_id', line 5: empty group_id" in message


def test_duplicate_path(dataset_csv):
    _rewrite(dataset_csv, lambda f: _set(f, [1], "path", f.loc[0, "path"]))
    message = _error(dataset_csv)
    assert "column 'path', lines 2, 3: duplicate image: lines 2 and 3 name the same file" in message


@pytest.mark.parametrize("spelling", ["./{p}", "{p_dir}//{p_name}", "{p_dir}/../{p_dir}/{p_name}", "{abs}"])
def test_the_same_image_under_two_spellings_is_a_duplicate(dataset_csv, spelling):
    frame = pd.read_csv(dataset_csv, dtype=str, keep_default_na=False)
    first, group = frame.loc[0, "path"], frame.loc[0, "group_id"]
    p_dir, p_name = first.rsplit("/", 1)
    other = next(i for i in range(len(frame)) if frame.loc[i, "group_id"] != group)
    written = spelling.format(p=first, p_dir=p_dir, p_name=p_name, abs=str(dataset_csv.parent.resolve() / first))
    _rewrite(dataset_csv, lambda f: _set(f, [other], "path", written))
    message = _error(dataset_csv)
    # the image of line 2 sits in a second group under another spelling: both lines and spellings named
    assert f"lines 2 and {other + 2} name the same file" in message
    assert repr(first) in message and repr(written) in message
    assert repr(group) in message and repr(frame.loc[other, "group_id"]) in message


def test_missing_image(dataset_csv):
    frame = pd.read_csv(dataset_csv)
    (dataset_csv.parent / frame.loc[4, "path"]).unlink()
    message = _error(dataset_csv)
    assert "column 'path', line 6: image file not found" in message
    read_metadata(dataset_csv, check_images="none")  # explicitly switched off


def test_unreadable_image_only_with_decode_check(dataset_csv):
    frame = pd.read_csv(dataset_csv)
    (dataset_csv.parent / frame.loc[0, "path"]).write_bytes(b"not an image")
    read_metadata(dataset_csv)  # the cheap check only looks for the file
    assert "column 'path', line 2: unreadable image" in _error(dataset_csv, check_images="decode")


def test_empty_file_and_header_only(dataset_csv):
    header = dataset_csv.read_text().splitlines()[0]
    dataset_csv.write_text("")
    assert "the file is empty" in _error(dataset_csv)
    dataset_csv.write_text(header + "\n")
    assert "no data rows" in _error(dataset_csv)


def test_semicolon_separated(dataset_csv):
    dataset_csv.write_text(dataset_csv.read_text().replace(",", ";"))
    assert "semicolon-separated" in _error(dataset_csv)


def test_not_utf8(dataset_csv):
    dataset_csv.write_bytes(dataset_csv.read_bytes().replace(b"P00_s1", b"P00_\xe9", 1))
    assert "not valid UTF-8" in _error(dataset_csv)


def test_bom_and_windows_line_endings_are_accepted(dataset_csv):
    text = dataset_csv.read_text()
    dataset_csv.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    md = read_metadata(dataset_csv)
    assert list(md.frame.columns[:2]) == ["path", "group_id"] and md.num_genes == 50


def test_gene_names_file_count_and_duplicates(dataset_csv):
    genes = dataset_csv.parent / "genes.txt"
    genes.write_text("A\nB\n")
    with pytest.raises(MetadataError, match=re.escape(f"{genes}: 2 gene names for K=50")):
        read_metadata(dataset_csv)
    genes.write_text("\n".join(["G"] * 50))
    with pytest.raises(MetadataError, match="'G' appears twice"):
        read_metadata(dataset_csv)


def test_cli_exits_nonzero_and_writes_nothing(dataset_csv, tmp_path, capsys):
    _rewrite(dataset_csv, lambda f: _set(f, [0], "y1", "oops"))
    out = tmp_path / "split.csv"
    code = splits_main(["--metadata_csv", str(dataset_csv), "--out_csv", str(out)])
    assert code != 0 and not out.exists()
    err = capsys.readouterr().err
    assert "column 'y1', line 2" in err and str(dataset_csv.name) in err


def test_reserved_and_odd_column_names(dataset_csv):
    _rewrite(dataset_csv, lambda f: f.rename(columns={"sample_id": "image"}))
    assert "column(s) image: reserved names" in _error(dataset_csv)
    _rewrite(dataset_csv, lambda f: f.rename(columns={"image": "sample_id", "y1": "y01"}))
    assert "y01: write target columns as y0, y1, ... without leading zeros" in _error(dataset_csv)
    text = dataset_csv.read_text().splitlines()
    text[0] = text[0].replace("y01", "y0")
    dataset_csv.write_text("\n".join(text) + "\n")
    assert "duplicate column name(s) in the header: y0" in _error(dataset_csv)


def test_prediction_tables_need_only_paths(dataset_csv):
    _rewrite(dataset_csv, lambda f: f[["path"]])
    md = read_metadata(dataset_csv, for_prediction=True)
    assert md.target_columns == [] and len(md.frame) > 0
    with pytest.raises(MetadataError, match="missing required column"):
        read_metadata(dataset_csv)


def test_arrow_and_pandas_readers_give_the_same_table(dataset_csv, monkeypatch):
    """The fast Arrow reader equals pandas' ``dtype=str`` reading on quoted commas and newlines, empty
    cells, spaces around names and values, a BOM and CRLF; a file Arrow refuses (a ragged row) is read by
    pandas, whose error names the line."""
    from expreg.data import metadata

    frame = pd.read_csv(dataset_csv, dtype=str, keep_default_na=False)
    frame.insert(2, " note ", "")
    frame.loc[0, " note "] = 'a, "quoted"\nline'
    frame.loc[1, "y3"] = " 1.5 "
    text = frame.to_csv(index=False).replace("\n", "\r\n")
    dataset_csv.write_bytes(b"\xef\xbb\xbf" + text.encode())
    fast = read_metadata(dataset_csv).frame
    monkeypatch.setattr(metadata, "_read_with_arrow", lambda *a: None)
    slow = read_metadata(dataset_csv).frame
    # the fast frame's columns are views of the memory-mapped table: pandas' Arrow-backed str and double
    assert isinstance(fast["path"].dtype, pd.StringDtype) and fast["y0"].dtype == "double[pyarrow]"
    plain = {c: fast[c].to_numpy(dtype=np.float64 if c.startswith("y") else object) for c in fast.columns}
    pd.testing.assert_frame_equal(pd.DataFrame(plain), slow)
    assert fast.loc[0, "note"] == 'a, "quoted"\r\nline' and fast.loc[1, "y3"] == 1.5
    monkeypatch.undo()
    lines = dataset_csv.read_text(encoding="utf-8-sig").splitlines()
    dataset_csv.write_text("\n".join([*lines[:4], lines[4] + ",extra", *lines[5:]]) + "\n")
    assert re.search(r"could not parse as CSV: .*Expected 54 fields in line \d+, saw 55", _error(dataset_csv))


def test_an_empty_header_cell_is_named_as_pandas_names_it(dataset_csv):
    text = dataset_csv.read_text().splitlines()
    dataset_csv.write_text("\n".join([text[0] + ",", *(line + ",x" for line in text[1:])]) + "\n")
    assert read_metadata(dataset_csv).frame.columns[-1] == "Unnamed: 53"  # pandas' name, not ""


def test_a_prepared_folders_csv_without_targets_says_which_keys_to_set(dataset_csv):
    """expreg.prepare writes no y columns (targets come from its counts): the error names prepare.json and the
    two keys to set; a CSV of patches without a prepare.json gets the plain contract error."""
    frame = pd.read_csv(dataset_csv, dtype=str, keep_default_na=False)
    frame[["path", "group_id"]].to_csv(dataset_csv, index=False)
    with pytest.raises(MetadataError, match=r"no target columns: expected y0, y1, \.\.\., y\{K-1\} in the header$"):
        read_metadata(dataset_csv)
    (dataset_csv.parent / "prepare.json").write_text("{}")
    with pytest.raises(MetadataError) as err:
        read_metadata(dataset_csv)
    folder = dataset_csv.parent.resolve()
    assert f"{folder / 'prepare.json'} says expreg.prepare wrote this folder" in str(err.value)
    assert f"Set data.prepared={folder} and data.genes (e.g. hvg:50)" in str(err.value)
    assert f"data.expression_file={folder / 'expression.h5ad'} beside data.metadata_csv" in str(err.value)


def test_data_prepared_sets_the_folders_keys_and_names_a_missing_folder(tmp_path):
    """``data.prepared=<out_dir>`` implies metadata_csv and expression_file (and patches for a shard store);
    a key given otherwise is refused, the genes are required, and a folder not made yet says how to make it."""
    from expreg.config import load_recipe
    from expreg.data.metadata import read_recipe_metadata

    folder = tmp_path / "visium"
    cfg = load_recipe(None, [f"data.prepared={folder}", "data.genes=hvg:50"]).data
    assert (cfg.metadata_csv, cfg.expression_file, cfg.patches) == (
        str(folder / "metadata.csv"),
        str(folder / "expression.h5ad"),
        None,
    )
    with pytest.raises(
        MetadataError, match=r"data.prepared=.*visium does not exist; make it with python -m expreg.prepare"
    ):
        read_recipe_metadata(cfg)
    folder.mkdir()
    with pytest.raises(MetadataError, match=r"has no prepare.json \(expreg.prepare writes it when it ends\)"):
        read_recipe_metadata(cfg)
    (folder / "prepare.json").write_text('{"store": {"kind": "shards"}}')
    assert load_recipe(None, [f"data.prepared={folder}", "data.genes=hvg:50"]).data.patches == str(folder / "patches")
    with pytest.raises(ConfigError, match=r"sets data.metadata_csv=.*, but data.metadata_csv=other.csv was given"):
        load_recipe(None, [f"data.prepared={folder}", "data.genes=hvg:50", "data.metadata_csv=other.csv"])
    with pytest.raises(ConfigError, match=r"needs data.genes: the targets are computed from its raw counts"):
        load_recipe(None, [f"data.prepared={folder}"])
    # a run's saved config (the implied keys written out beside data.prepared) loads again
    again = load_recipe(
        None, [f"data.prepared={folder}", "data.genes=hvg:50", f"data.metadata_csv={folder}/metadata.csv"]
    )
    assert again.data.metadata_csv == str(folder / "metadata.csv")


def test_a_run_on_a_prepared_folder_resumes_with_its_recipe_from_another_directory(tmp_path, monkeypatch):
    """The run saves data.prepared and the keys it implies as absolute paths (a shard store's too); its recipe,
    with the folder relative, is the same run for ``--resume``, from the working directory it was given in."""
    import yaml

    from expreg.config import load_recipe
    from expreg.run_dir import CONFIG_FILE, TRAINER_STATE_FILE
    from expreg.training.checkpoint import resume_config

    folder = tmp_path / "data" / "visium"
    folder.mkdir(parents=True)
    (folder / "prepare.json").write_text('{"store": {"kind": "shards"}}')
    monkeypatch.chdir(tmp_path)
    recipe = ["data.prepared=data/visium", "data.genes=hvg:50"]
    saved = load_recipe(None, recipe)
    saved.data.prepared = str(folder)  # what setup_data writes: every path resolved
    saved.data.metadata_csv, saved.data.patches = str(folder / "metadata.csv"), str(folder / "patches")
    saved.data.expression_file = str(folder / "expression.h5ad")
    last = tmp_path / "results" / "run" / "checkpoints" / "last"
    last.mkdir(parents=True)
    (last / TRAINER_STATE_FILE).write_text("{}")
    (last.parent.parent / CONFIG_FILE).write_text(yaml.safe_dump(saved.to_dict()))
    assert load_recipe(None, recipe).data.patches == "data/visium/patches"  # relative, as given
    resumed = resume_config(last, load_recipe(None, recipe), [])
    assert resumed.data.prepared == str(folder) and resumed.data.patches == str(folder / "patches")
    with pytest.raises(ConfigError, match=r"the recipe differs from the run's config_resolved.yaml: data.image_size"):
        resume_config(last, load_recipe(None, [*recipe, "data.image_size=64"]), [])
