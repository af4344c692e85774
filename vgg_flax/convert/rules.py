"""The conversion table: one `Rule` per tensor, layout kinds, and what a state dict holds.

Every tensor moves by one `Rule`: a source key, a Flax variable path, the source shape, and a layout
`kind` whose pair of pure functions (`KINDS`) maps the tensor both ways:

    conv         Conv2d weight OIHW  <-> Flax HWIO
    copy         biases, BatchNorm weight/bias/running stats
    linear       Linear weight (out, in)  <-> Dense kernel (in, out)
    fc1_linear   classifier.0 (out, C*7*7), flattened channel-major (c, h, w) by torch's NCHW flatten
                 <-> fc1's Dense kernel (7*7*C, out) in NHWC (h, w, c) row order
    fc1_conv     timm's pre_logits.fc1 Conv2d (out, C, 7, 7) <-> the same fc1 kernel
    conv1x1      timm's pre_logits.fc2 Conv2d (out, in, 1, 1) <-> fc2's Dense kernel (in, out)

The torchvision layout of a config is derived from its entries the way torchvision's `make_layers`
numbers `features`: conv [BatchNorm] ReLU for a conv, one index for a pool or an LRN. So configs C
(1x1 convs) and A-LRN (Conv, ReLU, LocalResponseNorm, MaxPool, ...) have a layout too, although
torchvision ships no weights for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from vgg_flax.convert.errors import ConversionError
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


def _fc1_to_flax(w):  # (out, C*7*7) channel-major -> (7, 7, C, out), i.e. (7*7*C, out) NHWC rows
    return w.reshape(w.shape[0], -1, _KH, _KW).transpose(2, 3, 1, 0)


def _fc1_to_torch(k, shape):
    return k.reshape(_KH, _KW, -1, k.shape[1]).transpose(3, 2, 0, 1).reshape(shape)


# kind -> (torch tensor -> flax array, (flax array, torch shape) -> torch tensor)
KINDS = {
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k, s: k.transpose(3, 2, 0, 1)),
    "copy": (lambda w: w, lambda k, s: k),
    "linear": (lambda w: w.T, lambda k, s: k.T),
    "fc1_linear": (_fc1_to_flax, _fc1_to_torch),
    "fc1_conv": (_fc1_to_flax, _fc1_to_torch),
    "conv1x1": (lambda w: w.reshape(w.shape[:2]).T, lambda k, s: k.T.reshape(s)),
}
LAYOUTS = ("torchvision", "timm")
CLASSIFIER_KEYS = {"torchvision": ("classifier.0", "classifier.3", "classifier.6"),
                    "timm": ("pre_logits.fc1", "pre_logits.fc2", "head.fc")}
_FEATURE_KEY = re.compile(r"^features\.(\d+)\.(\w+)$")


class Rule(NamedTuple):
    """One tensor: source key and shape, Flax path ("params", "conv1_1", "kernel"), layout kind."""

    key: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str


class Architecture(NamedTuple):
    """What a state dict holds, inferred from its keys and shapes."""

    config: Any
    batch_norm: bool
    num_classes: int
    fc_width: int
    layout: str            # "torchvision" or "timm"
    has_classifier: bool   # False for features-only state dicts


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


def classifier_rules(channels: int, fc_width: int, num_classes: int, layout: str) -> list[Rule]:
    """Rules for the three FC layers in torchvision's (Linear) or timm's (Conv2d + head.fc) layout."""
    if layout not in LAYOUTS:
        raise KeyError(f"unknown layout {layout!r}; valid layouts: {LAYOUTS}")
    k1, k2, k3 = CLASSIFIER_KEYS[layout]
    if layout == "torchvision":
        fc1 = Rule(f"{k1}.weight", ("params", "fc1", "kernel"), (fc_width, channels * _KH * _KW),
                   "fc1_linear")
        fc2 = Rule(f"{k2}.weight", ("params", "fc2", "kernel"), (fc_width, fc_width), "linear")
    else:
        fc1 = Rule(f"{k1}.weight", ("params", "fc1", "kernel"), (fc_width, channels, _KH, _KW),
                   "fc1_conv")
        fc2 = Rule(f"{k2}.weight", ("params", "fc2", "kernel"), (fc_width, fc_width, 1, 1), "conv1x1")
    fc3 = classifier_layer("torchvision")
    return [fc1, Rule(f"{k1}.bias", ("params", "fc1", "bias"), (fc_width,), "copy"),
            fc2, Rule(f"{k2}.bias", ("params", "fc2", "bias"), (fc_width,), "copy"),
            Rule(f"{k3}.weight", ("params", fc3, "kernel"), (num_classes, fc_width), "linear"),
            Rule(f"{k3}.bias", ("params", fc3, "bias"), (num_classes,), "copy")]


def conversion_rules(arch: Architecture, with_classifier: bool) -> tuple[list[Rule], list[str]]:
    """Every rule for an architecture, and the source keys that are read but deliberately unused."""
    rules, ignored = feature_rules(arch.config, arch.batch_norm)
    classifier = classifier_rules(last_width(arch.config), arch.fc_width, arch.num_classes,
                                  arch.layout)
    if with_classifier:
        rules += classifier
    else:
        ignored += [r.key for r in classifier]
    return rules, ignored


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


def infer_architecture(state: Mapping[str, np.ndarray], **model_kwargs) -> Architecture:
    """Config, BatchNorm, widths and layout from keys and shapes; explicit model_kwargs win."""
    layout = "timm" if any(k.startswith(("pre_logits.", "head.fc.")) for k in state) else "torchvision"
    k1, _, k3 = CLASSIFIER_KEYS[layout]
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


def check_state(state: Mapping[str, np.ndarray], rules: list[Rule], ignored: list[str],
                where: str) -> None:
    """Raises one ConversionError listing every missing, unexpected and wrongly shaped key."""
    wanted = {r.key for r in rules}
    problems = [f"missing key {r.key!r} (expected shape {r.shape}, for {'/'.join(r.path)})"
                for r in rules if r.key not in state]
    problems += [f"key {r.key!r}: expected shape {r.shape}, found {tuple(state[r.key].shape)}"
                 for r in rules if r.key in state and tuple(state[r.key].shape) != r.shape]
    problems += [f"unexpected key {k!r} (shape {tuple(v.shape)})" for k, v in state.items()
                 if k not in wanted and k not in ignored]
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        raise ConversionError(f"cannot convert {where}: {len(problems)} problem(s):\n  "
                              + "\n  ".join(problems[:20] + more))
