"""vgg-flax: the VGG family (Simonyan & Zisserman, 2014) in JAX/Flax, exact to torchvision."""

from vgg_flax.convert import (
    ConversionError,
    from_pretrained,
    list_pretrained,
    load_pretrained,
    load_torchvision,
    load_weights,
    save_pretrained,
    to_torchvision,
)
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
)

globals().update(MODELS)  # the builders vgg11 ... vgg19_bn, one per row of models.VARIANTS

from vgg_flax import explain, nnx, perceptual  # noqa: E402, I001  (the research faces: vgg_flax.nnx.vgg16, ...)

__version__ = "0.1.0"

__all__ = [
    "CONFIGS", "HEADS", "MODELS", "PYRAMID_TAPS", "VGG", "adaptive_avg_pool", "count_params",
    "get_model", "local_response_norm", *MODELS,
    "ConversionError", "from_pretrained", "list_pretrained", "load_torchvision", "to_torchvision",
    "load_pretrained", "load_weights", "save_pretrained", "nnx", "perceptual", "explain",
]
