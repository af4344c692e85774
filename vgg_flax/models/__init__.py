"""The VGG networks: the config table and layer names (configs), the layers, the heads and the `VGG`
module with its builders (vgg).

Where to add things (one place each):
  a layer config (a column of the paper's Table 1)   `CONFIGS` (and `CONFIG_ALIASES`) in configs.py
  a head                                              a function and a `Head` row of `HEAD_SPECS`
                                                      in heads.py
  a builder / variant (e.g. "vgg13_lrn")              a row of `VARIANTS` in vgg.py; `get_model`,
                                                      `MODELS` and `vgg-flax models` read it
Models are saved and rebuilt through `VGG.to_config` / `VGG.from_config` (training checkpoints,
`save_pretrained` files, conversion), the only schema.
"""

from vgg_flax.models.configs import (
    CONFIG_ALIASES,
    CONFIGS,
    FC_POOL_SIZE,
    bn_name,
    is_conv_layer,
    is_feature_layer,
    is_pool_layer,
    last_width,
    layer_names,
    parse_config,
    relu_name,
    resolve_config,
    stage_name,
)
from vgg_flax.models.heads import (
    CLASSIFIER_LAYERS,
    HEAD_SPECS,
    HEADS,
    Head,
    classifier_in,
    classifier_layer,
    get_head,
)
from vgg_flax.models.layers import DenseAsConv, adaptive_avg_pool, local_response_norm
from vgg_flax.models.vgg import (
    CONFIG_FIELDS,
    DTYPES,
    MODELS,
    PYRAMID_TAPS,
    VARIANTS,
    VGG,
    count_params,
    get_model,
)

globals().update(MODELS)  # the builders vgg11 ... vgg19_bn, one per VARIANTS row

__all__ = [
    "CLASSIFIER_LAYERS", "CONFIG_ALIASES", "CONFIG_FIELDS", "CONFIGS", "FC_POOL_SIZE", "HEAD_SPECS",
    "HEADS", "Head", "MODELS", "PYRAMID_TAPS", "VARIANTS", "VGG", "DenseAsConv", "adaptive_avg_pool",
    "bn_name", "classifier_in", "classifier_layer", "count_params", "get_head", "get_model",
    "is_conv_layer", "is_feature_layer", "is_pool_layer", "last_width", "layer_names",
    "local_response_norm", "parse_config", "relu_name", "resolve_config", "stage_name", "DTYPES",
    *MODELS,
]
