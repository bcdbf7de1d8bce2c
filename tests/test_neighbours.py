"""Neighbourhood features: the spots of a spot's own section within a radius, and the CV method on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expreg.data.metadata import Metadata, MetadataError
from expreg.data.neighbours import lattice_radius, neighbourhood_features, neighbourhood_matrix, spot_positions

REPO = Path(__file__).resolve().parents[1]


def _lattice(rows: int, cols: int, pitch: float, origin=(0.0, 0.0)) -> np.ndarray:
    """A hexagonal spot lattice (Visium's): rows offset by half a pitch, ``pitch * sqrt(3) / 2`` apart."""
    points = [(c * pitch + (r % 2) * pitch / 2, r * pitch * np.sqrt(3) / 2) for r in range(rows) for c in range(cols)]
    return np.asarray(points) + np.asarray(origin)


def test_neighbours_are_the_spots_of_the_same_section_within_the_radius():
    # two sections on the same coordinates: a neighbourhood never crosses into the other
    xy = np.vstack([_lattice(6, 7, 100.0), _lattice(6, 7, 100.0, origin=(30.0, 0.0))])
    sections = np.array(["S1"] * 42 + ["S2"] * 42)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(xy))  # rows of a cohort come in any order
    xy, sections = xy[order], sections[order]
    radius = lattice_radius(sections, xy)
    assert radius == pytest.approx(120.0)  # one ring: 1.2 x the 100 µm pitch
    matrix = neighbourhood_matrix(sections, xy, radius).toarray()
    for i in range(len(xy)):  # brute force
        distance = np.hypot(*(xy - xy[i]).T)
        expected = (distance <= radius) & (sections == sections[i])
        assert np.flatnonzero(matrix[i]).tolist() == np.flatnonzero(expected).tolist()
        np.testing.assert_allclose(matrix[i][expected], 1 / expected.sum())
    sizes = (matrix > 0).sum(axis=1)
    assert sizes.max() == 7 and sizes.min() == 3  # an inner spot and its ring of 6; a corner spot


def test_neighbourhood_features_are_the_spot_beside_its_neighbourhood_mean(tmp_path):
    frame = pd.DataFrame(
        {
            "path": [f"p{i}.png" for i in range(5)],
            "group_id": ["A"] * 5,
            "sample_id": ["S1", "S1", "S1", "S2", "S2"],
            "x_px": ["0", "200", "1000", "0", "100"],  # 0.5 µm/px: 0, 100, 500 µm; S2 at 0 and 50 µm
            "y_px": ["0"] * 5,
            "um_per_px": ["0.5"] * 5,
        }
    )
    metadata = Metadata(csv_path=tmp_path / "m.csv", frame=frame, target_columns=[], gene_names=[])
    features = np.arange(10, dtype=np.float64).reshape(5, 2)
    x, info = neighbourhood_features(features, metadata, radius_um=150.0)
    np.testing.assert_array_equal(x[:, :2], features)
    np.testing.assert_allclose(x[0, 2:], features[[0, 1]].mean(0))
    np.testing.assert_allclose(x[2, 2:], features[2])  # alone within 150 µm: its own embedding
    np.testing.assert_allclose(x[3, 2:], features[[3, 4]].mean(0))  # S2's own spots only
    frame["group_id"] = ["A", "A", "A", "B", "C"]  # S2 under two patients (two cohorts pooled): two sections
    metadata = Metadata(csv_path=tmp_path / "m.csv", frame=frame, target_columns=[], gene_names=[])
    x, _ = neighbourhood_features(features, metadata, radius_um=150.0)
    np.testing.assert_allclose(x[3, 2:], features[3])
    np.testing.assert_allclose(x[0, 2:], features[[0, 1]].mean(0))
    assert info == {"neighbourhood_um": 150.0, "mean_spots_per_neighbourhood": 1.8}


def test_positions_missing_or_bad_are_named(tmp_path):
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "group_id": ["A", "A"], "sample_id": ["S", "S"]})
    metadata = Metadata(csv_path=tmp_path / "m.csv", frame=frame, target_columns=[], gene_names=[])
    with pytest.raises(MetadataError, match=r"m\.csv: neighbourhood features need .*x_px, y_px, um_per_px"):
        spot_positions(metadata)
    frame["pixel_x"], frame["pixel_y"], frame["src_um_per_px"] = ["1", "x"], ["1", "2"], ["1", "1"]
    with pytest.raises(MetadataError, match=r"column pixel_x, line\(s\) 3: not a number \('x'\)"):
        spot_positions(metadata)


@pytest.fixture
def placed_dataset(make_dataset) -> Path:
    """The synthetic dataset with positions: each group one section, its spots on a 100 µm lattice."""
    csv = make_dataset(num_groups=4, samples_per_group=9)
    frame = pd.read_csv(csv)
    index = frame.groupby("group_id").cumcount().to_numpy()
    frame["sample_id"] = frame["group_id"]
    frame["x_px"], frame["y_px"], frame["um_per_px"] = (index % 3) * 200, (index // 3) * 200, 0.5
    frame.to_csv(csv, index=False)
    return csv


def test_cv_scores_the_neighbourhood_probe_on_the_folds_of_the_plain_probe(placed_dataset, tmp_path, capsys):
    from expreg.cv import main as cv_main

    out = tmp_path / "cv"
    args = [str(REPO / "recipes" / "tiny.yaml"), f"data.metadata_csv={placed_dataset}", "--n_folds", "2"]
    methods = "linear_probe,linear_probe_neighbourhood"
    assert cv_main([*args, "--methods", methods, "--out_dir", str(out)]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    frame = pd.read_csv(placed_dataset)
    xy, sections = frame[["x_px", "y_px"]].to_numpy() * 0.5, frame["sample_id"].to_numpy()
    sizes = [((np.hypot(*(xy - p).T) <= 120) & (sections == s)).sum() for p, s in zip(xy, sections)]
    plain, context = (summary["methods"][m] for m in ("linear_probe", "linear_probe_neighbourhood"))
    assert [f["test_groups"] for f in plain["folds"]] == [f["test_groups"] for f in context["folds"]]
    for fold in context["folds"]:
        assert fold["neighbourhood_um"] == 120.0 and fold["mean_spots_per_neighbourhood"] == round(np.mean(sizes), 2)
        assert fold["spearman_mean"] is not None
    assert plain["spearman_mean"] != context["spearman_mean"]  # other inputs, other numbers
    assert f"120.0 µm, {np.mean(sizes):.2f} spots on average" in capsys.readouterr().out
    del_positions = pd.read_csv(placed_dataset).drop(columns=["x_px"])
    del_positions.to_csv(placed_dataset, index=False)
    assert cv_main([*args, "--methods", methods, "--out_dir", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists() and "neighbourhood features need" in capsys.readouterr().err


def test_two_rings_reach_the_spots_beyond_the_nearest():
    xy = _lattice(9, 9, 100.0)
    sections = np.array(["S1"] * len(xy))
    radius = lattice_radius(sections, xy, rings=2)
    assert radius == pytest.approx(220.0)
    sizes = np.diff(neighbourhood_matrix(sections, xy, radius).indptr)
    assert sizes.max() == 19  # an inner spot, its 6 nearest and the 12 of the next ring (at 173 and 200 µm)


def _write_rows(frame: pd.DataFrame, folder: Path, name: str) -> Path:
    path = folder / name
    frame.to_csv(path, index=False)
    return path


def test_a_neighbourhood_model_trains_on_embeddings_and_predicts_its_validation_rows(placed_dataset, tmp_path):
    from expreg.config import load_recipe
    from expreg.inference import load_model
    from expreg.predict import main as predict_main
    from expreg.training.launch import build_accelerator
    from expreg.training.trainer import run

    overrides = [f"data.metadata_csv={placed_dataset}", "model.context=neighbourhood", "train.mode=frozen"]
    overrides += [f"logging.output_dir={tmp_path}", "logging.run_name=nb", f"data.image_cache_dir={tmp_path / 'c'}"]
    overrides += ["model.fusion=gated"]
    cfg = load_recipe(str(REPO / "recipes" / "tiny.yaml"), overrides)
    assert run(cfg, build_accelerator(cfg))["status"] == "finished"
    model = load_model(str(tmp_path / "nb"))
    assert model.config.context == "neighbourhood" and model.config.neighbourhood_um == pytest.approx(120.0)
    assert model.fusion_gate.weight.abs().sum() > 0  # the gate (zero at the start) was trained with the head
    val = pd.read_csv(tmp_path / "nb" / "predictions_val.csv")
    frame = pd.read_csv(placed_dataset).set_index("path").loc[val["path"]].reset_index()
    rows = _write_rows(frame, placed_dataset.parent, "val_rows.csv")
    out = tmp_path / "pred.csv"
    assert predict_main(["--model", str(tmp_path / "nb"), "--metadata_csv", str(rows), "--out_csv", str(out)]) == 0
    genes = [c for c in val.columns if c not in ("path", "group_id")]
    np.testing.assert_allclose(pd.read_csv(out)[genes].to_numpy(), val[genes].to_numpy(), rtol=1e-4, atol=1e-4)
    _run_the_model_card_snippet(tmp_path / "nb", frame, placed_dataset.parent, val[genes].to_numpy())
    alone = frame.assign(x_px=frame.index * 10_000)  # spots far apart: each its own neighbourhood, other numbers
    rows = _write_rows(alone, placed_dataset.parent, "far.csv")
    out = tmp_path / "far.csv"
    assert predict_main(["--model", str(tmp_path / "nb"), "--metadata_csv", str(rows), "--out_csv", str(out)]) == 0
    assert not np.allclose(pd.read_csv(out)[genes].to_numpy(), val[genes].to_numpy(), atol=1e-4)


def test_cv_runs_the_neighbourhood_head_beside_the_probes_and_refuses_encoder_training(placed_dataset, tmp_path):
    from expreg.config import ConfigError, load_recipe
    from expreg.cv import main as cv_main
    from expreg.evaluation.cv import check_config

    context = ["model.context=neighbourhood", "train.mode=frozen"]
    with pytest.raises(ConfigError, match="model.context=none"):
        check_config(load_recipe(None, context), ["frozen", "finetune"])
    out = tmp_path / "cv"
    args = [str(REPO / "recipes" / "tiny.yaml"), f"data.metadata_csv={placed_dataset}", *context, "--n_folds", "2"]
    args += ["--methods", "frozen,linear_probe_neighbourhood", "--out_dir", str(out)]
    assert cv_main(args) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    frozen = summary["methods"]["frozen"]["folds"]
    assert len(frozen) == 2 and all(f["spearman_mean"] is not None for f in frozen)
    for fold in range(2):
        config = json.loads(next((out / "runs").glob(f"frozen__fold{fold}/checkpoints/best/config.json")).read_text())
        assert config["context"] == "neighbourhood" and config["neighbourhood_um"] == pytest.approx(120.0)


def _run_the_model_card_snippet(run: Path, frame: pd.DataFrame, folder: Path, expected: np.ndarray) -> None:
    """The model card's "How to use" code, run on the validation rows, gives the run's predictions."""
    import re

    import torch

    from expreg.data import ImageTransform
    from expreg.inference import ImageFiles

    card = (run / "checkpoints" / "best" / "README.md").read_text()
    code = re.search(r"## How to use\n\n```python\n(.*?)```", card, re.S).group(1)
    assert "neighbourhood_matrix" in code
    config = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    transform = ImageTransform(config["image_size"], config["image_mean"], config["image_std"], train=False)
    images = ImageFiles([str(folder / p) for p in frame["path"]], transform)
    pixel_values = torch.stack([images[i] for i in range(len(images))])
    xy_um = frame[["x_px", "y_px"]].to_numpy(dtype=np.float64) * frame[["um_per_px"]].to_numpy(dtype=np.float64)
    assert frame["sample_id"].nunique() == 1  # one section, as the snippet says
    scope = {"pixel_values": pixel_values, "xy_um": xy_um}
    exec(code.replace("path/or/hub-id", str(run / "checkpoints" / "best")), scope)
    np.testing.assert_allclose(scope["expression"].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_a_planted_neighbourhood_effect_is_found_by_the_neighbourhood_probe_alone(tmp_path):
    """The positive control: expression that follows the neighbours' tissue is predicted only with their images."""
    from expreg.cv import main as cv_main
    from expreg.data.demo import make_synthetic_dataset

    scores = {}
    frozen = [
        "model.context=neighbourhood",
        "train.mode=frozen",
        "train.epochs=8",
        "train.lr=0.01",
        "--methods",
        "frozen",
    ]
    for effect in (0.0, 0.8):
        csv = make_synthetic_dataset(
            tmp_path / f"w{effect}",
            num_groups=4,
            samples_per_group=36,
            image_size=24,
            num_genes=10,
            seed=3,
            neighbourhood_effect=effect,
            positions=True,
        )
        out = tmp_path / f"cv{effect}"
        args = [
            str(REPO / "recipes" / "tiny.yaml"),
            f"data.metadata_csv={csv}",
            "data.image_size=24",
            "--n_folds",
            "2",
        ]
        assert cv_main([*args, "--methods", "linear_probe,linear_probe_neighbourhood", "--out_dir", str(out)]) == 0
        methods = json.loads((out / "cv_summary.json").read_text())["methods"]
        scores[effect] = {m: methods[m]["spearman_mean"] for m in methods}
    out = tmp_path / "frozen"  # the neighbourhood model (a trained head) on the same folds finds it too
    assert cv_main([*args, *frozen, "--out_dir", str(out)]) == 0
    head = json.loads((out / "cv_summary.json").read_text())["methods"]["frozen"]["spearman_mean"]
    assert head > scores[0.8]["linear_probe"] + 0.1
    assert scores[0.8]["linear_probe_neighbourhood"] > scores[0.8]["linear_probe"] + 0.1
    assert abs(scores[0.0]["linear_probe_neighbourhood"] - scores[0.0]["linear_probe"]) < 0.1


def test_a_dry_run_cuts_each_neighbourhood_to_the_rows_it_reads(placed_dataset, tmp_path):
    import scipy.sparse as sp

    from expreg.config import load_recipe
    from expreg.data.neighbours import first_rows
    from expreg.training.launch import build_accelerator
    from expreg.training.trainer import run

    matrix = sp.csr_matrix(np.array([[0.5, 0.5, 0, 0], [1 / 3, 1 / 3, 0, 1 / 3], [0, 0, 1, 0], [0, 0.5, 0, 0.5]]))
    np.testing.assert_allclose(first_rows(matrix, 2).toarray(), [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(first_rows(matrix, 3).toarray(), [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    overrides = [f"data.metadata_csv={placed_dataset}", "model.context=neighbourhood", "train.mode=frozen"]
    overrides += [f"logging.output_dir={tmp_path}", f"data.image_cache_dir={tmp_path / 'c'}"]
    cfg = load_recipe(str(REPO / "recipes" / "tiny.yaml"), overrides)
    assert run(cfg, build_accelerator(cfg), dry_run=True)["status"] == "finished"


def test_bad_positions_are_named_by_their_line_in_the_csv(placed_dataset, tmp_path):
    from expreg.config import ConfigError, load_recipe
    from expreg.training.launch import build_accelerator
    from expreg.training.trainer import run

    frame = pd.read_csv(placed_dataset, dtype=str, keep_default_na=False)
    frame.loc[30, "x_px"] = ""
    frame.to_csv(placed_dataset, index=False)
    overrides = [f"data.metadata_csv={placed_dataset}", "model.context=neighbourhood", "train.mode=frozen"]
    cfg = load_recipe(str(REPO / "recipes" / "tiny.yaml"), [*overrides, f"logging.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(MetadataError, match=r"metadata\.csv: column x_px, line\(s\) 32: not a number \(''\)"):
        run(cfg, build_accelerator(cfg))
    assert not (tmp_path / "runs").exists()  # nothing written
    with pytest.raises(ConfigError, match="neighbourhood_rings=2 would be ignored"):
        load_recipe(None, [*overrides, "data.neighbourhood_um=100", "data.neighbourhood_rings=2"])
