"""torchvision's VGG layout: `features.{i}.*` numbered as its `make_layers`, `classifier.0/3/6`.

The features' numbering is derived from a config's entries the way torchvision's `make_layers`
numbers them: conv [BatchNorm] ReLU for a conv, one index for a pool or an LRN. So configs C (1x1
convs) and A-LRN (Conv, ReLU, LocalResponseNorm, MaxPool, ...) have a layout too, although
torchvision ships no weights for them. timm's layout (timm.py) shares the features and the
architecture inference, with its own classifier keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.rules import Architecture, Layout, Rule
from vgg_flax.models import (
    CONFIGS,
    FC_POOL_SIZE,
    bn_name,
    classifier_layer,
    is_conv_layer,
    last_width,
    layer_names,
)

_KH, _KW = FC_POOL_SIZE
KEYS = ("classifier.0", "classifier.3", "classifier.6")
_FEATURE_KEY = re.compile(r"^features\.(\d+)\.(\w+)$")


def feature_rules(config, batch_norm: bool) -> tuple[list[Rule], list[str]]:
    """Rules for `features.*` as torchvision's make_layers numbers them, and the keys to ignore."""
    rules, ignored, index, channels = [], [], 0, 3
    for name, entry in layer_names(config):
        if not is_conv_layer(name):  # a pool or an LRN: one parameterless module
            index += 1
            continue
        width, ksize = entry if isinstance(entry, tuple) else (entry, 3)
        rules += [Rule(f"features.{index}.weight", ("params", name, "kernel"),
                       (width, channels, ksize, ksize), "conv"),
                  Rule(f"features.{index}.bias", ("params", name, "bias"), (width,), "copy")]
        index += 1
        if batch_norm:
            bn = bn_name(name)
            for key, path in (("weight", ("params", bn, "scale")), ("bias", ("params", bn, "bias")),
                              ("running_mean", ("batch_stats", bn, "mean")),
                              ("running_var", ("batch_stats", bn, "var"))):
                rules.append(Rule(f"features.{index}.{key}", path, (width,), "copy"))
            ignored.append(f"features.{index}.num_batches_tracked")
            index += 1
        index += 1  # ReLU
        channels = width
    return rules, ignored


def head_rules(keys: tuple[str, str, str], fc1: tuple[tuple[int, ...], str],
               fc2: tuple[tuple[int, ...], str], fc_width: int, num_classes: int) -> list[Rule]:
    """The three FC layers' rules: fc1 and fc2 weights as (shape, kind), the last a Linear."""
    k1, k2, k3 = keys
    fc3 = classifier_layer("torchvision")
    return [Rule(f"{k1}.weight", ("params", "fc1", "kernel"), *fc1),
            Rule(f"{k1}.bias", ("params", "fc1", "bias"), (fc_width,), "copy"),
            Rule(f"{k2}.weight", ("params", "fc2", "kernel"), *fc2),
            Rule(f"{k2}.bias", ("params", "fc2", "bias"), (fc_width,), "copy"),
            Rule(f"{k3}.weight", ("params", fc3, "kernel"), (num_classes, fc_width), "linear"),
            Rule(f"{k3}.bias", ("params", fc3, "bias"), (num_classes,), "copy")]


def classifier_rules(channels: int, fc_width: int, num_classes: int) -> list[Rule]:
    """torchvision's Linear classifier; classifier.0 reads the 7x7 map flattened channel-major."""
    return head_rules(KEYS, ((fc_width, channels * _KH * _KW), "fc1_linear"),
                      ((fc_width, fc_width), "linear"), fc_width, num_classes)


def rules_with(classifier: Callable[[int, int, int], list[Rule]]):
    """A `Layout.rules` function: `features.*` and the given classifier's rules."""
    def rules(arch: Architecture, with_classifier: bool) -> tuple[list[Rule], list[str]]:
        found, ignored = feature_rules(arch.config, arch.batch_norm)
        head = classifier(last_width(arch.config), arch.fc_width, arch.num_classes)
        if with_classifier:
            return found + head, ignored
        return found, ignored + [r.key for r in head]
    return rules


def _conv_signature(state: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    """(index, out, in, k) of every 4-d `features.N.weight`, in index order."""
    convs = []
    for key, value in state.items():
        m = _FEATURE_KEY.match(key)
        if m and m.group(2) == "weight" and len(value.shape) == 4:
            convs.append((int(m.group(1)), *value.shape[:3]))
    return tuple(sorted(convs))


def _expected_signature(config, batch_norm: bool) -> tuple[tuple[int, ...], ...]:
    rules, _ = feature_rules(config, batch_norm)
    return tuple((int(r.key.split(".")[1]), *r.shape[:3]) for r in rules if r.kind == "conv")


def _describe_conv(signature: tuple[int, ...]) -> str:
    i, o, c, k = signature
    return f"features.{i}.weight of shape {(o, c, k, k)}"


def _check_config(state: Mapping[str, np.ndarray], config, batch_norm: bool) -> None:
    """An explicit config must fit the weights' conv layers; names the first one that does not."""
    found, expected = _conv_signature(state), _expected_signature(config, batch_norm)
    if found == expected:
        return
    n = min(len(found), len(expected))
    j = next((j for j in range(n) if found[j] != expected[j]), n)
    want = _describe_conv(expected[j]) if j < len(expected) else "no further conv"
    have = _describe_conv(found[j]) if j < len(found) else "no further conv"
    try:
        detected = f"; the weights look like config {_match_config(state, batch_norm)!r}"
    except ConversionError:
        detected = ""
    raise ConversionError(f"the weights are not VGG config {config!r} (batch_norm={batch_norm}): "
                          f"expected {want}, found {have}{detected}")


def _match_config(state: Mapping[str, np.ndarray], batch_norm: bool) -> str:
    """The paper config whose torchvision layout has exactly this state dict's conv keys/shapes."""
    found = _conv_signature(state)
    if not found:
        sample = ", ".join(sorted(state)[:5])
        raise ConversionError("not a VGG state dict: no 'features.N.weight' conv kernels "
                              f"(found keys such as {sample})")
    for name in CONFIGS:
        if _expected_signature(name, batch_norm) == found:
            return name
    convs = ", ".join(f"features.{i}: {o}x{c}x{k}x{k}" for i, o, c, k in found)
    raise ConversionError(f"the conv layers match no VGG config {sorted(CONFIGS)} "
                          f"(batch_norm={batch_norm}): {convs}; pass config=... for a custom layout")


def infer_architecture(state: Mapping[str, np.ndarray], layout: str = "torchvision",
                       keys: tuple[str, str, str] = KEYS, **model_kwargs) -> Architecture:
    """Config, BatchNorm, widths from `features.*` and the classifier `keys`; model_kwargs win."""
    k1, _, k3 = keys
    has_classifier = f"{k3}.weight" in state or f"{k1}.weight" in state
    batch_norm = model_kwargs.get("batch_norm")
    if batch_norm is None:
        batch_norm = any(_FEATURE_KEY.match(k) and k.endswith(".running_mean") for k in state)
    config = model_kwargs.get("config")
    if config is None:
        config = _match_config(state, batch_norm)
    else:
        _check_config(state, config, batch_norm)
    fc1, fc3 = state.get(f"{k1}.weight"), state.get(f"{k3}.weight")
    fc_width = model_kwargs.get("fc_width") or (fc1.shape[0] if fc1 is not None else 4096)
    num_classes = model_kwargs.get("num_classes") or (fc3.shape[0] if fc3 is not None else 1000)
    return Architecture(config, bool(batch_norm), int(num_classes), int(fc_width), layout,
                        has_classifier)


def detect(state: Mapping[str, object]) -> bool:
    """torchvision's keys: `features.N.*` (timm's files have them too: the table asks timm first)."""
    return any(_FEATURE_KEY.match(k) for k in state)


LAYOUT = Layout("torchvision", detect, infer_architecture, rules_with(classifier_rules),
                classifier_key=KEYS[0] + ".weight", preprocessing="torchvision",
                nan_classifier_preprocessing="imagenet1k_features")
