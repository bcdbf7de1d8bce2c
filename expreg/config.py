"""Typed run configuration: YAML recipe + ``section.key=value`` overrides -> ``RunConfig``.

Precedence: dataclass defaults < recipe < command-line overrides. Unknown sections or keys are an
error naming the key; values are converted to the field's type and checked (YAML reads ``3e-4``
as a string: it is converted to a float here). No torch import: this module is cheap.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from expreg.key_suggestions import closest_keys

MIXED_PRECISION = ("no", "fp16", "bf16")
HEADS = ("linear", "mlp")
POOLINGS = ("avg", "cls", "cls+mean")  # expreg.modeling.encoders
# expreg.modeling.model: the spot's patch alone, with a wider context patch, or beside its neighbourhood's embeddings
CONTEXTS = ("none", "multiscale", "neighbourhood")
CONTEXT_ENCODERS = ("shared", "separate")
FUSIONS = ("concat", "gated")
TRAIN_MODES = ("finetune", "frozen", "linear_probe")
DEMO_DATA = "demo"
TARGET_TRANSFORMS = ("log1p_cpm", "log1p", "none")  # expreg.data.expression


class ConfigError(ValueError):
    """A recipe or override is invalid (unknown key, wrong type or value)."""


@dataclass
class DataConfig:
    metadata_csv: str = DEMO_DATA
    # an expreg.prepare output folder: metadata_csv, expression_file (and patches, for --store shards) from it
    prepared: str | None = None
    split_csv: str | None = None
    fold: int | None = None
    val_frac: float = 0.2
    gene_names_file: str | None = None
    num_genes: int | None = None
    image_size: int = 224
    batch_size: int = 32
    eval_batch_size: int | None = None
    num_workers: int = 2
    check_images: str = "exists"
    normalize_targets: bool = True
    augment_dihedral: bool = True
    color_jitter: float = 0.0
    hed_jitter: float = 0.0
    bad_image_policy: str = "fail"
    # a patch store (expreg.prepare --store shards): the metadata's images are read from its Parquet shards
    patches: str | None = None
    image_cache: bool = False
    image_cache_dir: str | None = None
    # targets from raw counts (an expression.h5ad written by expreg.prepare), genes chosen on the training split
    expression_file: str | None = None
    genes: str | None = None  # hvg:K, var:K, mean:K, svg:K (Moran's I per training section) or a file of gene names
    min_gene_detection: float = 0.1
    target_transform: str = "log1p_cpm"
    # a listed or chosen gene that some sample never measured: an error (False), or its targets there left out
    # of the loss and the metrics (True); never counted as zeros
    allow_unmeasured_genes: bool = False
    # physical side of the patches in µm (stored in the model for whole-slide maps); read from the
    # prepare.json beside an expreg.prepare metadata CSV, give it for hand-made CSVs
    patch_um: float | None = None
    # physical side of the context patches in µm (model.context=multiscale): read from prepare.json as patch_um
    context_um: float | None = None
    # radius of a spot's neighbourhood in µm (model.context=neighbourhood, expreg.cv --methods
    # linear_probe_neighbourhood); None: neighbourhood_rings rings of the spot lattice
    neighbourhood_um: float | None = None
    # with neighbourhood_um=null: the radius is (rings + 0.2) x the median distance to the nearest spot of the
    # same section, on the training rows (1: the nearest spots; 2: and the ring beyond them)
    neighbourhood_rings: int = 1

    def __post_init__(self) -> None:
        _check_choice("data.check_images", self.check_images, ("none", "exists", "decode"))
        _check_choice("data.bad_image_policy", self.bad_image_policy, ("fail", "skip"))
        _check_positive("data.image_size", self.image_size)
        _check_positive("data.batch_size", self.batch_size)
        if self.eval_batch_size is not None:
            _check_positive("data.eval_batch_size", self.eval_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 < self.val_frac < 1:
            raise ConfigError(f"data.val_frac must be in (0, 1), got {self.val_frac}")
        if not 0 <= self.color_jitter < 1:
            raise ConfigError(f"data.color_jitter must be in [0, 1), got {self.color_jitter}")
        if not 0 <= self.hed_jitter < 1:
            raise ConfigError(f"data.hed_jitter must be in [0, 1), got {self.hed_jitter}")
        _check_choice("data.target_transform", self.target_transform, TARGET_TRANSFORMS)
        if self.patch_um is not None:
            _check_positive("data.patch_um", self.patch_um)
        if self.context_um is not None:
            _check_positive("data.context_um", self.context_um)
        if self.neighbourhood_um is not None:
            _check_positive("data.neighbourhood_um", self.neighbourhood_um)
        _check_positive("data.neighbourhood_rings", self.neighbourhood_rings)
        if self.neighbourhood_um is not None and self.neighbourhood_rings != 1:
            raise ConfigError(
                f"data.neighbourhood_um={self.neighbourhood_um:g} sets the radius; data.neighbourhood_rings="
                f"{self.neighbourhood_rings} would be ignored: give one of them"
            )
        if not 0 <= self.min_gene_detection <= 1:
            raise ConfigError(f"data.min_gene_detection must be in [0, 1], got {self.min_gene_detection}")
        if self.prepared is not None:
            self._use_prepared_folder()
        if (self.expression_file is None) != (self.genes is None):
            raise ConfigError(
                "data.expression_file and data.genes go together: the targets are computed from the raw counts of "
                "the expression file for the genes chosen on the training split (e.g. data.genes=hvg:50)"
            )
        if self.fold is not None and self.split_csv is None:
            raise ConfigError(
                "data.fold needs data.split_csv: a fold file made with python -m expreg.splits --n_folds K"
            )

    def _use_prepared_folder(self) -> None:
        """``data.prepared``: the keys an ``expreg.prepare`` folder implies, each refused when set otherwise.

        Reads nothing but its ``prepare.json`` (for a shard store), when there: a missing folder is the data
        layer's error (``expreg.data.prepared``), so a shipped recipe loads before its folder is made."""
        import json

        folder = Path(self.prepared)
        try:
            record = json.loads((folder / "prepare.json").read_text())
            store = record.get("store", {}).get("kind", "files") if isinstance(record, dict) else "files"
        except (OSError, ValueError):
            store = "files"
        implied = {
            "metadata_csv": (str(folder / "metadata.csv"), DEMO_DATA),
            "expression_file": (str(folder / "expression.h5ad"), None),
        }
        if store == "shards":
            implied["patches"] = (str(folder / "patches"), None)
        for key, (value, unset) in implied.items():
            given = getattr(self, key)
            if given != unset and Path(given).resolve() != Path(value).resolve():
                raise ConfigError(
                    f"data.prepared={self.prepared} sets data.{key}={value}, but data.{key}={given} was given: "
                    "give one of them"
                )
            setattr(self, key, value if given == unset else given)  # a saved run's absolute paths stay
        if self.genes is None:
            raise ConfigError(
                f"data.prepared={self.prepared} needs data.genes: the targets are computed from its raw counts for "
                "the genes chosen on the training split (e.g. data.genes=hvg:50, or a file of gene names)"
            )


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_path: str | None = None
    head: str = "linear"
    head_hidden_dim: int = 256
    dropout: float = 0.0
    pooling: str = "avg"  # avg, cls (a ViT's class token) or cls+mean (both, as Virchow2)
    encoder_args: str | None = None  # JSON object added to the encoder's timm arguments
    context: str = "none"  # none | multiscale (the patch and a context patch around it) | neighbourhood (frozen mode)
    context_encoder: str = "shared"  # multiscale: shared (one encoder for both patches) | separate (a second one)
    fusion: str = "concat"  # with a context: concat (side by side) | gated (the context scaled by a learned gate)

    def __post_init__(self) -> None:
        _check_choice("model.head", self.head, HEADS)
        _check_choice("model.context", self.context, CONTEXTS)
        _check_choice("model.context_encoder", self.context_encoder, CONTEXT_ENCODERS)
        _check_choice("model.fusion", self.fusion, FUSIONS)
        if self.context_encoder == "separate" and self.context != "multiscale":
            raise ConfigError(
                "model.context_encoder=separate is a second encoder for context patches: set model.context=multiscale"
            )
        if self.fusion == "gated" and self.context == "none":
            raise ConfigError("model.fusion=gated fuses a spot's features with its context's: set model.context")
        _check_choice("model.pooling", self.pooling, POOLINGS)
        self.encoder_kwargs()  # checked now
        _check_positive("model.head_hidden_dim", self.head_hidden_dim)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def encoder_kwargs(self) -> dict:
        """``model.encoder_args`` as a dict (``{}`` when unset); ``ConfigError`` unless it is a JSON object."""
        import json

        if self.encoder_args is None:
            return {}
        try:
            value = json.loads(self.encoder_args)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f'model.encoder_args must be a JSON object, e.g. \'{{"act_layer": "silu"}}\': {err}'
            ) from err
        if not isinstance(value, dict):
            raise ConfigError(f"model.encoder_args must be a JSON object (name: value), got {self.encoder_args!r}")
        return value


@dataclass
class TrainConfig:
    mode: str = "finetune"
    epochs: int = 10
    lr: float = 3.0e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = None
    checkpointing_steps: int | None = None
    early_stopping_patience: int | None = None
    max_steps_per_epoch: int | None = None
    stop_after_steps: int | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    nonfinite_loss_policy: str = "fail"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.mixed_precision is not None:
            _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.grad_accum_steps", self.grad_accum_steps)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(
                f"train.warmup_ratio must be in [0, 1] (a fraction of all steps), got {self.warmup_ratio}"
            )
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(
                f"train.max_grad_norm must be a finite number > 0, or null for no clipping; got {self.max_grad_norm}"
            )
        _check_choice("train.nonfinite_loss_policy", self.nonfinite_loss_policy, ("fail", "skip"))
        _check_choice("train.mode", self.mode, TRAIN_MODES)
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("train.push_to_hub needs train.hub_model_id (e.g. my-org/expreg-model)")
        for name in ("checkpointing_steps", "early_stopping_patience", "max_steps_per_epoch", "stop_after_steps"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(f"train.{name}", value)


@dataclass
class LoggingConfig:
    output_dir: str = "results"
    run_name: str | None = None
    report_to: str = "none"


@dataclass
class RunConfig:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.model.context == "multiscale" and self.train.mode != "finetune":
            raise ConfigError(
                f"model.context=multiscale trains the encoder on two views of each spot; train.mode={self.train.mode} "
                "reads cached single-patch embeddings: use train.mode=finetune"
            )
        if self.model.context == "neighbourhood" and self.train.mode != "frozen":
            raise ConfigError(
                f"model.context=neighbourhood trains the head on cached embeddings of each spot and its neighbourhood; "
                f"train.mode={self.train.mode}: use train.mode=frozen (expreg.cv has linear_probe_neighbourhood too)"
            )
        if self.train.mode == "linear_probe" and self.model.head != "linear":
            raise ConfigError("train.mode=linear_probe fits a linear head: set model.head=linear")
        if self.train.mode == "frozen" and (self.data.color_jitter or self.data.hed_jitter):
            raise ConfigError(
                "train.mode=frozen trains on embeddings computed once: colour and stain jitter cannot be applied to "
                "them; set data.color_jitter=0 and data.hed_jitter=0 (data.augment_dihedral is supported)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(name: str, value) -> None:
    if not value > 0:  # also catches NaN
        raise ConfigError(f"{name} must be > 0, got {value}")


_NULLS = ("none", "null", "~", "")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml_number(value):
    """YAML 1.1 reads ``1e-5`` (no dot) as text: such a value of a mapping becomes the number it spells."""
    return float(value) if isinstance(value, str) and _NUMBER.match(value.strip()) else value


_FALSE_MEANS = {"train.mixed_precision": "no", "logging.report_to": "none"}


def _convert(name: str, value, annotation):
    """Convert ``value`` to the type ``annotation`` (``int``, ``float``, ``bool``, ``str`` or ``X | None``).

    Command-line values arrive as raw text, recipe values as YAML read them.
    """
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            return None
        return _convert(name, value, args[0])
    nulls = ("null", "~", "") if annotation is str else _NULLS  # "none" is a real value of report_to
    if value is None or (isinstance(value, str) and value.strip().lower() in nulls):
        raise ConfigError(f"{name} cannot be null or empty")
    if name == "model.encoder_args" and isinstance(value, dict):  # a mapping in the recipe: kept as JSON text
        import json

        return json.dumps({k: _yaml_number(v) for k, v in value.items()}, sort_keys=True)
    if annotation is str and isinstance(value, bool):
        if value is False and name in _FALSE_MEANS:
            return _FALSE_MEANS[name]  # YAML 1.1 reads an unquoted `no` / `off` as False
        raise ConfigError(f"{name}: YAML read {value!r} as a boolean; write the text in quotes")
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.strip().lower() in ("true", "yes", "1")
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported type {annotation}")
    raise ConfigError(f"{name}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "logging": LoggingConfig}


def flatten(nested: dict, prefix: str = "") -> dict[str, object]:
    """``{"data": {"batch_size": 8}, "seed": 1}`` -> ``{"data.batch_size": 8, "seed": 1}``.

    One level: a mapping value is a section whose keys become ``section.key`` (mappings inside a
    section stay values: a run configuration has none, and in a recipe they are a type error of
    their key). ``prefix`` goes before every key: ``flatten({"lr": 1}, "train.")`` -> ``{"train.lr": 1}``.
    """
    flat: dict[str, object] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update({f"{prefix}{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _recipe_values(raw: dict, source: str) -> dict[str, object]:
    """A recipe's (or resolved config's) mapping as flat dotted keys; a section must be a mapping."""
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if key in _SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping, got {value!r}")
        flat.update(flatten({key: value}) if key in _SECTIONS else {str(key): value})
    return flat


def _known_keys() -> dict[str, object]:
    hints = typing.get_type_hints(RunConfig)
    keys: dict[str, object] = {"seed": hints["seed"]}
    for section, cls in _SECTIONS.items():
        for name, annotation in typing.get_type_hints(cls).items():
            keys[f"{section}.{name}"] = annotation
    return keys


def parse_overrides(overrides: list[str]) -> dict[str, object]:
    """``["train.lr=1e-3", "seed=3"]`` -> ``{"train.lr": "1e-3", "seed": "3"}``.

    Values stay raw text: each is converted to its key's type later, so a run name such as
    ``0123`` or a file name stays what was typed.
    """
    out: dict[str, object] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_config(values: dict[str, object], source: str = "recipe") -> RunConfig:
    """Build a ``RunConfig`` from flat dotted keys, rejecting unknown keys and converting types."""
    known = _known_keys()
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = "; ".join(
            f"'{k}'" + (f" (did you mean {', '.join(s)}?)" if (s := closest_keys(k, known)) else "") for k in unknown
        )
        raise ConfigError(f"{source}: unknown key(s) {hints}. Known keys: see recipes/base.yaml")
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    top: dict[str, object] = {}
    for key, value in values.items():
        converted = _convert(key, value, known[key])
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = converted
        else:
            top[key] = converted
    built = {name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
    return RunConfig(**top, **built)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < recipe file < ``section.key=value`` overrides."""
    values: dict[str, object] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
        values.update(_recipe_values(raw, source))
    config = build_config(values, source=source)
    if overrides:
        values.update(parse_overrides(overrides))
        config = build_config(values, source="command-line overrides")
    return config


def config_from_dict(raw: dict, source: str) -> RunConfig:
    """Rebuild a ``RunConfig`` from ``RunConfig.to_dict()`` output (e.g. a run's resolved config)."""
    return build_config(_recipe_values(raw, source), source=source)
