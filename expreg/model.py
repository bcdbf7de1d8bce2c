"""The documented import path of the model (``from expreg.model import ExpRegModel``); it lives in
``expreg.modeling.model``. Importing either registers the ``expreg`` model type with ``AutoModel``."""

from expreg.modeling.model import (  # noqa: F401 - re-exported
    ExpRegConfig,
    ExpRegModel,
    ExpRegOutput,
    ExpRegPreTrainedModel,
    ModelError,
    build_model,
    create_backbone,
)
