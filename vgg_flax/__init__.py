"""vgg-flax: the VGG family (Simonyan & Zisserman, 2014) in JAX/Flax, exact to torchvision."""

from vgg_flax import explain
from vgg_flax.convert import (
    ConversionError,
    from_pretrained,
    list_pretrained,
    load_pretrained,
    load_torchvision,
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

__version__ = "0.1.0"

# Modules that moved into subpackages, still reachable as `vgg_flax.<old name>` attributes.
_MOVED = {
    "checkpoints": "vgg_flax.train.checkpoints", "conv": "vgg_flax.ops.conv",
    "input_pipeline": "vgg_flax.data.pipeline", "metrics_log": "vgg_flax.train.metrics_log",
    "optim": "vgg_flax.train.optim", "steps": "vgg_flax.train.steps",
    "torch_check": "vgg_flax.convert.torch_check", "training": "vgg_flax.train.loop",
    "warm_start": "vgg_flax.train.warm_start", "weights": "vgg_flax.convert.weights",
    # Faces imported on first use (not moved): vgg_flax.nnx, vgg_flax.perceptual.
    "nnx": "vgg_flax.nnx", "perceptual": "vgg_flax.perceptual",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'vgg_flax' has no attribute {name!r}")

__all__ = [
    "CONFIGS", "HEADS", "MODELS", "PYRAMID_TAPS", "VGG", "adaptive_avg_pool", "count_params",
    "get_model", "local_response_norm", "vgg11", "vgg11_bn", "vgg11_lrn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg16_c", "vgg19", "vgg19_bn",
    "ConversionError", "from_pretrained", "list_pretrained", "load_torchvision", "to_torchvision",
    "load_pretrained", "save_pretrained", "explain",
]
