"""Ingestion readers: h5ad read/write through anndata, and every section layout and bad input on small synthetic folders.

Each test builds its own folder (a few dozen spots, 25 genes): the 10x HDF5 written with h5py as
Space Ranger writes it, MEX files with gzip + ``scipy.io.mmwrite``, positions with and without a
header, scale factors, a HEST-1k sample with an h5ad written by ``write_h5ad``. The last tests read
the real section C2 from ``shared/data/her2st_st`` (skipped when absent).
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from expreg.data.h5ad import H5adError, read_h5ad, write_h5ad
from expreg.ingest.errors import IngestError
from expreg.ingest.readers import detect_layout, make_unique, read_section

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/her2st_st"
N_MATRIX, N_GENES = 32, 25
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


# ------------------------------------------------------------------------------ synthetic folders


def _truth(seed=0):
    """Matrix barcodes (shuffled), counts, genes and positions: 30 spots kept; one of each drop reason."""
    rng = np.random.default_rng(seed)
    barcodes = np.array(["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(N_MATRIX + 6)], dtype=object)
    counts = sp.random(N_MATRIX, N_GENES, density=0.3, format="csr", random_state=seed, dtype=np.float64)
    counts.data = np.ceil(counts.data * 20)
    counts = counts.astype(np.int32)
    genes = [f"GENE{i}" for i in range(N_GENES)]
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    rows = []
    for k, barcode in enumerate(barcodes):
        if k == N_MATRIX - 1:
            continue  # in the matrix, no position
        in_tissue = 0 if k == N_MATRIX - 2 or k >= N_MATRIX + 2 else 1  # k = 32, 33: in positions, not in the matrix
        rows.append((barcode, in_tissue, k // 8, k % 8, 200 + 7 * k, 1000 + 31 * k))  # y, x
    positions = [rows[i] for i in rng.permutation(len(rows))]
    return barcodes[:N_MATRIX], counts, genes, ids, positions


def _write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes, genes, ids) -> None:
    """Space Ranger's layout: CSC features x barcodes == the CSR spots x genes' arrays."""
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([b"S1"])
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        g.create_dataset("data", data=counts.data.astype(np.int32), compression="gzip")
        g.create_dataset("indices", data=counts.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        feats = g.create_group("features")
        feats.create_dataset("id", data=np.array([i.encode() for i in ids]))
        feats.create_dataset("name", data=np.array([n.encode() for n in genes]))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(ids)))
        feats.create_dataset("genome", data=np.array([b"GRCh38"] * len(ids)))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def _write_mex(folder: Path, counts: sp.csr_matrix, barcodes, genes, ids) -> None:
    folder.mkdir(parents=True)
    (folder / "barcodes.tsv.gz").write_bytes(gzip.compress("".join(f"{b}\n" for b in barcodes).encode()))
    lines = "".join(f"{i}\t{n}\tGene Expression\n" for i, n in zip(ids, genes))
    (folder / "features.tsv.gz").write_bytes(gzip.compress(lines.encode()))
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, sp.coo_matrix(counts.T), field="integer", symmetry="general")
    (folder / "matrix.mtx.gz").write_bytes(gzip.compress(buffer.getvalue()))


def _write_image(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 180)).save(path)


def make_spaceranger(root: Path, counts_format="h5", positions_format="v2", seed=0, truth=None) -> Path:
    """``root/S1/outs`` (+ ``root/S1/S1_fullres.jpg``); returns ``root/S1``."""
    barcodes, counts, genes, ids, positions = truth or _truth(seed)
    outs = root / "S1" / "outs"
    (outs / "spatial").mkdir(parents=True)
    if counts_format == "h5":
        _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, genes, ids)
    else:
        _write_mex(outs / "filtered_feature_bc_matrix", counts, barcodes, genes, ids)
    lines = [",".join(map(str, row)) for row in positions]
    if positions_format == "v2":
        (outs / "spatial" / "tissue_positions.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    else:
        (outs / "spatial" / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    scalefactors = {"spot_diameter_fullres": 80.5, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    _write_image(outs / "spatial" / "tissue_hires_image.png")
    _write_image(root / "S1" / "S1_fullres.jpg")
    _write_image(root / "S1" / "tissue_lowres_image.png")  # a copied tissue_*_image is never the full-res image
    return root / "S1"


def make_hest(root: Path, wsi=True, patches=False, metadata=True, in_tissue=True) -> Path:
    barcodes, counts, genes, _, positions = _truth()
    table = {row[0]: row for row in positions}
    keep = [k for k, b in enumerate(barcodes) if b in table]  # 31: one is not under tissue
    obs = pd.DataFrame(index=pd.Index([str(barcodes[k]) for k in keep]))
    if in_tissue:
        obs["in_tissue"] = np.array([table[barcodes[k]][1] for k in keep], dtype=np.int64)
    xy = {b: (row[5], row[4]) for b, row in table.items()}
    spatial = np.array([xy[barcodes[k]] for k in keep], dtype=np.float64)
    (root / "st").mkdir(parents=True)
    write_h5ad(root / "st" / "S1.h5ad", counts[keep].astype(np.float32), obs, genes, obsm={"spatial": spatial})
    if wsi:
        _write_image(root / "wsis" / "S1.tif")
    if patches:
        (root / "patches").mkdir()
        with h5py.File(root / "patches" / "S1.h5", "w") as f:
            f.create_dataset("img", data=np.zeros((2, 4, 4, 3), np.uint8))
    if metadata:
        (root / "metadata").mkdir()
        meta = {"id": "S1", "pixel_size_um_estimated": 0.5, "spot_diameter": 55.0, "inter_spot_dist": 100.0}
        (root / "metadata" / "S1.json").write_text(json.dumps(meta))
    return root


def _expected():
    barcodes, counts, genes, ids, positions = _truth()
    table = {row[0]: row for row in positions}
    keep = [k for k, b in enumerate(barcodes) if b in table and table[b][1] == 1]
    x = np.array([table[barcodes[k]][5] for k in keep], dtype=np.float64)
    y = np.array([table[barcodes[k]][4] for k in keep], dtype=np.float64)
    return barcodes[keep], counts[keep], genes, ids, x, y


def _truncate(path: Path, fraction=0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ------------------------------------------------------------------------------------------- h5ad


def _obs(n=5):
    return pd.DataFrame(
        {
            "in_tissue": np.arange(n, dtype=np.int64) % 2,
            "score": np.linspace(0, 1, n),
            "flag": np.arange(n) % 2 == 0,
            "name": [f"s{i}" for i in range(n)],
            "kind": pd.Categorical(["a", "b", "a", "c", "b"][:n]),
            "gap": ["x", None, "y", "x", None][:n],
        },
        index=[f"AC{i}-1" for i in range(n)],
    )


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_h5ad_round_trip(tmp_path, dtype):
    X = sp.random(5, 7, density=0.4, format="csr", random_state=1, dtype=np.float64)
    X.data = np.ceil(X.data * 9)
    X = X.astype(dtype)
    obsm = {"spatial": np.arange(10, dtype=np.float64).reshape(5, 2)}
    uns = {"note": "raw counts", "patch_um": 112.0, "n": 3, "ok": True, "genes": ["A", "B"], "d": {"k": [1, 2]}}
    write_h5ad(tmp_path / "a.h5ad", X, _obs(), [f"G{i}" for i in range(7)], obsm=obsm, uns=uns)
    back = read_h5ad(tmp_path / "a.h5ad")
    assert back.X.dtype == dtype and back.X.format == "csr" and (back.X != X).nnz == 0
    assert list(back.var_names) == [f"G{i}" for i in range(7)]
    assert list(back.obs.index) == list(_obs().index)
    pd.testing.assert_frame_equal(
        back.obs.drop(columns="gap"), _obs().drop(columns="gap"), check_dtype=False, check_categorical=False
    )
    assert back.obs["gap"].isna().tolist() == [False, True, False, False, True]
    assert back.obs["in_tissue"].dtype == np.int64 and back.obs["flag"].dtype == bool
    np.testing.assert_array_equal(back.obsm["spatial"], obsm["spatial"])
    assert {k: back.uns[k] for k in ("note", "patch_um", "n", "ok")} == {
        k: uns[k] for k in ("note", "patch_um", "n", "ok")
    }
    assert list(back.uns["genes"]) == ["A", "B"] and list(back.uns["d"]["k"]) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad"]  # no temporary file left behind


def test_h5ad_is_anndatas_own(tmp_path):
    """What expreg writes anndata reads as its own, and what anndata writes (dense, CSR, CSC X) expreg reads."""
    import anndata

    write_h5ad(tmp_path / "a.h5ad", sp.csr_matrix(np.eye(5, 3, dtype=np.float32)), _obs(), list("abc"))
    theirs = anndata.read_h5ad(tmp_path / "a.h5ad")
    assert theirs.shape == (5, 3) and list(theirs.obs_names) == list(_obs().index)
    assert np.array_equal(theirs.X.toarray(), np.eye(5, 3))
    dense = np.arange(12, dtype=np.float32).reshape(3, 4)
    for name, X in (("dense", dense), ("csr", sp.csr_matrix(dense)), ("csc", sp.csc_matrix(dense))):
        anndata.AnnData(X=X, obs=pd.DataFrame(index=list("abc")), var=pd.DataFrame(index=list("wxyz"))).write_h5ad(
            tmp_path / f"{name}.h5ad"
        )
        back = read_h5ad(tmp_path / f"{name}.h5ad")
        assert back.X.format == "csr" and np.array_equal(back.X.toarray(), dense), name
        assert read_h5ad(tmp_path / f"{name}.h5ad", backed=True).X[1:3].shape == (2, 4), name


def test_files_of_older_expreg_versions_read_the_same():
    """tests/data/old_expreg_writer.h5ad was written by the h5py-only writer of expreg <= a63662f."""
    back = read_h5ad(Path(__file__).parent / "data" / "old_expreg_writer.h5ad")
    assert np.array_equal(back.X.toarray(), [[0, 3, 0, 1], [2, 0, 0, 0], [0, 0, 5, 7]])
    assert list(back.var_names) == ["A", "B", "C", "C-1"] and list(back.var["gene_ids"])[-1] == "ENSG04"
    assert list(back.obs.index) == ["S1:AAA-1", "S1:CCC-1", "S2:GGG-1"]
    assert back.obs["group_id"].astype(str).tolist() == ["P1", "P1", "P2"] and back.obs["gap"].isna().tolist()[1]
    assert back.obs["in_tissue"].tolist() == [1, 1, 0] and back.obs["x_px"].tolist() == [10.5, 20.5, 30.5]
    assert (
        list(back.uns["genes_not_measured"]["S2"]) == ["C", "C-1"] and len(back.uns["genes_not_measured"]["S1"]) == 0
    )
    assert back.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"] == 0.25
    np.testing.assert_array_equal(back.obsm["spatial"][:, 0], [10.5, 20.5, 30.5])


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/data/her2st_st absent")
def test_rewritten_c2_reads_back_as_the_real_file(tmp_path):
    real = REAL / "hest" / "st" / "C2.h5ad"
    data = read_h5ad(real)
    write_h5ad(tmp_path / "C2.h5ad", data.X, data.obs, data.var_names, obsm=dict(data.obsm), uns=data.uns)
    back = read_h5ad(tmp_path / "C2.h5ad")
    assert (back.X != data.X).nnz == 0 and list(back.var_names) == list(data.var_names)
    pd.testing.assert_frame_equal(back.obs, data.obs)
    np.testing.assert_array_equal(back.obsm["spatial"], data.obsm["spatial"])
    assert back.uns.keys() == data.uns.keys()


def test_h5ad_errors_name_the_file(tmp_path):
    with pytest.raises(H5adError, match="missing.h5ad: no such file"):
        read_h5ad(tmp_path / "missing.h5ad")
    write_h5ad(tmp_path / "a.h5ad", np.eye(4, dtype=np.float32), pd.DataFrame(index=list("abcd")), list("wxyz"))
    with h5py.File(tmp_path / "a.h5ad", "a") as f:
        del f["X"]
    with pytest.raises(H5adError, match=r"a.h5ad: no 'X'"):
        read_h5ad(tmp_path / "a.h5ad")
    write_h5ad(tmp_path / "b.h5ad", sp.random(50, 40, 0.5, format="csr"), pd.DataFrame(index=range(50)), range(40))
    _truncate(tmp_path / "b.h5ad")
    with pytest.raises(H5adError, match=r"b.h5ad: unreadable .h5ad"):
        read_h5ad(tmp_path / "b.h5ad")
    (tmp_path / "c.h5ad").write_text("not hdf5")
    with pytest.raises(H5adError, match=r"c.h5ad: unreadable"):
        read_h5ad(tmp_path / "c.h5ad")


# ----------------------------------------------------------------------------------- Space Ranger


def _check_section(section, layout, x_scale=1.0):
    barcodes, counts, genes, ids, x, y = _expected()
    assert section.layout == layout and section.sample_id == "S1"
    assert list(section.barcodes) == list(barcodes)
    assert (section.counts != counts).nnz == 0 and section.counts.format == "csr"
    assert section.gene_names == genes
    np.testing.assert_allclose(section.x_px, x)  # pxl_col_in_fullres
    np.testing.assert_allclose(section.y_px, y)  # pxl_row_in_fullres
    assert section.x_px.dtype == np.float64


@pytest.mark.parametrize("counts_format,positions_format", [("h5", "v2"), ("h5", "v1"), ("mex", "v2"), ("mex", "v1")])
def test_space_ranger_layouts(tmp_path, counts_format, positions_format):
    folder = make_spaceranger(tmp_path, counts_format, positions_format)
    layout = "spaceranger" if positions_format == "v2" else "spaceranger_v1"
    for path in (folder, folder / "outs"):
        assert detect_layout(path, "S1") == layout
        section = read_section(path, "S1")
        _check_section(section, layout)
        assert section.gene_ids == _truth()[3]
        assert section.dropped == {
            "not under tissue": 1,
            "in positions, not in the matrix": 2,
            "in the matrix, no position": 1,
        }
        assert section.image == str(folder / "S1_fullres.jpg")
        assert section.hires_image == str(folder / "outs" / "spatial" / "tissue_hires_image.png")
        assert section.scalefactors["spot_diameter_fullres"] == 80.5
        assert section.um_per_px is None and section.patches_h5 is None and section.warnings == []
    assert section.counts.dtype.kind == "i"


def test_image_argument_and_ambiguous_or_missing_images(tmp_path):
    folder = make_spaceranger(tmp_path)
    other = tmp_path / "elsewhere.png"
    _write_image(other)
    assert read_section(folder, "S1", image=other).image == str(other)
    _write_image(folder / "S1_other.tif")
    section = read_section(folder, "S1")
    assert section.image is None and "2 candidate images" in section.warnings[0]
    assert "S1_fullres.jpg" in section.warnings[0] and "tissue_lowres" not in section.warnings[0]
    assert read_section(folder, "S1", image=other).warnings == []
    (folder / "S1_other.tif").unlink()
    (folder / "S1_fullres.jpg").unlink()
    section = read_section(folder, "S1")
    assert section.image is None and section.warnings[0].startswith("image: no full-resolution image")
    with pytest.raises(IngestError, match="nope.jpg: no such image file"):
        read_section(folder, "S1", image=tmp_path / "nope.jpg")


def test_repeated_gene_names_made_unique(tmp_path):
    barcodes, counts, genes, ids, positions = _truth()
    genes = ["A", "A", "A-1", *genes[3:-1], "A"]
    section = read_section(make_spaceranger(tmp_path, truth=(barcodes, counts, genes, ids, positions)), "S1")
    assert section.gene_names[:3] == ["A", "A-2", "A-1"] and section.gene_names[-1] == "A-3"
    assert len(set(section.gene_names)) == N_GENES and section.gene_ids == ids
    assert len(section.warnings) == 1 and "repeated" in section.warnings[0] and "A" in section.warnings[0]


def test_make_unique_like_anndata():
    assert make_unique(["A", "B", "A", "A-1", "A"]) == (["A", "B", "A-2", "A-1", "A-3"], ["A"])
    assert make_unique(["x", "y"]) == (["x", "y"], [])


# ---------------------------------------------------------------------------------- HEST and h5ad


def test_hest_layout(tmp_path):
    root = make_hest(tmp_path / "hest")
    assert detect_layout(root, "S1") == "hest"
    section = read_section(root, "S1")
    barcodes, counts, _, _, x, y = _expected()
    assert section.layout == "hest" and section.counts.dtype == np.float32
    assert list(section.barcodes) == list(barcodes)
    assert (section.counts != counts).nnz == 0
    np.testing.assert_allclose(section.x_px, x)
    np.testing.assert_allclose(section.y_px, y)
    assert section.dropped == {"not under tissue": 1}
    assert section.image == str(root / "wsis" / "S1.tif") and section.patches_h5 is None
    assert section.um_per_px == 0.5 and section.um_per_px_source == "HEST metadata pixel_size_um_estimated"
    assert section.spot_diameter_um == 55.0 and section.warnings == []
    assert detect_layout(root / "st" / "S1.h5ad", "S1") == "hest"
    assert read_section(root / "st" / "S1.h5ad", "S1").image == section.image


def test_hest_patches_without_wsi_and_no_metadata(tmp_path):
    root = make_hest(tmp_path / "hest", wsi=False, patches=True, metadata=False, in_tissue=False)
    section = read_section(root, "S1")
    assert section.image is None and section.patches_h5 == str(root / "patches" / "S1.h5")
    assert section.um_per_px is None and section.dropped == {} and len(section.barcodes) == N_MATRIX - 1
    assert "no HEST metadata" in section.warnings[0]


def test_plain_h5ad_layout(tmp_path):
    root = make_hest(tmp_path / "hest", wsi=False, metadata=False)
    path = tmp_path / "mine.h5ad"
    data = read_h5ad(root / "st" / "S1.h5ad")
    X = data.X.astype(np.float64)
    X.data = X.data / 3  # normalised, not counts
    scalefactors = {"spot_diameter_fullres": 80.5, "tissue_hires_scalef": 0.5}
    uns = {"spatial": {"lib1": {"scalefactors": scalefactors, "images": {"hires": np.zeros((120, 120, 3))}}}}
    write_h5ad(path, X.tocsc(), data.obs, data.var_names, obsm=data.obsm, uns=uns)
    assert detect_layout(path, "S1") == "h5ad"
    image = tmp_path / "he.png"
    _write_image(image)
    section = read_section(path, "S1", image=image)
    assert section.layout == "h5ad" and section.image == str(image) and len(section.barcodes) == N_MATRIX - 2
    assert len(section.warnings) == 1 and "not integers" in section.warnings[0]
    assert section.scalefactors == scalefactors  # scanpy's uns["spatial"][library]
    hires = read_h5ad(path).uns["spatial"]["lib1"]["images"]["hires"]  # read whole: nothing in uns is dropped
    assert isinstance(hires, np.ndarray) and hires.shape == (120, 120, 3)
    assert any(w.startswith("image:") for w in read_section(path, "S1").warnings)


# ------------------------------------------------------------------------------------- bad inputs


def _spaceranger_with(tmp_path, change, counts_format="h5", positions_format="v2"):
    folder = make_spaceranger(tmp_path, counts_format, positions_format)
    change(folder / "outs")
    return folder


def _rewrite_positions(text_change):
    def change(outs):
        path = outs / "spatial" / "tissue_positions.csv"
        path.write_text(text_change(path.read_text()))

    return change


def _h5_edit(edit):
    def change(outs):
        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "a") as f:
            edit(f["matrix"])

    return change


def _dup_h5_barcode(group):
    values = group["barcodes"][...]
    values[1] = values[0]
    del group["barcodes"]
    group.create_dataset("barcodes", data=values)


def _mex_edit(name, edit):
    def change(outs):
        path = outs / "filtered_feature_bc_matrix" / name
        path.write_bytes(edit(path.read_bytes()))

    return change


BAD_SPACERANGER = {
    "no positions": ("h5", lambda outs: (outs / "spatial" / "tissue_positions.csv").unlink(), "tissue_positions.csv"),
    "no counts": ("h5", lambda outs: (outs / "filtered_feature_bc_matrix.h5").unlink(), "counts are missing"),
    "duplicate position barcode": (
        "h5",
        _rewrite_positions(lambda t: t + t.splitlines()[3] + "\n"),
        r"tissue_positions.csv: 1 barcode\(s\) repeated, e.g. [ACGT]+-1",
    ),
    "duplicate matrix barcode": ("h5", _h5_edit(_dup_h5_barcode), r"filtered_feature_bc_matrix.h5: 1 barcode\(s\)"),
    "duplicate MEX barcode": (
        "mex",
        _mex_edit(
            "barcodes.tsv.gz", lambda b: gzip.compress(b"AAAA-1\nAAAA-1\n" + gzip.decompress(b).split(b"\n", 2)[2])
        ),
        r"filtered_feature_bc_matrix: 1 barcode\(s\) repeated, e.g. AAAA-1",
    ),
    "truncated h5": (
        "h5",
        lambda outs: _truncate(outs / "filtered_feature_bc_matrix.h5"),
        r"\.h5: unreadable 10x HDF5",
    ),
    "truncated mtx": (
        "mex",
        _mex_edit("matrix.mtx.gz", lambda b: b[: len(b) // 2]),
        r"matrix.mtx.gz: unreadable Matrix",
    ),
    "truncated positions": (
        "h5",
        _rewrite_positions(lambda t: t[: t.rindex(",")]),
        r"tissue_positions.csv: column pxl_col_in_fullres: 1 row\(s\) not a number",
    ),
    "positions without a column": (
        "h5",
        _rewrite_positions(lambda t: t.replace("pxl_col_in_fullres", "x")),
        r"tissue_positions.csv: no column\(s\) pxl_col_in_fullres",
    ),
    "h5 shape disagrees": (
        "h5",
        _h5_edit(lambda g: g["shape"].write_direct(np.array([N_GENES + 1, N_MATRIX], dtype=np.int32))),
        r"\.h5: matrix/shape \(26, 32\) disagrees with its 25 features and 32 barcodes",
    ),
    "MEX shape disagrees": (
        "mex",
        _mex_edit("features.tsv.gz", lambda b: gzip.compress(gzip.decompress(b) + b"X\tX\tGene Expression\n")),
        r"matrix.mtx.gz: the matrix is 25 x 32, but features.tsv.gz lists 26 features",
    ),
    "no common spot": (
        "h5",
        _rewrite_positions(lambda t: t.replace("-1,", "-9,")),
        r"no spot under tissue is in both .*tissue_positions.csv .* and .*filtered_feature_bc_matrix.h5",
    ),
    "bad scalefactors": (
        "h5",
        lambda outs: (outs / "spatial" / "scalefactors_json.json").write_text("{oops"),
        r"scalefactors_json.json: unreadable JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACERANGER))
def test_bad_space_ranger_input(tmp_path, case):
    counts_format, change, message = BAD_SPACERANGER[case]
    folder = _spaceranger_with(tmp_path, change, counts_format)
    with pytest.raises(IngestError, match=message):
        read_section(folder, "S1")


def test_bad_v1_positions(tmp_path):
    def five_columns(outs):
        path = outs / "spatial" / "tissue_positions_list.csv"
        path.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in path.read_text().splitlines()))

    folder = _spaceranger_with(tmp_path, five_columns, positions_format="v1")
    with pytest.raises(IngestError, match=r"tissue_positions_list.csv: 5 columns; a Space Ranger 1.x"):
        read_section(folder, "S1")


def test_missing_layouts(tmp_path):
    with pytest.raises(IngestError, match="nowhere: no such file or folder"):
        read_section(tmp_path / "nowhere", "S1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="empty: no layout recognised for sample S1"):
        read_section(tmp_path / "empty", "S1")
    root = make_hest(tmp_path / "hest")
    with pytest.raises(
        IngestError, match=r"HEST-1k layout expected, but st/S9.h5ad is missing \(st/ holds \['S1'\]\)"
    ):
        read_section(root, "S9")
    with pytest.raises(IngestError, match="gone.h5ad: no such file"):
        read_section(tmp_path / "gone.h5ad", "S1")


def test_bad_h5ad_sections(tmp_path):
    root = make_hest(tmp_path / "hest")
    path = root / "st" / "S1.h5ad"
    with h5py.File(path, "a") as f:
        index = f["obs/_index"].asstr()[...]
        index[1] = index[0]
        f["obs/_index"][...] = index
    with pytest.raises(IngestError, match=r"S1.h5ad: 1 obs name \(barcode\)\(s\) repeated"):
        read_section(root, "S1")
    with h5py.File(path, "a") as f:
        del f["obsm/spatial"]
    with pytest.raises(IngestError, match=r"S1.h5ad: no obsm\['spatial'\]"):
        read_section(root, "S1")
    _truncate(path)
    with pytest.raises(IngestError, match=r"S1.h5ad: unreadable .h5ad"):
        read_section(root, "S1")


# -------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/data/her2st_st absent")
def test_real_c2_space_ranger_and_hest_agree():
    visium = read_section(REAL / "visium" / "C2", "C2")
    hest = read_section(REAL / "hest", "C2")
    assert (visium.layout, hest.layout) == ("spaceranger", "hest")
    assert set(visium.barcodes) == set(hest.barcodes) and len(visium.barcodes) == 187
    a, b = np.argsort(visium.barcodes), np.argsort(hest.barcodes)
    assert list(visium.barcodes[a]) == list(hest.barcodes[b])
    assert visium.gene_names == hest.gene_names
    assert abs(visium.counts[a] - hest.counts[b]).max() == 0
    assert np.abs(visium.x_px[a] - hest.x_px[b]).max() <= 0.5
    assert np.abs(visium.y_px[a] - hest.y_px[b]).max() <= 0.5
    assert visium.image.endswith("C2_fullres.jpg") and hest.image.endswith("wsis/C2.tif")
    assert hest.um_per_px == pytest.approx(0.688098) and hest.spot_diameter_um == 100.0
    assert visium.warnings == [] and hest.warnings == []


def test_an_uns_item_anndata_cannot_read_is_left_out_and_named(tmp_path, caplog):
    write_h5ad(tmp_path / "a.h5ad", sp.csr_matrix(np.eye(3, 2, dtype=np.float32)), _obs(3), ["A", "B"], uns={"ok": 1})
    with h5py.File(tmp_path / "a.h5ad", "a") as f:
        f["uns"].create_group("odd").attrs.update({"encoding-type": "awkward-array", "encoding-version": "0.1.0"})
    with caplog.at_level("WARNING", logger="expreg"):
        back = read_h5ad(tmp_path / "a.h5ad")
    assert back.uns == {"ok": 1} and back.X.format == "csr" and list(back.obs.index) == list(_obs(3).index)
    assert "a.h5ad: left out what anndata cannot read: uns/odd" in caplog.text
