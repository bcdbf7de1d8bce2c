"""Recipes -> typed config: unknown keys, types, precedence; every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from expreg.config import ConfigError, load_recipe
from expreg.config import _known_keys as known_keys

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = _write(tmp_path, "train:\n  lr: 3e-4\n  epochs: 4\ndata:\n  batch_size: 16\n")
    cfg = load_recipe(recipe, ["train.epochs=7"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # YAML string -> float
    assert cfg.train.epochs == 7  # override wins
    assert cfg.data.batch_size == 16  # recipe wins over default
    assert cfg.train.weight_decay == 0.05  # default


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'train.learning_rate'"):
        load_recipe(_write(tmp_path, "train:\n  learning_rate: 0.1\n"))
    with pytest.raises(ConfigError, match="'lr' \\(did you mean train.lr\\?\\)"):
        load_recipe(None, ["lr=0.1"])
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_recipe(None, ["optim.lr=0.1"])


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("train.learning_rate", "train.lr"),  # transformers' name
        ("learning_rate", "train.lr"),
        ("epochs", "train.epochs"),  # the right name in no section
        ("train.num_epochs", "train.epochs"),
        ("max_epochs", "train.epochs"),  # Lightning's
        ("gradient_accumulation_steps", "train.grad_accum_steps"),
        ("data.batchsize", "data.batch_size"),  # a typo
        ("model.backbon", "model.backbone"),
        ("per_device_train_batch_size", "data.batch_size"),
    ],
)
def test_an_unknown_key_suggests_the_key_meant_even_under_another_tools_name(typed, meant):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [f"{typed}=1"])
    suggested = str(err.value).split("did you mean ", 1)[1].split("?")[0].split(", ")
    assert suggested[0] == meant, str(err.value)
    assert str(err.value).endswith("Known keys: see recipes/base.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", "data.batch_size: expected int"),
        ("data.batch_size=2.5", "data.batch_size: expected int"),
        ("model.pretrained=maybe", "model.pretrained: expected bool"),
        ("train.mixed_precision=fp8", "train.mixed_precision must be one of"),
        ("train.epochs=0", "train.epochs must be > 0"),
        ("data.val_frac=1.5", "data.val_frac must be in"),
        ("train.lr", "not of the form section.key=value"),
        # values that would silently corrupt training (issue 11): each names the key and the range
        ("train.max_grad_norm=-1", r"train.max_grad_norm must be a finite number > 0, or null"),
        ("train.max_grad_norm=0", r"train.max_grad_norm must be a finite number > 0, or null"),
        ("train.max_grad_norm=nan", r"train.max_grad_norm must be a finite number > 0"),
        ("train.warmup_ratio=-0.1", r"train.warmup_ratio must be in \[0, 1\]"),
        ("train.warmup_ratio=1.5", r"train.warmup_ratio must be in \[0, 1\]"),
        ("train.lr=inf", r"train.lr must be a finite number > 0"),
        ("train.lr=nan", r"train.lr must be a finite number > 0"),
        ("train.lr=0", r"train.lr must be a finite number > 0"),
        ("train.weight_decay=-0.01", r"train.weight_decay must be a finite number >= 0"),
        ("train.weight_decay=inf", r"train.weight_decay must be a finite number >= 0"),
        ("model.head_hidden_dim=0", r"model.head_hidden_dim must be > 0"),
        ("model.head_hidden_dim=-8", r"model.head_hidden_dim must be > 0"),
        ("data.val_frac=nan", "data.val_frac must be in"),
    ],
)
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [override])


def test_none_values_and_booleans():
    cfg = load_recipe(None, ["data.split_csv=null", "model.pretrained=true", "train.max_grad_norm=none"])
    assert cfg.data.split_csv is None and cfg.model.pretrained is True and cfg.train.max_grad_norm is None


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_shipped_recipes_load(recipe):
    load_recipe(recipe)


def test_base_recipe_documents_every_key():
    raw = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "base.yaml").read_text())
    flat = {"seed"} | {f"{s}.{k}" for s, v in raw.items() if isinstance(v, dict) for k in v}
    assert flat == set(known_keys())
    cfg = load_recipe(Path(__file__).parent.parent / "recipes" / "base.yaml")
    assert cfg == load_recipe(None)  # the template shows the defaults


def test_yaml_booleans_and_raw_text_overrides(tmp_path):
    cfg = load_recipe(_write(tmp_path, "train:\n  mixed_precision: no\nlogging:\n  report_to: none\n"))
    assert cfg.train.mixed_precision == "no" and cfg.logging.report_to == "none"  # unquoted `no` is YAML False
    cfg = load_recipe(None, ["logging.run_name=0123", "data.metadata_csv=data/1:30.csv", "train.mixed_precision=no"])
    assert cfg.logging.run_name == "0123" and cfg.data.metadata_csv == "data/1:30.csv"
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="data.metadata_csv cannot be null"):
        load_recipe(None, ["data.metadata_csv=null"])
    with pytest.raises(ConfigError, match="model.backbone: YAML read True as a boolean"):
        load_recipe(_write(tmp_path, "model:\n  backbone: yes\n"))
    with pytest.raises(ConfigError, match="data.fold needs data.split_csv"):
        load_recipe(None, ["data.fold=1"])


def test_cpu_precision_warning_depends_on_native_bf16():
    from expreg.training.launch import cpu_bf16_flags, cpu_precision_warning

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert cpu_bf16_flags(avx2) is False and cpu_bf16_flags(amx) is True and cpu_bf16_flags("no info") is None
    assert "SLOWER than fp32" in cpu_precision_warning("bf16", avx2)
    assert cpu_precision_warning("bf16", amx) is None  # measured faster than fp32 on such CPUs
    assert cpu_precision_warning("no", avx2) is None
    assert "fp16" in cpu_precision_warning("fp16", amx)


def test_edge_values_that_are_allowed():
    cfg = load_recipe(None, ["train.warmup_ratio=0", "train.weight_decay=0", "train.max_grad_norm=null"])
    assert cfg.train.warmup_ratio == 0 and cfg.train.weight_decay == 0 and cfg.train.max_grad_norm is None
    assert load_recipe(None, ["train.warmup_ratio=1"]).train.warmup_ratio == 1


def test_every_command_has_a_console_script():
    """``python -m expreg.<command>`` and ``expreg-<command>`` are the same program, for every command."""
    import configparser

    root = Path(__file__).resolve().parents[1]
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    scripts = dict(
        line.replace(" ", "").split("=")
        for line in parser["options.entry_points"]["console_scripts"].split("\n")
        if line
    )
    commands = sorted(p.stem for p in (root / "expreg").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
    assert {"cv", "map", "predict", "prepare", "splits"} <= set(commands)
    assert {f"expreg-{c}": f"expreg.{c}:main" for c in commands}.items() <= scripts.items()
