"""torchvision / timm VGG weights into Flax and back, by the rules of `rules.py`.

Conversion checks every key and shape before building anything: one error lists all problems, and
nothing half-loaded is ever returned. The torch self-check (`torch_check`) depends on this module,
never the reverse: `convert_file` takes the checker as an argument.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vgg_flax.convert import format as wformat
from vgg_flax.convert.device import to_device
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.hashing import file_sha256, verify_hash_prefix
from vgg_flax.convert.readers import read_state_dict
from vgg_flax.convert.rules import (
    CLASSIFIER_KEYS,
    KINDS,
    LAYOUTS,
    Architecture,
    Rule,
    check_state,
    conversion_rules,
    infer_architecture,
)
from vgg_flax.models import VGG, count_params, get_head, is_feature_layer

__all__ = ["LAYOUTS", "convert_file", "load_torchvision", "to_torchvision"]


def _nan_layers(variables: Mapping[str, Any]) -> list[str]:
    """Variable paths holding NaN (np.min propagates NaN without allocating a mask)."""
    flat = wformat.flatten_variables(variables, leaf=lambda v: v)
    return [path for path, v in flat.items() if np.isnan(np.min(np.asarray(v)))]


def _build(state: dict[str, Any], rules: list[Rule], dtype) -> dict[str, Any]:
    """Applies the rules, largest tensor first, dropping each source tensor once converted.

    Each tensor is copied once, straight from the source layout into the Flax layout (see
    `to_device`), so the peak is about the source plus the largest converted tensor.
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
        nodes[rule][rule.path[-1]] = to_device(state.pop(rule.key), dtype, KINDS[rule.kind][0],
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
        verify_hash_prefix(source)
    model, variables, _ = _convert(read_state_dict(source), head, where, model_kwargs)
    return model, variables


def _convert(state: dict[str, np.ndarray], head: str, where: str, model_kwargs: dict[str, Any]
             ) -> tuple[VGG, dict[str, Any], Architecture]:
    """load_torchvision after reading: infer, check every key, then build (consumes `state`)."""
    if head not in ("torchvision", "dense", "none"):
        raise ConversionError(f"head {head!r} has no torchvision weights; use 'torchvision', 'dense' "
                              "or 'none'")
    arch = infer_architecture(state, **model_kwargs)
    if head != "none" and not arch.has_classifier:
        raise ConversionError(f"{where} holds no classifier weights (no {CLASSIFIER_KEYS[arch.layout][0]}"
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
        variables["params"] = {k: v for k, v in variables["params"].items() if is_feature_layer(k)}
    elif nan:
        raise ConversionError(f"{where}: NaN weights in {', '.join(nan)}: a corrupt file")
    fields = {**model_kwargs, "config": arch.config, "batch_norm": arch.batch_norm,
              "num_classes": arch.num_classes, "fc_width": arch.fc_width, "head": head}
    model = VGG.from_config(fields)
    wformat.check_variables(model, variables, where)
    return model, variables, arch


def to_torchvision(model: VGG, variables: Mapping[str, Any], layout: str = "torchvision"
                   ) -> dict[str, np.ndarray]:
    """Exports Flax variables as a torchvision (or timm) state dict of numpy arrays.

    `torchvision.models.vgg16().load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts
    it (BatchNorm's `num_batches_tracked`, not tracked in Flax, is exported as 0). Pure transposes:
    `load_torchvision(to_torchvision(m, v))` gives back `v` bit for bit.
    """
    if not get_head(model.head).torchvision_layout:
        raise ConversionError("the 'small' head has no torchvision counterpart; export head='none' "
                              "variables for the features")
    arch = Architecture(model.config, model.batch_norm, model.num_classes, model.fc_width, layout,
                        model.head != "none")
    rules, _ = conversion_rules(arch, with_classifier=arch.has_classifier)
    flat = wformat.flatten_variables(variables)
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
                 head: str = "torchvision", verify_hash: bool = True,
                 check: Callable[[VGG, Mapping[str, Any]], tuple[float, float]] | None = None,
                 provenance: Mapping[str, Any] | None = None, **model_kwargs) -> dict[str, Any]:
    """`vgg-flax convert`: a torchvision/timm file into a `save_pretrained` file, with a report.

    Args:
      check: an optional self-check `(model, variables) -> (max abs diff, max abs output)`, e.g.
        `torch_check.self_check` (the caller picks it, so conversion never imports torch code).
      provenance: stored with the weights (see `save_pretrained`).
      **model_kwargs: config / batch_norm / ... when the file's layout is not a paper config.
    Returns a dict: config, batch_norm, layout, num_classes, head, params (count), preprocessing,
    sha256, hash_prefix (verified, or None), max_abs_diff / max_abs_logit (None without a check).
    """
    prefix, sha256 = verify_hash_prefix(source) if verify_hash else (None, None)
    model, variables, arch = _convert(read_state_dict(source), head, os.fspath(source),
                                   model_kwargs)
    features_only = model.head == "none" and head != "none"
    preset = "imagenet1k_features" if features_only else "torchvision"
    sha256 = sha256 or file_sha256(source)
    wformat.save_pretrained(destination, model, variables, preprocessing=preset,
                            source=os.path.basename(os.fspath(source)), source_sha256=sha256,
                            provenance=provenance)
    report = {"config": model.config, "batch_norm": model.batch_norm,
              "layout": arch.layout, "num_classes": model.num_classes,
              "head": model.head, "features_only": features_only, "params": count_params(variables),
              "preprocessing": preset, "sha256": sha256, "hash_prefix": prefix,
              "max_abs_diff": None, "max_abs_logit": None}
    if check is not None:
        report["max_abs_diff"], report["max_abs_logit"] = check(model, variables)
    return report
