"""Weights in and out: torchvision/timm conversion, safe file readers, the project's weights format."""

from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.format import load_pretrained, pretrained_metadata, save_pretrained
from vgg_flax.convert.pretrained import from_pretrained, list_pretrained
from vgg_flax.convert.torchvision import convert_file, load_torchvision, to_torchvision

__all__ = ["ConversionError", "convert_file", "from_pretrained", "list_pretrained", "load_pretrained",
           "load_torchvision", "pretrained_metadata", "save_pretrained", "to_torchvision"]
