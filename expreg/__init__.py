"""expreg: gene expression regression from histology patches."""

__version__ = "0.1.0"
