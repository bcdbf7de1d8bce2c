"""Image encoders: timm backbones built online or offline, local foundation-model folders, feature pooling.

Where a backbone comes from (``create_backbone``):

- a timm name (``resnet18``) or ``hf-hub:org/name``: timm builds it (the Hub is asked for the
  config of an ``hf-hub:`` name, and for weights with ``pretrained=True``);
- a local folder in the hf-hub timm layout (``model.pretrained_path=<folder>`` or
  ``model.backbone=local-dir:<folder>``): ``config.json`` (``architecture``, ``model_args``,
  ``pretrained_cfg``) plus ``model.safetensors`` or ``pytorch_model.bin``, built and loaded with no
  network, with the folder's own preprocessing (mean, std, interpolation);
- a saved model's ``backbone_config`` (``backbone_spec``): the architecture, its arguments and its
  preprocessing, recorded at training time, so ``from_pretrained`` never needs the network.

Pooling (``model.pooling``): ``avg`` (mean of the spatial features, or of a ViT's patch tokens
without its class and register tokens), ``cls`` (a ViT's class token) or ``cls+mean`` (the two
concatenated, as Virchow2 is used). Where timm's own pooling is the one asked for, the
backbone's own forward is used unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("expreg")

POOLINGS = ("avg", "cls", "cls+mean")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LOCAL_PREFIX = "local-dir:"
HUB_PREFIX = "hf-hub:"
_TIMM_POOL = {"avg": "avg", "token": "cls"}  # timm's global_pool names -> ours
_PATH_FIELDS = ("file", "source", "hf_hub_id", "url", "state_dict")  # where weights came from, not how to build


class ModelError(RuntimeError):
    """A backbone or its weights cannot be created or loaded (unknown name, offline, bad file)."""


def create_backbone(
    config, pretrained: bool = False, pretrained_path: str | None = None, encoder_args: dict | None = None
) -> nn.Module:
    """A headless timm backbone (``num_classes=0``) for ``config.image_size`` inputs.

    ``config.backbone_config`` (a saved model's record) rebuilds it offline; a ``pretrained_path``
    folder is either a timm model folder (``config.json`` + weights) or an expreg ``save_pretrained``
    folder (its backbone weights are taken). ``encoder_args`` (``model.encoder_args``) are added to
    the architecture's arguments (a timm folder's ``model_args`` or a timm name's), e.g. the
    ``mlp_layer``/``act_layer`` that Virchow2's and UNI2-h's model cards pass in code; they are
    recorded with the rest. The backbone gets ``expreg_spec``: the record to save.

    Raises:
        ModelError: Unknown backbone, a folder that is not a model, weights that do not fit, or
            pretrained weights that cannot be obtained (e.g. offline), with what to do.
    """
    spec = getattr(config, "backbone_config", None)
    if spec and pretrained_path is None and not pretrained:
        try:
            return _with_spec(_build(spec["architecture"], config.image_size, spec, pretrained=False), spec)
        except (RuntimeError, TypeError, ValueError) as err:  # e.g. an architecture this timm does not have
            raise ModelError(f"cannot rebuild the saved backbone {spec['architecture']!r}: {err}") from err
    folder = _local_folder(config.backbone, pretrained_path)
    if folder is not None and (folder / "config.json").is_file() and _is_timm_folder(folder):
        return load_encoder_folder(folder, config.image_size, encoder_args)
    if folder is not None and folder.is_dir():
        return _backbone_from_saved_model(config, folder)
    return _from_timm_name(config, pretrained, pretrained_path, encoder_args or {})


def check_local_encoder(backbone: str, pretrained_path: str | None) -> None:
    """The cheap checks of a local encoder folder (files, config, architecture), for commands to run before
    they write anything; ``ModelError`` as ``create_backbone`` would raise it. Weights are not read."""
    folder = _local_folder(backbone, pretrained_path)
    if folder is None:
        return
    if (folder / "config.json").is_file() and _is_timm_folder(folder):
        folder_spec(folder)
    elif not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder}: not a save_pretrained folder (no model.safetensors); {_LAYOUT}")


def _local_folder(backbone: str, pretrained_path: str | None) -> Path | None:
    if pretrained_path is not None and Path(pretrained_path).is_dir():
        return Path(pretrained_path)
    if backbone.startswith(LOCAL_PREFIX):
        folder = Path(backbone[len(LOCAL_PREFIX) :])
        if not folder.is_dir():
            raise ModelError(f"model.backbone={backbone}: {folder} is not a folder")
        return folder
    return None


def _is_timm_folder(folder: Path) -> bool:
    """A timm folder's config.json names an ``architecture``; an expreg one has ``model_type: expreg``."""
    return _read_folder_config(folder).get("model_type") != "expreg"


def _read_folder_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON model config ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: a model config must be a JSON object")
    return raw


def folder_spec(folder: str | Path) -> dict:
    """``{"architecture", "model_args", "pretrained_cfg"}`` of a timm model folder's ``config.json``.

    Raises:
        ModelError: No config.json, no weights file, no or an unknown ``architecture``.
    """
    import timm
    from timm.models._hub import _parse_model_cfg

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a timm model folder (no config.json); {_LAYOUT}")
    raw = _read_folder_config(folder)
    if "architecture" not in raw and "architecture" not in raw.get("pretrained_cfg", {}):
        raise ModelError(f"{folder / 'config.json'}: no 'architecture' (the timm model name); {_LAYOUT}")
    try:
        pretrained_cfg, architecture, model_args = _parse_model_cfg(raw, {})
    except (KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"{folder / 'config.json'}: not a timm model config ({type(err).__name__}: {err})") from err
    if not timm.is_model(architecture):
        raise ModelError(
            f"{folder / 'config.json'}: unknown architecture {architecture!r} in timm {timm.__version__} "
            "(a newer timm may have it; see timm.list_models())"
        )
    if weights_file(folder) is None:
        raise ModelError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)}); {_LAYOUT}")
    return _clean_spec(architecture, model_args, pretrained_cfg)


_LAYOUT = "expected the hf-hub timm layout: config.json (architecture, model_args, pretrained_cfg) + " + " or ".join(
    WEIGHT_FILES
)


def weights_file(folder: Path) -> Path | None:
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    return found[0] if found else None


def _clean_spec(architecture: str, model_args: dict, pretrained_cfg: dict) -> dict:
    """A JSON-safe record: where the weights came from is left out (the saved model holds the weights)."""
    cfg = {k: v for k, v in dict(pretrained_cfg).items() if k not in _PATH_FIELDS}
    cfg = json.loads(json.dumps(cfg, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))
    return {"architecture": architecture, "model_args": dict(model_args or {}), "pretrained_cfg": cfg}


def load_encoder_folder(folder: str | Path, image_size: int, encoder_args: dict | None = None) -> nn.Module:
    """Build a timm model folder's encoder offline and load its weights, strictly.

    timm's checkpoint filter for the architecture adapts the weights (e.g. a ViT's position
    embedding resampled to ``image_size``); the classifier is dropped. Every other tensor of the
    model must be in the file with its shape, and the file may hold nothing else: timm's own
    loading, when the classifier is dropped, would keep a missing tensor at its random
    initialisation without an error.

    Raises:
        ModelError: Not a timm folder, or weights that do not fit (the message names the tensors).
    """
    folder = Path(folder)
    spec = folder_spec(folder)
    spec["model_args"].update(encoder_args or {})
    path = weights_file(folder)
    try:
        backbone = _build(spec["architecture"], image_size, spec, pretrained=False)
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ModelError(
            f"{folder / 'config.json'}: timm cannot build {spec['architecture']} with {spec['model_args']}: {err}"
        ) from err
    state = _filtered(_read_weights(path), backbone, spec, path)
    _check_tensors(backbone, state, spec, path)
    backbone.load_state_dict(state, strict=True)
    logger.info(f"encoder {spec['architecture']} loaded offline from {folder} ({len(state)} tensors)")
    return _with_spec(backbone, spec)


def _read_weights(path: Path) -> dict:
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and zip errors have no common base
        details = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = f"{type(err).__name__}: {details[0] if details else ''}"
        raise ModelError(f"{path}: cannot read the weights ({reason})") from err


def _filtered(state: dict, backbone: nn.Module, spec: dict, path: Path) -> dict:
    """timm's checkpoint filter of the architecture, then without the classifier the folder's model had."""
    import importlib

    import timm

    module = importlib.import_module(timm.models.model_entrypoint(spec["architecture"]).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, backbone)
        except Exception as err:  # noqa: BLE001 - filters raise shape errors of any kind
            raise ModelError(
                f"{path}: the weights do not fit {spec['architecture']}: {type(err).__name__}: {err}"
            ) from err
    classifier = spec["pretrained_cfg"].get("classifier") or ("head", "fc", "classifier")
    heads = tuple(f"{h}." for h in ((classifier,) if isinstance(classifier, str) else classifier))
    own = backbone.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.startswith(heads)}


def _check_tensors(backbone: nn.Module, state: dict, spec: dict, path: Path) -> None:
    """``ModelError`` naming the first tensors whose shape differs, that are missing, or that are extra."""
    own = backbone.state_dict()
    built = f"{spec['architecture']} as config.json (and model.encoder_args) build it, model_args {spec['model_args']}"
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ModelError(
                f"{path}: the weights do not fit {built}: size mismatch for {key}: {tuple(value.shape)} in the "
                f"file, {tuple(own[key].shape)} in the model"
            )
    missing, extra = set(own) - set(state), set(state) - set(own)
    for kind, keys in (("the model has but the file lacks", missing), ("the file has but the model lacks", extra)):
        if keys:
            listed = ", ".join(sorted(keys)[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            raise ModelError(f"{path}: the weights do not fit {built}: tensors {kind}: {listed}")


def _build(name: str, image_size: int, spec: dict | None, pretrained: bool, **kwargs) -> nn.Module:
    """``timm.create_model`` with the spec's arguments, built for ``image_size`` where the architecture
    has a fixed input size (ViTs); most CNNs take any size and have no ``img_size`` argument."""
    import timm

    args = _resolve_layers({**(spec or {}).get("model_args", {}), "num_classes": 0, **kwargs})
    if spec:
        args["pretrained_cfg"] = dict(spec.get("pretrained_cfg") or {})
    try:
        return timm.create_model(name, pretrained=pretrained, **{**args, "img_size": image_size})
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return timm.create_model(name, pretrained=pretrained, **args)


# names a config.json or model.encoder_args may give for timm's MLP blocks (classes cannot be JSON)
MLP_LAYERS = {
    "mlp": "Mlp",
    "swiglu": "SwiGLU",
    "swiglu_packed": "SwiGLUPacked",
    "glu_mlp": "GluMlp",
    "gated_mlp": "GatedMlp",
}


def _resolve_layers(args: dict) -> dict:
    """``mlp_layer`` given by name becomes timm's class (``act_layer`` / ``norm_layer`` names timm resolves itself)."""
    import timm.layers

    name = args.get("mlp_layer")
    if not isinstance(name, str):
        return args
    key = name.lower().replace("-", "_")
    if key not in MLP_LAYERS and name not in MLP_LAYERS.values():
        raise ModelError(f"mlp_layer {name!r}: not one of {', '.join(MLP_LAYERS)}")
    return {**args, "mlp_layer": getattr(timm.layers, MLP_LAYERS.get(key, name))}


def _with_spec(backbone: nn.Module, spec: dict) -> nn.Module:
    backbone.expreg_spec = spec
    return backbone


def _from_timm_name(config, pretrained: bool, pretrained_path: str | None, encoder_args: dict) -> nn.Module:
    import timm

    kwargs: dict = dict(encoder_args)
    if pretrained_path is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_path)}
        pretrained = True
    try:
        backbone = _build(config.backbone, config.image_size, None, pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelError(
                f"unknown timm backbone {config.backbone!r} (timm {timm.__version__}); see timm.list_models() for names"
            ) from err
        if not pretrained:
            raise
        raise _weights_error(config.backbone, pretrained_path, err) from err
    except (OSError, ValueError) as err:  # hub offline / unreachable, missing local file
        if not pretrained and not config.backbone.startswith(HUB_PREFIX):
            raise
        raise _weights_error(config.backbone, pretrained_path, err) from err
    except TypeError as err:  # e.g. a model.encoder_args name the architecture does not take
        raise ModelError(
            f"timm cannot build {config.backbone!r} with model.encoder_args {encoder_args}: {err}"
        ) from err
    spec = _spec_of(config.backbone, backbone)
    spec["model_args"].update(encoder_args)
    return _with_spec(backbone, spec)


def _spec_of(name: str, backbone: nn.Module) -> dict:
    """The record that rebuilds ``backbone`` offline (an ``hf-hub:`` name's config is in the HF cache by now)."""
    pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    if name.startswith(HUB_PREFIX):
        from timm.models._hub import load_model_config_from_hf

        pretrained_cfg, architecture, model_args = load_model_config_from_hf(name[len(HUB_PREFIX) :])
        return _clean_spec(architecture, model_args, pretrained_cfg)
    return _clean_spec(pretrained_cfg.get("architecture", name.split(".")[0]), {}, pretrained_cfg)


def _backbone_from_saved_model(config, folder: Path) -> nn.Module:
    """The backbone of an expreg ``save_pretrained`` folder (e.g. another run's checkpoints/best)."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{folder}: not a save_pretrained folder (no model.safetensors); {_LAYOUT}")
    prefix = "backbone."
    state = {k[len(prefix) :]: v for k, v in load_file(str(weights)).items() if k.startswith(prefix)}
    if not state:
        raise ModelError(f"{weights}: no backbone weights (keys starting with {prefix!r})")
    saved = _read_folder_config(folder).get("backbone_config")
    backbone = _build(saved["architecture"] if saved else config.backbone, config.image_size, saved, False)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(
            f"{weights}: its backbone does not fit the architecture its config.json records: {str(err).splitlines()[0]}"
        ) from err
    return _with_spec(backbone, saved or _spec_of(config.backbone, backbone))


def _weights_error(backbone: str, path: str | None, err: Exception) -> ModelError:
    if path is not None:
        return ModelError(f"could not load local weights {path} for backbone {backbone!r}: {err}")
    return ModelError(
        f"could not fetch pretrained weights (or the config) of {backbone!r} ({type(err).__name__}: {str(err).splitlines()[0]}). "
        "Without network access, download the model folder elsewhere (config.json + model.safetensors) and set "
        "model.pretrained_path=/path/to/that/folder, or a timm checkpoint file; or model.pretrained=false."
    )


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------


def native_pooling(backbone: nn.Module) -> str | None:
    """The pooling a token model (a ViT) does itself, in our names; None for others (CNNs pool by their head)."""
    pool = getattr(backbone, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return _TIMM_POOL.get(pool) if isinstance(pool, str) else None


def _token_model(backbone: nn.Module) -> bool:
    """A model whose features are tokens with a class/register prefix count (timm's ViT family)."""
    return _prefix_tokens(backbone) is not None


def check_pooling(backbone: nn.Module, pooling: str | None) -> None:
    """``ModelError`` when the backbone cannot pool this way (``cls`` needs a class token)."""
    if pooling is None or pooling == native_pooling(backbone):
        return
    if pooling not in POOLINGS:
        raise ModelError(f"model.pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    if pooling in ("cls", "cls+mean") and getattr(backbone, "cls_token", None) is None:
        raise ModelError(
            f"model.pooling={pooling} needs a class token (a ViT); {type(backbone).__name__} has none: use avg"
        )


def _prefix_tokens(backbone: nn.Module) -> int | None:
    count = getattr(backbone, "num_prefix_tokens", None)
    return int(count) if count is not None else None


def pooled_features(backbone: nn.Module, pooling: str | None) -> int:
    """The width of the pooled embedding."""
    width = int(backbone.num_features)
    return 2 * width if pooling == "cls+mean" else width


def pool(backbone: nn.Module, pixel_values: torch.Tensor, pooling: str | None) -> torch.Tensor:
    """``(batch, pooled_features)`` embeddings of ``pixel_values``.

    The backbone's own forward where it already pools as asked: always for ``None``, for a model
    that is not a token model (a CNN's global average pool, wherever its timm class keeps it), and
    for a ViT whose timm pooling is the one asked for. Otherwise from a ViT's tokens: the class
    token and the mean of the patch tokens (class and register tokens left out), each through the
    ViT's ``fc_norm`` when it has one (timm ViTs built for average pooling normalise after pooling).
    """
    if pooling is None or pooling == native_pooling(backbone) or not _token_model(backbone):
        return backbone(pixel_values)
    tokens = backbone.forward_features(pixel_values)  # (B, N, D)
    norm = getattr(backbone, "fc_norm", None) or nn.Identity()
    patch_mean = norm(tokens[:, _prefix_tokens(backbone) :].mean(dim=1))
    if pooling == "avg":
        return patch_mean
    if pooling == "cls":
        return norm(tokens[:, 0])
    return torch.cat([norm(tokens[:, 0]), patch_mean], dim=1)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of ``module`` (names, shapes, dtypes and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
