"""torchvision / timm VGG weights into Flax and back, as a table of explicit rules.

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
torchvision ships no weights for them. Conversion checks every key and shape before building
anything: one error lists all problems, and nothing half-loaded is ever returned.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from vgg_flax.convert import weights
from vgg_flax.models import CONFIGS, FC_POOL_SIZE, VGG, layer_names, resolve_config
from vgg_flax.convert.weights import ConversionError

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
_CLASSIFIER_KEYS = {"torchvision": ("classifier.0", "classifier.3", "classifier.6"),
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
        if not name.startswith("conv"):  # a pool or an LRN: one parameterless module
            index += 1
            continue
        width, ksize = entry if isinstance(entry, tuple) else (entry, 3)
        rules += [Rule(f"features.{index}.weight", ("params", name, "kernel"),
                       (width, channels, ksize, ksize), "conv"),
                  Rule(f"features.{index}.bias", ("params", name, "bias"), (width,), "copy")]
        index += 1
        if batch_norm:
            bn = "bn" + name[4:]
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
    k1, k2, k3 = _CLASSIFIER_KEYS[layout]
    if layout == "torchvision":
        fc1 = Rule(f"{k1}.weight", ("params", "fc1", "kernel"), (fc_width, channels * _KH * _KW),
                   "fc1_linear")
        fc2 = Rule(f"{k2}.weight", ("params", "fc2", "kernel"), (fc_width, fc_width), "linear")
    else:
        fc1 = Rule(f"{k1}.weight", ("params", "fc1", "kernel"), (fc_width, channels, _KH, _KW),
                   "fc1_conv")
        fc2 = Rule(f"{k2}.weight", ("params", "fc2", "kernel"), (fc_width, fc_width, 1, 1), "conv1x1")
    return [fc1, Rule(f"{k1}.bias", ("params", "fc1", "bias"), (fc_width,), "copy"),
            fc2, Rule(f"{k2}.bias", ("params", "fc2", "bias"), (fc_width,), "copy"),
            Rule(f"{k3}.weight", ("params", "fc3", "kernel"), (num_classes, fc_width), "linear"),
            Rule(f"{k3}.bias", ("params", "fc3", "bias"), (num_classes,), "copy")]


def _last_width(config) -> int:
    convs = [e for e in resolve_config(config) if not isinstance(e, str)]
    return convs[-1][0] if isinstance(convs[-1], tuple) else convs[-1]


def conversion_rules(arch: Architecture, with_classifier: bool) -> tuple[list[Rule], list[str]]:
    """Every rule for an architecture, and the source keys that are read but deliberately unused."""
    rules, ignored = feature_rules(arch.config, arch.batch_norm)
    classifier = classifier_rules(_last_width(arch.config), arch.fc_width, arch.num_classes,
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
    k1, _, k3 = _CLASSIFIER_KEYS[layout]
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


def _nan_layers(variables: Mapping[str, Any]) -> list[str]:
    """Variable paths holding NaN (np.min propagates NaN without allocating a mask)."""
    flat = weights.flatten_variables(variables, leaf=lambda v: v)
    return [path for path, v in flat.items() if np.isnan(np.min(np.asarray(v)))]


def _build(state: dict[str, Any], rules: list[Rule], dtype) -> dict[str, Any]:
    """Applies the rules, largest tensor first, dropping each source tensor once converted.

    Each tensor is copied once, straight from the source layout into the Flax layout (see
    `weights.to_device`), so the peak is about the source plus the largest converted tensor.
    """
    variables: dict[str, Any] = {}
    nodes = {}
    for rule in rules:  # the tree in network order, filled below in size order
        node = variables
        for name in rule.path[:-1]:
            node = node.setdefault(name, {})
        nodes[rule] = node
    for rule in sorted(rules, key=lambda r: -int(np.prod(r.shape))):
        shape = (-1, rule.shape[0]) if rule.kind.startswith("fc1") else None
        nodes[rule][rule.path[-1]] = weights.to_device(state.pop(rule.key), dtype, KINDS[rule.kind][0],
                                                       shape)
    return variables


def load_torchvision(source: str | os.PathLike | Mapping[str, Any], head: str = "torchvision", *,
                     verify_hash: bool = True, **model_kwargs) -> tuple[VGG, dict[str, Any]]:
    """Converts torchvision (or timm) VGG weights into a Flax `VGG` and its variables.

    Args:
      source: a `.pth`/`.pt`/`.bin`/`.safetensors` path or a state dict (str -> tensor/array) in
        torchvision's layout (`features.*`, `classifier.0/3/6`) or timm's (`pre_logits.fc1/fc2`,
        `head.fc`).
      head: "torchvision", "dense" (same weights, the paper's dense evaluation) or "none".
      verify_hash: check the sha256 prefix of torchvision-style file names (`vgg16-397923af.pth`).
      **model_kwargs: other VGG fields (dtype, dropout_rate, ...); config / batch_norm /
        num_classes / fc_width are inferred from the weights unless given.
    Returns:
      (model, {"params": ..., "batch_stats": ...}): `model.apply(variables, x)` reproduces
      torchvision's logits for x = the NHWC version of torchvision's NCHW input.
    Raises:
      ConversionError: naming every missing/unexpected key and wrong shape, a hash mismatch, a
        refused pickle or an unreadable file. FileNotFoundError for a missing path.
    """
    where = "the state dict" if isinstance(source, Mapping) else os.fspath(source)
    if verify_hash and not isinstance(source, Mapping):
        weights.verify_hash_prefix(source)
    model, variables, _ = _convert(weights.read_state_dict(source), head, where, model_kwargs)
    return model, variables


def _convert(state: dict[str, np.ndarray], head: str, where: str, model_kwargs: dict[str, Any]
             ) -> tuple[VGG, dict[str, Any], Architecture]:
    """load_torchvision after reading: infer, check every key, then build (consumes `state`)."""
    if head not in ("torchvision", "dense", "none"):
        raise ConversionError(f"head {head!r} has no torchvision weights; use 'torchvision', 'dense' "
                              "or 'none'")
    arch = infer_architecture(state, **model_kwargs)
    if head != "none" and not arch.has_classifier:
        raise ConversionError(f"{where} holds no classifier weights (no {_CLASSIFIER_KEYS[arch.layout][0]}"
                              ".weight): pass head='none' to load the features only")
    rules, ignored = conversion_rules(arch, with_classifier=head != "none")
    check_state(state, rules, ignored, where)
    variables = _build(state, rules, dtype=model_kwargs.get("param_dtype", np.float32))
    state.clear()  # the remaining (ignored) source tensors
    nan = _nan_layers(variables)
    if nan and all(p.startswith("params/fc") for p in nan):
        warnings.warn(f"{where}: the classifier weights are NaN (torchvision's IMAGENET1K_FEATURES "
                      "file): loading the features only (head='none'). These weights expect 0-255 "
                      "input: normalise with vgg_flax.preprocessing.get_preset('imagenet1k_features').",
                      stacklevel=3)
        head = "none"
        variables["params"] = {k: v for k, v in variables["params"].items() if not k.startswith("fc")}
    elif nan:
        raise ConversionError(f"{where}: NaN weights in {', '.join(nan)}: a corrupt file")
    fields = {**model_kwargs, "config": arch.config, "batch_norm": arch.batch_norm,
              "num_classes": arch.num_classes, "fc_width": arch.fc_width, "head": head}
    model = VGG(**fields)
    weights.check_variables(model, variables, where)
    return model, variables, arch


def to_torchvision(model: VGG, variables: Mapping[str, Any], layout: str = "torchvision"
                   ) -> dict[str, np.ndarray]:
    """Exports Flax variables as a torchvision (or timm) state dict of numpy arrays.

    `torchvision.models.vgg16().load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts
    it (BatchNorm's `num_batches_tracked`, not tracked in Flax, is exported as 0). Pure transposes:
    `load_torchvision(to_torchvision(m, v))` gives back `v` bit for bit.
    """
    if model.head == "small":
        raise ConversionError("the 'small' head has no torchvision counterpart; export head='none' "
                              "variables for the features")
    arch = Architecture(model.config, model.batch_norm, model.num_classes, model.fc_width, layout,
                        model.head != "none")
    rules, _ = conversion_rules(arch, with_classifier=arch.has_classifier)
    flat = weights.flatten_variables(variables)
    state = {}
    for rule in rules:
        path = "/".join(rule.path)
        if path not in flat:
            raise ConversionError(f"variables lack {path} (for {rule.key}, shape {rule.shape})")
        state[rule.key] = np.array(KINDS[rule.kind][1](flat[path], rule.shape), order="C")
        if state[rule.key].shape != rule.shape:
            raise ConversionError(f"{path}: shape {flat[path].shape} does not give {rule.key}'s "
                                  f"{rule.shape}")
        if rule.key.endswith(".running_var"):  # torchvision's key order: the counter comes last
            state[rule.key[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return state


def convert_file(source: str | os.PathLike, destination: str | os.PathLike, *,
                 head: str = "torchvision", verify_hash: bool = True, check: bool = True
                 ) -> dict[str, Any]:
    """`vgg-flax convert`: a torchvision/timm file into a `save_pretrained` file, with a report.

    Returns a dict: config, batch_norm, layout, num_classes, head, params (count), preprocessing,
    sha256, hash_prefix (verified, or None), max_abs_diff / max_abs_logit (None without torch).
    """
    from vgg_flax.models import count_params
    from vgg_flax.convert.torch_check import self_check

    prefix, sha256 = weights.verify_hash_prefix(source) if verify_hash else (None, None)
    model, variables, arch = _convert(weights.read_state_dict(source), head, os.fspath(source), {})
    features_only = model.head == "none" and head != "none"
    preset = "imagenet1k_features" if features_only else "torchvision"
    sha256 = sha256 or weights.file_sha256(source)
    weights.save_pretrained(destination, model, variables, preprocessing=preset,
                            source=os.path.basename(os.fspath(source)), source_sha256=sha256)
    report = {"config": model.config, "batch_norm": model.batch_norm,
              "layout": arch.layout, "num_classes": model.num_classes,
              "head": model.head, "features_only": features_only, "params": count_params(variables),
              "preprocessing": preset, "sha256": sha256, "hash_prefix": prefix,
              "max_abs_diff": None, "max_abs_logit": None}
    if check:
        try:
            import torch  # noqa: F401
        except ImportError:
            return report
        report["max_abs_diff"], report["max_abs_logit"] = self_check(model, variables)
    return report
