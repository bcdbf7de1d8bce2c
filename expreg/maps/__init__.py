"""Whole-slide expression maps (``python -m expreg.map``): tissue, tiles, sharded prediction, outputs, pictures."""
