"""ssvit-bench: one shared training core for semi-supervised ViT methods."""
__version__ = "0.1.0"
