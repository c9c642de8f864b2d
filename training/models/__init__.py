"""Torch modules trained by ``training.train`` and exported by ``training.export``."""

from .cnn1d import Cnn1d, count_parameters

__all__ = ["Cnn1d", "count_parameters"]
