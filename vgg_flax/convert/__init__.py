"""Weights in and out: the converter engine and one rules module per source (torchvision, timm,
Keras), safe file readers, downloads, the registry, the project's weights format."""

from vgg_flax.convert.engine import convert_file, load_torchvision, load_weights, to_torchvision
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.format import load_pretrained, pretrained_metadata, save_pretrained
from vgg_flax.convert.pretrained import from_pretrained, list_pretrained

__all__ = ["ConversionError", "convert_file", "from_pretrained", "list_pretrained", "load_pretrained",
           "load_torchvision", "load_weights", "pretrained_metadata", "save_pretrained", "to_torchvision"]
