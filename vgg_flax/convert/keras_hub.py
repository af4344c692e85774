"""keras-hub's VGG (`keras_hub.models.VGGBackbone` / `VGGImageClassifier`) and its preset directories.

A preset is the directory `task.save_to_preset(dir)` writes (keras-hub 0.32,
`keras_hub/src/models/vgg/`), read with h5py and json only:

    config.json        the backbone: stackwise_num_repeats, stackwise_num_filters (-> our config)
    model.weights.h5   the backbone, Keras 3 layout: layers/conv2d, conv2d_1, ... each vars group
                       carrying its layer's name (`block{b}_conv{k}`), read by `keras.read_h5`
    task.json          the classifier: num_classes, pooling, pooling_hidden_dim (-> fc_width)
    task.weights.h5    its head, nested: layers/sequential/layers/{conv2d, conv2d_1, dense}, named
                       fc1, fc2, predictions
    preprocessor.json  the image converter: image_size, scale, offset, interpolation (-> our preset)

The head depends on `pooling`. "avg" is timm's ConvMlp (`keras_hub/src/utils/timm/convert_vgg.py`
ports timm's `pre_logits.fc1/fc2` into it): fc1 a 7x7 "valid" Conv2D (7, 7, C, out) and fc2 a 1x1
Conv2D, both with ReLU, a global average pool, then the Dense `predictions`. Its kernels are HWIO,
so they reshape into our fc1/fc2 Dense kernels (the `conv_dense` kind), as timm's do: the
"torchvision" head gives keras-hub's logits at 224x224 (a 7x7 map) and the "dense" head at every
size from 224 up (the mean of fc3 over the map is fc3 of the mean: fc3 is linear). That head is
this module's `LAYOUT`. "flatten" is keras.applications' head (Flatten of the channels-last map,
Dense fc1, fc2, predictions), so it is `keras.LAYOUT`. "max" (a global max pool after fc2) has no
vgg-flax head: only its features load.

The preset's own files fix the architecture, the layout and the preprocessing (`read_preset`), so
nothing is guessed from keys. keras-hub's converter computes `x * scale + offset` on 0-255 pixels;
that is a `vgg_flax.preprocessing` preset when `scale = 1 / (255 * std)` and `offset = -mean / std`
(its VGG presets, converted from timm, carry ImageNet's mean and std: the "torchvision" preset).
Without preprocessor.json (a backbone saved alone) the "torchvision" preset is recorded, with a
warning: it is what keras-hub's published VGG weights expect.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_flax import preprocessing as pp
from vgg_flax.convert import keras
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.rules import Architecture, Layout, Rule
from vgg_flax.models import CONFIGS, FC_POOL_SIZE, classifier_layer, last_width

CONFIG, TASK, PREPROCESSOR = "config.json", "task.json", "preprocessor.json"
BACKBONE_WEIGHTS, TASK_WEIGHTS = "model.weights.h5", "task.weights.h5"
FILES = (CONFIG, BACKBONE_WEIGHTS, TASK, TASK_WEIGHTS, PREPROCESSOR)
_BACKBONE = "VGGBackbone"
# task.json's pooling -> the layout of its head's weights; "max" has no vgg-flax head.
POOLING_LAYOUTS = {"avg": "keras_hub", "flatten": "keras"}
_ACTIVATIONS = (None, "linear", "softmax")  # our logits give keras-hub's outputs (softmax: predict's)
DEFAULT_PREPROCESSING = "torchvision"


def _load_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConversionError(f"{os.path.dirname(path)}: not a keras-hub VGG preset: no "
                              f"{os.path.basename(path)} (`save_to_preset` writes {CONFIG} and "
                              f"{BACKBONE_WEIGHTS})")
    try:
        with open(path, encoding="utf8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _config_of(spec: Any, path: str) -> dict[str, Any]:
    """The "config" of a keras-hub JSON object ({"class_name", "config", ...})."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("config"), Mapping):
        raise ConversionError(f"{path}: not a keras-hub config (no \"config\" object)")
    return spec["config"]


def _preset_dir(path: str) -> tuple[str, bool]:
    """(the preset directory, whether only the backbone is asked for: `path` is its weights file)."""
    if os.path.isdir(path):
        return path, False
    return os.path.dirname(path) or ".", True


def is_preset(path: str | os.PathLike) -> bool:
    """A directory (the only directories weights come in), or a model.weights.h5 beside a
    VGGBackbone's config.json.

    A lone `model.weights.h5` (no config.json beside it) is read as a Keras file (`keras.py`): its
    keys are keras.applications' without a top.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return True
    if os.path.basename(path) != BACKBONE_WEIGHTS:
        return False
    try:
        with open(os.path.join(os.path.dirname(path) or ".", CONFIG), encoding="utf8") as f:
            return json.load(f).get("class_name") == _BACKBONE
    except (OSError, ValueError, AttributeError):
        return False


def backbone_config(spec: Mapping[str, Any], path: str = CONFIG) -> str | tuple:
    """Our config for a VGGBackbone's config.json: a paper letter, or the custom entries.

    Block b holds `stackwise_num_repeats[b]` 3x3 convs of `stackwise_num_filters[b]` and a 2x2 pool
    (`apply_vgg_block`): [2, 2, 3, 3, 3] x [64, 128, 256, 512, 512] is "D".
    """
    if spec.get("class_name") not in (_BACKBONE, None):
        raise ConversionError(f"{path}: a {spec.get('class_name')} preset, not keras-hub's {_BACKBONE}")
    fields = _config_of(spec, path)
    repeats, filters = fields.get("stackwise_num_repeats"), fields.get("stackwise_num_filters")
    if (not isinstance(repeats, list) or not isinstance(filters, list) or len(repeats) != len(filters)
            or not all(isinstance(v, int) and v > 0 for v in repeats + filters)):
        raise ConversionError(f"{path}: stackwise_num_repeats {repeats} and stackwise_num_filters "
                              f"{filters} are not two lists of positive ints of one length")
    entries = tuple(e for n, width in zip(repeats, filters, strict=True) for e in (width,) * n + ("M",))
    return next((name for name, config in CONFIGS.items() if config == entries), entries)


def task_options(spec: Mapping[str, Any], path: str = TASK) -> dict[str, Any]:
    """{"layout", "num_classes", "fc_width"} of a VGGImageClassifier's task.json."""
    fields = _config_of(spec, path)
    pooling = fields.get("pooling", "avg")
    if pooling not in POOLING_LAYOUTS:
        raise ConversionError(f"{path}: pooling {pooling!r} has no vgg-flax head (valid: "
                              f"{sorted(POOLING_LAYOUTS)}); load the features only with head='none'")
    if fields.get("activation") not in _ACTIVATIONS:
        raise ConversionError(f"{path}: activation {fields.get('activation')!r} on the class scores; "
                              f"vgg-flax gives logits, so only {_ACTIVATIONS} convert")
    try:
        return {"layout": POOLING_LAYOUTS[pooling], "num_classes": int(fields["num_classes"]),
                "fc_width": int(fields.get("pooling_hidden_dim", 4096))}
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: no usable num_classes / pooling_hidden_dim ({e!r})") from e


def preset_for(scale: Any, offset: Any, where: str = PREPROCESSOR) -> str:
    """The `vgg_flax.preprocessing` preset computing keras-hub's `x * scale + offset` on 0-255 pixels.

    scale, offset: a float, three (one per RGB channel) or None (1, 0). A preset (not BGR) computes
    `x * (p.scale / p.std) - p.mean / p.std`; they match to 1e-5 relative.
    """
    try:
        a = np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float64), (3,))
        b = np.broadcast_to(np.asarray(0.0 if offset is None else offset, np.float64), (3,))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: scale {scale!r} and offset {offset!r} are not one or three "
                              "numbers") from e
    for name, norm in pp.PRESETS.items():
        std = np.asarray(norm.std, np.float64)
        if (not norm.bgr and np.allclose(norm.scale / std, a, rtol=1e-5, atol=0)
                and np.allclose(-np.asarray(norm.mean) / std, b, rtol=1e-5, atol=1e-7)):
            return name
    std = 1.0 / (255.0 * a)
    mean = np.round(-b * std, 5) + 0.0  # + 0.0: no -0.0
    raise ConversionError(
        f"{where}: scale {scale!r} and offset {offset!r} (on [0, 1] pixels: mean {mean.tolist()}, "
        f"std {np.round(std, 5).tolist()}) are no vgg_flax preset's {sorted(pp.PRESETS)}: pass "
        "preprocessing=NAME (vgg-flax convert --preprocessing NAME)")


def preprocessing_of(directory: str) -> str:
    """The preset of a preset's preprocessor.json; `DEFAULT_PREPROCESSING`, warned, without one."""
    path = os.path.join(directory, PREPROCESSOR)
    if not os.path.isfile(path):
        warnings.warn(f"{directory}: no {PREPROCESSOR}, so no record of the input the weights expect: "
                      f"storing the {DEFAULT_PREPROCESSING!r} preset (keras-hub's VGG presets are "
                      "timm's torchvision weights, normalised with ImageNet's mean and std); pass "
                      "preprocessing=NAME if these weights were trained otherwise", stacklevel=5)
        return DEFAULT_PREPROCESSING
    converter = _config_of(_config_of(_load_json(path), path).get("image_converter"), path)
    return preset_for(converter.get("scale"), converter.get("offset"), path)


def read_preset(path: str | os.PathLike, with_head: bool = True,
                preprocessing: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, options) of a preset directory, or of its model.weights.h5 (the backbone only).

    Args:
      with_head: read task.json / task.weights.h5 (False for head="none": any pooling then loads).
      preprocessing: the preset to record instead of preprocessor.json's.
    Returns:
      the state dict ({"block1_conv1/kernel": tensor, ..., "fc1/kernel": ...}) and the keyword
      arguments of `engine.convert_state` the preset's JSON fixes: layout, preprocessing, config,
      and with a head num_classes and fc_width.
    """
    directory, backbone_only = _preset_dir(os.fspath(path))
    config = backbone_config(_load_json(os.path.join(directory, CONFIG)), os.path.join(directory, CONFIG))
    state = _read_h5(directory, BACKBONE_WEIGHTS)
    options = {"layout": "keras", "config": config,
               "preprocessing": preprocessing or preprocessing_of(directory)}
    task = os.path.join(directory, TASK)
    if with_head and not backbone_only and os.path.isfile(task):
        options.update(task_options(_load_json(task), task))
        state.update(_read_h5(directory, TASK_WEIGHTS))
    return state, options


def _read_h5(directory: str, name: str) -> dict[str, Any]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: a keras-hub preset without {name}")
    return keras.read_h5(path)


def preset_files(path: str | os.PathLike) -> list[str]:
    """The preset's files conversion reads (those of `FILES` it has), for the source's sha256."""
    directory, backbone_only = _preset_dir(os.fspath(path))
    names = (CONFIG, BACKBONE_WEIGHTS, PREPROCESSOR) if backbone_only else FILES
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]


def classifier_rules(channels: int, fc_width: int, num_classes: int) -> list[Rule]:
    """The "avg" head: fc1 a (7, 7, C, out) Conv2D, fc2 a (1, 1, in, out) Conv2D, then a Dense."""
    sizes = {"fc1": ((*FC_POOL_SIZE, channels, fc_width), "conv_dense"),
             "fc2": ((1, 1, fc_width, fc_width), "conv_dense"),
             classifier_layer("torchvision"): ((fc_width, num_classes), "copy")}
    return [r for layer, (shape, kind) in sizes.items() for r in (
        Rule(f"{keras.keras_name(layer)}/kernel", ("params", layer, "kernel"), shape, kind),
        Rule(f"{keras.keras_name(layer)}/bias", ("params", layer, "bias"), (shape[-1],), "copy"))]


def rules(arch: Architecture, with_classifier: bool) -> tuple[list[Rule], list[str]]:
    head = classifier_rules(last_width(arch.config), arch.fc_width, arch.num_classes)
    if with_classifier:
        return keras.feature_rules(arch.config) + head, []
    return keras.feature_rules(arch.config), [r.key for r in head]


def infer_architecture(state: Mapping[str, Any], **model_kwargs) -> Architecture:
    """keras.py's inference (conv kernels -> config), fc_width from fc1's (7, 7, C, out) kernel."""
    fc1 = state.get("fc1/kernel")
    if fc1 is not None and not model_kwargs.get("fc_width"):
        model_kwargs["fc_width"] = fc1.shape[-1]
    return keras.infer_architecture(state, **model_kwargs)._replace(layout="keras_hub")


def detect(state: Mapping[str, Any]) -> bool:
    """keras-hub's conv head: an fc1 kernel of 4 dims (keras.applications' is a 2-d Dense's)."""
    fc1 = state.get("fc1/kernel")
    return keras.detect(state) and fc1 is not None and len(fc1.shape) == 4


LAYOUT = Layout("keras_hub", detect, infer_architecture, rules, classifier_key="fc1/kernel",
                preprocessing=DEFAULT_PREPROCESSING)
