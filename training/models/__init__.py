"""Torch modules trained by ``training.train`` and exported by ``training.export``."""

from ecgbridge.training.models.cnn1d import Cnn1d, count_parameters
from ecgbridge.training.models.resnet_se import ResNetSE1d

__all__ = ["Cnn1d", "ResNetSE1d", "count_parameters"]
