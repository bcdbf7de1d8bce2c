"""The model: ``ExpRegConfig``/``ExpRegModel`` (a timm backbone and a regression head as a transformers
model), its model card and the Hub push. Reads no recipe: callers pass plain arguments."""
