"""vgg-flax: the VGG family (Simonyan & Zisserman, 2014) in JAX/Flax, exact to torchvision."""

from vgg_flax.convert import load_torchvision, to_torchvision
from vgg_flax.models import (
    CONFIGS,
    HEADS,
    MODELS,
    PYRAMID_TAPS,
    VGG,
    adaptive_avg_pool,
    count_params,
    get_model,
    local_response_norm,
    vgg11,
    vgg11_bn,
    vgg11_lrn,
    vgg13,
    vgg13_bn,
    vgg16,
    vgg16_bn,
    vgg16_c,
    vgg19,
    vgg19_bn,
)
from vgg_flax.weights import ConversionError, load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CONFIGS", "HEADS", "MODELS", "PYRAMID_TAPS", "VGG", "adaptive_avg_pool", "count_params",
    "get_model", "local_response_norm", "vgg11", "vgg11_bn", "vgg11_lrn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg16_c", "vgg19", "vgg19_bn",
    "ConversionError", "load_torchvision", "to_torchvision", "load_pretrained", "save_pretrained",
]
