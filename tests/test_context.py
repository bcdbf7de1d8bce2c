"""Multi-scale input (``model.context=multiscale``): context patches cut around each spot, one encoder for
the patch and its context, the same pixels in training, ``expreg.predict`` and ``expreg.map``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_map import GENES, PATCH_PX, PATCH_UM, SPOT_PITCH_UM, SPOTS_XY, make_spaceranger, map_args, save_model

from expreg.ingest.prepare import Options, prepare

CONTEXT_UM = 3 * PATCH_UM  # 336 px at the section's 1 um/px


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> dict:
    """A Space Ranger section whose image has a black 9-px dot on spot 7, prepared with context patches."""
    work = tmp_path_factory.mktemp("context")
    sample, counts = make_spaceranger(work / "sr")
    image = sample / "S1_fullres.png"
    pixels = np.asarray(Image.open(image)).copy()
    x, y = SPOTS_XY[7]
    pixels[y - 4 : y + 5, x - 4 : x + 5] = 0
    Image.fromarray(pixels).save(image)
    (work / "sheet.csv").write_text(f"sample_id,group_id,path\nS1,P1,{sample}\n")
    options = Options(patch_um=PATCH_UM, patch_px=PATCH_PX, spot_pitch_um=SPOT_PITCH_UM, context_um=CONTEXT_UM)
    prepare(work / "sheet.csv", work / "prepared", options)
    return {"work": work, "sample": sample, "image": image, "prepared": work / "prepared", "counts": counts}


def _dark_centre(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    yy, xx = np.nonzero(pixels < 60)
    return np.array([xx.mean(), yy.mean()])


def test_context_patches_are_centred_on_the_spot_and_white_outside_the_image(marked):
    prepared = marked["prepared"]
    meta = pd.read_csv(prepared / "metadata.csv")
    assert list(meta["context_path"]) == [p.replace("patches/", "context/", 1) for p in meta["path"]]
    row = meta.iloc[7]
    centre = (PATCH_PX - 1) / 2
    np.testing.assert_allclose(_dark_centre(prepared / row["path"]), [centre, centre], atol=0.6)
    np.testing.assert_allclose(_dark_centre(prepared / row["context_path"]), [centre, centre], atol=0.6)
    # the dot covers 9 px of 112 in the patch and of 336 in the context patch: 3x smaller there
    dark = [(np.asarray(Image.open(prepared / row[c]).convert("L")) < 60).sum() for c in ("path", "context_path")]
    assert dark[0] / dark[1] == pytest.approx(9, rel=0.35)
    # spot 0 at x=150, y=140: its 336-px context box starts 18 px left and 28 px above the image
    first = np.asarray(Image.open(prepared / meta.iloc[0]["context_path"]))
    outside_x, outside_y = int(18 / 336 * PATCH_PX), int(28 / 336 * PATCH_PX)
    assert (first[:, :outside_x] == 255).all() and (first[:outside_y, :] == 255).all()
    assert not (first[:, outside_x + 2 :] == 255).all()
    record = json.loads((prepared / "prepare.json").read_text())
    assert record["patch"]["context_um"] == CONTEXT_UM


def test_a_multiscale_model_embeds_the_patch_and_its_context_with_one_encoder(tmp_path):
    from transformers import AutoModel

    from expreg.modeling.model import build_model

    model = build_model("test_resnet", 3, image_size=32, context="multiscale", context_um=CONTEXT_UM).eval()
    single = build_model("test_resnet", 3, image_size=32)
    assert model.head.in_features == 2 * single.head.in_features
    x = torch.randn(4, 6, 32, 32)
    with torch.no_grad():
        both = model.embed(x)
        apart = torch.cat([_single(model, x[:, :3]), _single(model, x[:, 3:])], dim=1)
    torch.testing.assert_close(both, apart, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="takes 6 input channels"):
        model.embed(torch.randn(2, 3, 32, 32))
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.context == "multiscale" and loaded.config.context_um == CONTEXT_UM
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).predictions, model(x).predictions)


def _single(model, x):
    from expreg.modeling.encoders import pool

    return pool(model.backbone, x, model.config.pooling)


def test_a_training_sample_holds_its_context_transformed_like_its_patch(tmp_path):
    from expreg.data.loaders import ExpressionTransform
    from expreg.data.transforms import ImageTransform

    rng = np.random.default_rng(0)
    picture = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(picture)
    transform = ImageTransform(24, train=True, dihedral=True, color_jitter=0.3, hed_jitter=0.05, seed=3)
    expression = ExpressionTransform(transform)
    batch = {"image": [{"path": str(picture), "bytes": None}] * 6, "path": [f"s{i}" for i in range(6)]}
    batch |= {"labels": [[0.0]] * 6, "context": [str(picture)] * 6}
    samples = expression(batch)["pixel_values"]
    assert all(s.shape == (6, 24, 24) for s in samples)
    for s in samples:  # the same picture as patch and context: the same flips and jitter give the same pixels
        torch.testing.assert_close(s[:3], s[3:])
    assert len({tuple(s[0, 0, :3].tolist()) for s in samples}) > 1  # and the samples were augmented differently


def test_map_spots_agree_with_predict_on_the_prepared_context_patches(marked, tmp_path):
    from expreg.inference import load_model, predict_files
    from expreg.ingest.images import open_slide
    from expreg.ingest.patches import PatchGeometry, cut_patch
    from expreg.map import main
    from expreg.training.launch import build_accelerator

    model_dir = save_model(tmp_path / "model", context="multiscale", context_um=CONTEXT_UM)
    out = tmp_path / "out"
    assert main(map_args(model_dir, marked["image"], out, "--measured", str(marked["prepared"]))) == 0
    prepared = marked["prepared"]
    meta = pd.read_csv(prepared / "metadata.csv")
    pairs = [(str(prepared / p), str(prepared / c)) for p, c in zip(meta["path"], meta["context_path"])]
    expected = predict_files(load_model(str(model_dir)), pairs, build_accelerator(), 8, 0)
    table = pd.read_csv(out / "measured_vs_predicted.csv").set_index("barcode").loc[meta["barcode"]]
    np.testing.assert_allclose(table[[f"predicted:{g}" for g in GENES]].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # the map's tiles: each with the context patch centred on it, as cut_patch cuts both around the tile centre
    tiles = pd.read_csv(out / "predictions.csv", index_col="tile").iloc[:4]
    cut = []
    with open_slide(marked["image"]) as slide:
        for i, (x, y) in enumerate(zip(tiles["x_px"], tiles["y_px"])):
            for name, side in (("patch", PATCH_UM), ("context", CONTEXT_UM)):
                cut_patch(slide, x, y, PatchGeometry(side, PATCH_PX, 1.0)).save(tmp_path / f"{name}{i}.png")
                cut.append(str(tmp_path / f"{name}{i}.png"))
    by_hand = predict_files(load_model(str(model_dir)), list(zip(cut[::2], cut[1::2])), build_accelerator(), 8, 0)
    np.testing.assert_allclose(tiles[GENES].to_numpy(), by_hand, rtol=1e-5, atol=1e-6)
    context_blank = [(p, str(marked["work"] / "white.png")) for p, _ in pairs]
    Image.new("RGB", (PATCH_PX, PATCH_PX), "white").save(marked["work"] / "white.png")
    other = predict_files(load_model(str(model_dir)), context_blank, build_accelerator(), 8, 0)
    assert not np.allclose(other, expected, atol=1e-4)  # the context patches really enter the predictions


def test_predict_reads_the_context_column_and_refuses_images_without_one(marked, tmp_path, capsys):
    from expreg.predict import main

    model_dir = save_model(tmp_path / "model", context="multiscale", context_um=CONTEXT_UM)
    prepared = marked["prepared"]
    out = tmp_path / "p.csv"
    assert (
        main(
            [
                "--model",
                str(model_dir),
                "--metadata_csv",
                str(prepared / "metadata.csv"),
                "--out_csv",
                str(out),
                "--num_workers",
                "0",
            ]
        )
        == 0
    )
    assert len(pd.read_csv(out)) == 20
    args = [
        "--model",
        str(model_dir),
        "--image_dir",
        str(prepared / "patches" / "S1"),
        "--out_csv",
        str(tmp_path / "q"),
    ]
    assert main(args) == 2 and "context_path column" in capsys.readouterr().err
    plain = prepared / "plain.csv"
    pd.read_csv(prepared / "metadata.csv").drop(columns=["context_path"]).to_csv(plain, index=False)
    args = ["--model", str(model_dir), "--metadata_csv", str(plain), "--out_csv", str(tmp_path / "r")]
    assert main(args) == 2 and "needs a context_path column" in capsys.readouterr().err


@pytest.mark.slow  # a training run end to end (~10 s each)
@pytest.mark.parametrize("image_cache", [False, True])
def test_a_multiscale_run_trains_and_its_model_predicts_its_validation_rows(make_dataset, tmp_path, image_cache):
    from expreg.config import load_recipe
    from expreg.inference import load_model, predict_files
    from expreg.training.launch import build_accelerator
    from expreg.training.trainer import run

    csv = make_dataset(num_groups=4, samples_per_group=6)
    frame = pd.read_csv(csv)
    frame["context_path"] = frame["path"].iloc[::-1].to_numpy()  # another image of the set as each context
    frame.to_csv(csv, index=False)
    overrides = [f"data.metadata_csv={csv}", "model.context=multiscale", "data.context_um=48", "train.epochs=1"]
    overrides += [f"logging.output_dir={tmp_path}", "logging.run_name=ms", "data.num_workers=0"]
    overrides += [f"data.image_cache={str(image_cache).lower()}", f"data.image_cache_dir={tmp_path / 'cache'}"]
    cfg = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"), overrides)
    accelerator = build_accelerator(cfg)
    assert run(cfg, accelerator)["status"] == "finished"
    model = load_model(str(tmp_path / "ms"))
    assert model.config.context == "multiscale" and model.config.context_um == 48.0
    card = (
        tmp_path / "ms" / "checkpoints" / "best" / "README.md"
    ).read_text()  # the model card says what the model reads
    assert "pixel_values: (batch, 6 (the patch's 3, then its context patch's 3)" in card and "context_path" in card
    val = pd.read_csv(tmp_path / "ms" / "predictions_val.csv")
    rows = frame.set_index("path").loc[val["path"]]
    pairs = [(str(csv.parent / p), str(csv.parent / c)) for p, c in zip(val["path"], rows["context_path"])]
    expected = predict_files(model, pairs, accelerator, 8, 0)
    genes = [c for c in val.columns if c not in ("path", "group_id")]
    np.testing.assert_allclose(val[genes].to_numpy(), expected, rtol=1e-4, atol=1e-4)


def test_cv_refuses_single_patch_trainings_beside_a_multiscale_recipe():
    from expreg.config import ConfigError, load_recipe
    from expreg.evaluation.cv import check_config

    multiscale = load_recipe(None, ["model.context=multiscale"])
    for method in ("frozen", "depth_from_image"):
        with pytest.raises(ConfigError, match="model.context=none"):
            check_config(multiscale, ["finetune", method])
    check_config(multiscale, ["finetune", "linear_probe", "linear_probe_neighbourhood", "mean"])  # probes: patches


def test_a_separate_context_encoder_embeds_the_context_patches_alone(tmp_path):
    from transformers import AutoModel

    from expreg.modeling.encoders import pool
    from expreg.modeling.model import build_model

    model = build_model("test_resnet", 3, image_size=32, context="multiscale", context_encoder="separate").eval()
    shared = build_model("test_resnet", 3, image_size=32, context="multiscale")
    assert model.num_parameters() > shared.num_parameters()  # a second encoder
    with torch.no_grad():
        for p in model.context_backbone.parameters():
            p.mul_(0.5)  # the two encoders now differ
    x = torch.randn(4, 6, 32, 32)
    with torch.no_grad():
        both = model.embed(x)
        patch, context = pool(model.backbone, x[:, :3], "avg"), pool(model.context_backbone, x[:, 3:], "avg")
        torch.testing.assert_close(both, torch.cat([patch, context], dim=1), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(context, pool(model.backbone, x[:, 3:], "avg"), atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.context_encoder == "separate"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).predictions, model(x).predictions)


def test_gated_fusion_scales_the_context_part_by_a_learned_gate(tmp_path):
    from transformers import AutoModel

    from expreg.modeling.model import build_model

    model = build_model("test_resnet", 3, image_size=32, context="multiscale", fusion="gated").eval()
    width = model.head.in_features // 2
    features = torch.randn(5, 2 * width)
    torch.testing.assert_close(model.fuse(features), torch.cat([features[:, :width], 0.5 * features[:, width:]], 1))
    with torch.no_grad():  # a trained gate: sigmoid(W [own, context] + b) per context feature
        model.fusion_gate.weight.normal_()
        model.fusion_gate.bias.normal_()
        gate = torch.sigmoid(features @ model.fusion_gate.weight.T + model.fusion_gate.bias)
    fused = model.fuse(features)
    torch.testing.assert_close(fused[:, :width], features[:, :width])
    torch.testing.assert_close(fused[:, width:], gate * features[:, width:])
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).predictions, model(x).predictions)


def test_context_options_that_do_not_fit_the_context_are_refused():
    from expreg.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="context_encoder=separate .* set model.context=multiscale"):
        load_recipe(None, ["model.context_encoder=separate"])
    with pytest.raises(ConfigError, match="fusion=gated .* set model.context"):
        load_recipe(None, ["model.fusion=gated"])
    with pytest.raises(ConfigError, match="model.context=neighbourhood .* use train.mode=frozen"):
        load_recipe(None, ["model.context=neighbourhood"])
    load_recipe(None, ["model.context=neighbourhood", "train.mode=frozen", "model.fusion=gated"])
    load_recipe(None, ["model.context=multiscale", "model.context_encoder=separate", "model.fusion=gated"])


def test_map_spots_and_tiles_of_a_neighbourhood_model_agree_with_predict(marked, tmp_path, capsys):
    from expreg.data.neighbours import neighbourhood_matrix
    from expreg.inference import load_model, predict_files
    from expreg.ingest.images import open_slide
    from expreg.ingest.patches import PatchGeometry, cut_patch
    from expreg.map import main
    from expreg.predict import main as predict_main
    from expreg.training.launch import build_accelerator

    radius = 150.0  # the spots' 100 µm pitch: 4 neighbours and the spot; tiles (112 µm apart): 4 and the tile
    model_dir = save_model(tmp_path / "model", context="neighbourhood", neighbourhood_um=radius)
    out = tmp_path / "out"
    assert main(map_args(model_dir, marked["image"], out, "--measured", str(marked["prepared"]))) == 0
    prepared = marked["prepared"]
    predicted = tmp_path / "p.csv"
    args = ["--model", str(model_dir), "--metadata_csv", str(prepared / "metadata.csv"), "--out_csv", str(predicted)]
    assert predict_main([*args, "--num_workers", "0"]) == 0
    expected = pd.read_csv(predicted)
    barcodes = expected["path"].str.extract(r"/([^/]+)\.png$")[0]
    table = pd.read_csv(out / "measured_vs_predicted.csv").set_index("barcode").loc[barcodes]
    np.testing.assert_allclose(
        table[[f"predicted:{g}" for g in GENES]].to_numpy(), expected[GENES], rtol=1e-5, atol=1e-6
    )
    # the tiles: each beside the mean of the tiles whose centres lie within the radius of its own
    tiles = pd.read_csv(out / "predictions.csv", index_col="tile")
    cut = []
    with open_slide(marked["image"]) as slide:
        for i, (x, y) in enumerate(zip(tiles["x_px"], tiles["y_px"])):
            cut_patch(slide, x, y, PatchGeometry(PATCH_UM, PATCH_PX, 1.0)).save(tmp_path / f"t{i}.png")
            cut.append(str(tmp_path / f"t{i}.png"))
    xy = tiles[["x_px", "y_px"]].to_numpy(dtype=np.float64)  # 1 µm per px
    matrix = neighbourhood_matrix(np.zeros(len(xy)), xy, radius)
    assert 1 < np.diff(matrix.indptr).mean() < 5
    model = load_model(str(model_dir))
    by_hand = predict_files(model, cut, build_accelerator(), 8, 0, neighbourhood=matrix)
    np.testing.assert_allclose(tiles[GENES].to_numpy(), by_hand, rtol=1e-5, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["neighbourhood_um"] == radius
    assert summary["mean_tiles_per_neighbourhood"] == round(np.diff(matrix.indptr).mean(), 2)
    # TTA: each view's own embedding beside the neighbourhood mean of the tiles as they are (as in training)
    tta = predict_files(model, cut, build_accelerator(), 8, 0, tta=True, neighbourhood=matrix)
    np.testing.assert_allclose(tta, _tta_by_hand(model, cut, matrix), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pass neighbourhood="):
        model(torch.zeros(1, 3, 32, 32))
    args = ["--model", str(model_dir), "--image_dir", str(prepared / "patches"), "--out_csv", str(tmp_path / "q")]
    assert predict_main(args) == 2 and "context=neighbourhood" in capsys.readouterr().err


def _tta_by_hand(model, files: list[str], matrix) -> np.ndarray:
    from expreg.data import ImageTransform
    from expreg.inference import ImageFiles, dihedral_view

    config = model.config
    images = ImageFiles(files, ImageTransform(config.image_size, config.image_mean, config.image_std, train=False))
    pixels = torch.stack([images[i] for i in range(len(images))])
    with torch.no_grad():
        own = [model.embed(dihedral_view(pixels, v)).double() for v in range(8)]
        around = torch.from_numpy(matrix @ own[0].numpy()).double()
        normalised = sum(model.forward_head(torch.cat([o, around], 1).float()).predictions for o in own) / 8
    return model.to_expression(normalised.double()).numpy()
