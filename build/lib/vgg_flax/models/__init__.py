"""The VGG networks: the config table, the layers, the heads and the `VGG` module with its builders."""

from vgg_flax.models.vgg import (
    CONFIG_ALIASES,
    CONFIGS,
    FC_POOL_SIZE,
    HEADS,
    MODELS,
    PYRAMID_TAPS,
    VGG,
    DenseAsConv,
    adaptive_avg_pool,
    count_params,
    get_model,
    layer_names,
    local_response_norm,
    resolve_config,
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

__all__ = [
    "CONFIG_ALIASES", "CONFIGS", "FC_POOL_SIZE", "HEADS", "MODELS", "PYRAMID_TAPS", "VGG", "DenseAsConv",
    "adaptive_avg_pool", "count_params", "get_model", "layer_names", "local_response_norm",
    "resolve_config", "vgg11", "vgg11_bn", "vgg11_lrn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
    "vgg16_c", "vgg19", "vgg19_bn",
]
