"""Weights in and out: torchvision/timm conversion, safe file readers, the project's weights format."""

from vgg_flax.convert.torchvision import convert_file, load_torchvision, to_torchvision
from vgg_flax.convert.weights import ConversionError, load_pretrained, save_pretrained

__all__ = ["ConversionError", "convert_file", "load_pretrained", "load_torchvision", "save_pretrained",
           "to_torchvision"]
