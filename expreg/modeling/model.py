"""``ExpRegConfig`` / ``ExpRegModel``: a timm backbone plus a regression head as a transformers model.

Saved with ``save_pretrained`` (safetensors + ``config.json`` holding the backbone name, gene
names and the training-split target normalisation) and loaded with ``from_pretrained`` or
``AutoModel.from_pretrained`` once ``expreg`` is imported (registered below, no remote code).

Why not transformers' ``TimmWrapperModel``: its config is timm's hub format (architecture +
classification labels), it has no regression head or target normalisation, and its
``_init_weights`` re-initialises timm layers (30 of resnet18's 122 tensors). Here the backbone
keeps timm's own initialisation and ``_init_weights`` only rebuilds non-persistent buffers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from expreg.modeling.encoders import ModelError, check_pooling, create_backbone, pool, pooled_features

__all__ = ["ExpRegConfig", "ExpRegModel", "ExpRegOutput", "ModelError", "build_model", "create_backbone"]


CONTEXT_VIEWS = {"none": 1, "multiscale": 2, "neighbourhood": 1}  # images per sample, 3 channels each
CONTEXT_PARTS = {"none": 1, "multiscale": 2, "neighbourhood": 2}  # pooled features the head reads, side by side
CONTEXT_ENCODERS = ("shared", "separate")
FUSIONS = ("concat", "gated")


class ExpRegConfig(PretrainedConfig):
    """Configuration of an ``ExpRegModel``.

    Args:
        backbone: Any ``timm.create_model`` name, including ``hf-hub:org/name``.
        num_genes: Number of regression outputs K.
        head: ``"linear"`` or ``"mlp"`` (Linear -> GELU -> Dropout -> Linear).
        head_hidden_dim: Hidden width of the MLP head.
        dropout: Dropout before the head (and inside the MLP head).
        gene_names: One name per output.
        target_mean: Per-gene mean of the training targets (expression units).
        target_std: Per-gene std of the training targets; predictions are ``z * std + mean``.
        image_size: Input side length used in training.
        image_mean: Normalisation mean of the input pixels.
        image_std: Normalisation std of the input pixels.
        patch_um: Physical side of the training patches in µm (None: unknown); with ``image_size``
            it gives the resolution the model was trained at (``patch_um / image_size`` µm per input
            pixel), which whole-slide maps need.
        patch_px: Side of the training patch files in pixels (None: unknown).
        target_transform: How the targets were made from raw counts (``"log1p_cpm"``, ``"log1p"``,
            ``"none"``) when training computed them from an expression file; None: unknown (targets
            given in a CSV). ``expreg.map --measured`` transforms measured counts the same way.
        backbone_config: What rebuilds the backbone with no network (``expreg.modeling.encoders``):
            ``{"architecture", "model_args", "pretrained_cfg"}``; None in models saved before it existed.
        pooling: ``"avg"``, ``"cls"`` or ``"cls+mean"`` (``expreg.modeling.encoders.pool``); None: the
            backbone's own timm pooling (models saved before it existed).
        image_interpolation: The encoder's own resize interpolation (from its ``pretrained_cfg``), recorded
            for reference; expreg resizes bilinearly, and not at all when the patches have the input size.
        encoder_source: Where the encoder's weights came from (a timm name, ``hf-hub:`` id or local folder).
        context: ``"none"`` (the spot's patch alone), ``"multiscale"``: the input holds the patch and a
            context patch of the same pixel size centred on the same spot (channels 0-2 and 3-5), both
            embedded and the head reads the two pooled features side by side; or ``"neighbourhood"``: the
            head reads the spot's embedding beside the mean embedding of the spots of its section within
            ``neighbourhood_um`` (``forward(..., neighbourhood=...)``; ``expreg.data.neighbours``).
        context_um: Physical side of the context patches in µm (multiscale; None: unknown).
        context_encoder: ``"shared"`` (one encoder embeds the patch and its context patch) or ``"separate"``
            (a second encoder, initialised as the first, embeds the context patches; multiscale only).
        fusion: How the head reads the two parts (multiscale, neighbourhood): ``"concat"`` (side by side)
            or ``"gated"`` (the context part scaled per feature by ``sigmoid(W [own; context] + b)``, which
            starts at 0.5 and learns how much of the context to let through).
        neighbourhood_um: Radius of a spot's neighbourhood in µm (neighbourhood), as used in training.
    """

    model_type = "expreg"

    def __init__(
        self,
        backbone: str = "resnet18",
        num_genes: int = 50,
        head: str = "linear",
        head_hidden_dim: int = 256,
        dropout: float = 0.0,
        gene_names: list[str] | None = None,
        target_mean: list[float] | None = None,
        target_std: list[float] | None = None,
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        patch_um: float | None = None,
        patch_px: int | None = None,
        target_transform: str | None = None,
        backbone_config: dict | None = None,
        pooling: str | None = None,
        image_interpolation: str | None = None,
        encoder_source: str | None = None,
        context: str = "none",
        context_um: float | None = None,
        context_encoder: str = "shared",
        fusion: str = "concat",
        neighbourhood_um: float | None = None,
        **kwargs,
    ) -> None:
        self.backbone = backbone
        self.num_genes = num_genes
        self.head = head
        self.head_hidden_dim = head_hidden_dim
        self.dropout = dropout
        self.gene_names = list(gene_names) if gene_names is not None else [f"y{i}" for i in range(num_genes)]
        self.target_mean = list(target_mean) if target_mean is not None else [0.0] * num_genes
        self.target_std = list(target_std) if target_std is not None else [1.0] * num_genes
        self.image_size = image_size
        self.image_mean = list(image_mean) if image_mean is not None else [0.485, 0.456, 0.406]
        self.image_std = list(image_std) if image_std is not None else [0.229, 0.224, 0.225]
        self.patch_um = patch_um
        self.patch_px = patch_px
        self.target_transform = target_transform
        self.backbone_config = backbone_config
        self.pooling = pooling
        self.image_interpolation = image_interpolation
        self.encoder_source = encoder_source
        self.context = context
        self.context_um = context_um
        self.context_encoder = context_encoder
        self.fusion = fusion
        self.neighbourhood_um = neighbourhood_um
        _check_context(context, context_encoder, fusion)
        for name in ("gene_names", "target_mean", "target_std"):
            if len(getattr(self, name)) != num_genes:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for num_genes={num_genes}")
        super().__init__(**kwargs)


def _check_context(context: str, context_encoder: str, fusion: str) -> None:
    for name, value, choices in (
        ("context", context, CONTEXT_VIEWS),
        ("context_encoder", context_encoder, CONTEXT_ENCODERS),
        ("fusion", fusion, FUSIONS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if context_encoder == "separate" and context != "multiscale":
        raise ValueError("context_encoder=separate needs context=multiscale (a second encoder for the context patch)")
    if fusion == "gated" and context == "none":
        raise ValueError("fusion=gated fuses a spot's features with its context's: it needs a context")


def masked_mse(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labels that were measured: a NaN label (a gene the spot's sample did
    not measure, ``data.allow_unmeasured_genes``) adds nothing to the loss or its gradient."""
    measured = ~torch.isnan(labels)
    if bool(measured.all()):  # the usual case: exactly nn.functional.mse_loss
        return nn.functional.mse_loss(predictions, labels)
    squared = torch.where(measured, predictions - torch.nan_to_num(labels), torch.zeros_like(predictions)) ** 2
    return squared.sum() / measured.sum().clamp(min=1)


@dataclass
class ExpRegOutput(ModelOutput):
    """Output of ``ExpRegModel``.

    Args:
        loss: MSE between ``predictions`` and the (normalised) ``labels``, when labels are given; a
            NaN label (a gene the spot's sample did not measure) is left out.
        predictions (`torch.FloatTensor` of shape `(batch_size, num_genes)`): normalised
            predictions (z-scores); ``ExpRegModel.to_expression`` maps them to expression units.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None


class ExpRegPreTrainedModel(PreTrainedModel):
    config_class = ExpRegConfig
    base_model_prefix = "expreg"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        # Keep timm's and torch's own initialisation: transformers' default would overwrite conv
        # and norm weights. Non-persistent buffers are not in checkpoints: rebuild them.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()


class ExpRegModel(ExpRegPreTrainedModel):
    """A timm backbone with a regression head for ``num_genes`` outputs."""

    def __init__(self, config: ExpRegConfig, backbone: nn.Module | None = None) -> None:
        super().__init__(config)
        self.backbone = backbone if backbone is not None else create_backbone(config)
        check_pooling(self.backbone, config.pooling)
        if getattr(config, "context_encoder", "shared") == "separate":  # the context patches' own encoder
            self.context_backbone = copy.deepcopy(self.backbone)
        width = pooled_features(self.backbone, config.pooling)
        features = width * CONTEXT_PARTS[config.context]
        if getattr(config, "fusion", "concat") == "gated":
            self.fusion_gate = nn.Linear(features, width)
            nn.init.zeros_(self.fusion_gate.weight)  # the gate starts at sigmoid(0) = 0.5 for every feature
            nn.init.zeros_(self.fusion_gate.bias)
        self.dropout = nn.Dropout(config.dropout)
        if config.head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(features, config.head_hidden_dim),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.head_hidden_dim, config.num_genes),
            )
        else:
            self.head = nn.Linear(features, config.num_genes)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        neighbourhood: torch.Tensor | None = None,
        **kwargs,
    ) -> ExpRegOutput:
        """Predict normalised expression.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): normalised images
                (6 channels for a multiscale model: the patch, then its context patch).
            labels (`torch.FloatTensor` of shape `(batch_size, num_genes)`, *optional*): normalised targets.
            neighbourhood (`torch.FloatTensor` of shape `(batch_size, features)`): a neighbourhood model's
                mean ``embed`` of each spot's neighbourhood (``expreg.data.neighbours``); other models take none.

        Returns:
            ``ExpRegOutput`` with ``predictions`` and, given labels, ``loss`` (MSE, computed in float32).
        """
        features = self.embed(pixel_values)
        if self.config.context == "neighbourhood":
            if neighbourhood is None:
                raise ValueError(
                    "this model reads each spot's neighbourhood (context=neighbourhood): pass neighbourhood=<the mean "
                    "embed() of the spot's neighbours>, or predict a section's spots together with expreg.predict "
                    "(a CSV with positions) or expreg.map"
                )
            features = torch.cat([features, neighbourhood.to(features.dtype)], dim=1)
        elif neighbourhood is not None:
            raise ValueError(
                f"neighbourhood= is for context=neighbourhood models; this one is context={self.config.context}"
            )
        return self.forward_head(features, labels)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled encoder embedding ``(batch_size, features)`` of the images (multiscale: the patch's and the
        context patch's, side by side; one shared encoder embeds both in one batch, or each has its own)."""
        views = CONTEXT_VIEWS[self.config.context]
        if pixel_values.shape[1] != 3 * views:
            raise ValueError(
                f"this model takes {3 * views} input channels (context={self.config.context}), got "
                f"pixel_values of shape {tuple(pixel_values.shape)}"
            )
        pooling = self.config.pooling
        if views == 1:
            return pool(self.backbone, pixel_values, pooling)
        if hasattr(self, "context_backbone"):
            patch, context = pixel_values.split(3, dim=1)
            return torch.cat([pool(self.backbone, patch, pooling), pool(self.context_backbone, context, pooling)], 1)
        stacked = torch.cat(pixel_values.split(3, dim=1), dim=0)  # (views x batch, 3, H, W)
        return torch.cat(pool(self.backbone, stacked, pooling).chunk(views, dim=0), dim=1)

    def forward_head(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> ExpRegOutput:
        """The head on the features it reads (``embed``'s output, and a neighbourhood model's neighbourhood mean
        beside it): what ``train.mode=frozen`` trains on cached embeddings."""
        predictions = self.head(self.dropout(self.fuse(features)))
        loss = None
        if labels is not None:
            loss = masked_mse(predictions.float(), labels.float())
        return ExpRegOutput(loss=loss, predictions=predictions)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """``[own, context]`` as the head reads it: unchanged (``fusion=concat``) or ``[own, gate * context]``
        with ``gate = sigmoid(fusion_gate([own, context]))`` per feature (``fusion=gated``)."""
        if not hasattr(self, "fusion_gate"):
            return features
        own, context = features.chunk(2, dim=1)
        return torch.cat([own, torch.sigmoid(self.fusion_gate(features)) * context], dim=1)

    def to_expression(self, predictions: torch.Tensor | np.ndarray):
        """Map normalised predictions back to expression units with the stored training statistics."""
        if isinstance(predictions, torch.Tensor):
            mean = torch.tensor(self.config.target_mean, dtype=predictions.dtype, device=predictions.device)
            std = torch.tensor(self.config.target_std, dtype=predictions.dtype, device=predictions.device)
            return predictions * std + mean
        out = np.asarray(predictions) * np.asarray(self.config.target_std)  # float64 (the statistics are)
        out += np.asarray(self.config.target_mean)  # in place: one array of rows x genes, not two
        return out

    @torch.inference_mode()
    def predict_expression(
        self, pixel_values: torch.Tensor, neighbourhood: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predictions in expression units, shape ``(batch_size, num_genes)`` (``neighbourhood``: as ``forward``)."""
        return self.to_expression(self(pixel_values, neighbourhood=neighbourhood).predictions.float())


def build_model(
    backbone: str,
    num_genes: int,
    *,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    encoder_args: dict | None = None,
    **config_kwargs,
) -> ExpRegModel:
    """A new model for training; loads pretrained backbone weights when asked.

    ``encoder_args`` are added to the backbone's architecture arguments (``create_backbone``).
    The config records what rebuilds the backbone offline (``backbone_config``) and, unless given,
    the encoder's own preprocessing (mean, std, interpolation from timm's data config).
    """
    import timm

    config = ExpRegConfig(backbone=backbone, num_genes=num_genes, **config_kwargs)
    backbone_module = create_backbone(config, pretrained, pretrained_path, encoder_args)
    spec = backbone_module.expreg_spec
    config.backbone_config = spec
    config.backbone = spec["architecture"] if _is_path_source(backbone, pretrained_path) else backbone
    config.encoder_source = str(pretrained_path) if pretrained_path is not None else backbone
    data_config = timm.data.resolve_model_data_config(backbone_module)
    if "image_mean" not in config_kwargs:  # the backbone's own normalisation
        config.image_mean, config.image_std = list(data_config["mean"]), list(data_config["std"])
    config.image_interpolation = data_config.get("interpolation")
    return ExpRegModel(config, backbone=backbone_module)


def _is_path_source(backbone: str, pretrained_path: str | None) -> bool:
    """A local folder names the encoder: the config records its architecture, not the path."""
    from pathlib import Path

    return backbone.startswith("local-dir:") or (pretrained_path is not None and Path(pretrained_path).is_dir())


AutoConfig.register("expreg", ExpRegConfig)
AutoModel.register(ExpRegConfig, ExpRegModel)
