"""Noisy Student self-training for PyTorch (timm models, webdataset shards, accelerate)."""

__version__ = "0.1.0"
