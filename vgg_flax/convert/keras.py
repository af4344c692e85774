"""Keras's VGG layout (`keras.applications.VGG16` / `VGG19`) and its `.h5` files, read with h5py.

Layer names `block{b}_conv{k}`, `fc1`, `fc2`, `predictions`; conv kernels HWIO and Dense kernels
(in, out), Flax's own layouts, so every rule is a copy; `Flatten` runs on the channels-last 7x7 map,
the NHWC row order our fc1 keeps. The weights are the original Caffe VGG's: "caffe" preprocessing
(BGR, mean subtraction, 0-255). Files (`read_h5`):

    .weights.h5   Keras 3 `model.save_weights`: layers/<object name>/vars/{0, 1}, the layer's name
                  in the vars group's "name" attribute
    .keras        Keras 3 `model.save("x.keras")`: a zip whose model.weights.h5 is laid out as above
    .h5           legacy HDF5 (`model.save("x.h5")`, Keras 2 `save_weights`, the files
                  keras.applications downloads): [model_weights/]<layer>/<weight names>, listed by
                  the "layer_names" and "weight_names" attributes

A layer's weights are named by their order, as Keras loads them: kernel, then bias. Nested models
(a Sequential head, a backbone inside a task) are read layer by layer under the layers' own names.
keras-hub's VGG uses these names too: its preset directories (`task.save_to_preset`) are read by
`keras_hub.py`, which reads their two `.weights.h5` files here; its "flatten" head is this layout,
its "avg" head (7x7 and 1x1 Conv2D kernels) is `keras_hub.LAYOUT`.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.readers import FileTensor
from vgg_flax.convert.rules import Architecture, Layout, Rule
from vgg_flax.models import CONFIGS, FC_POOL_SIZE, classifier_layer, is_conv_layer, last_width, layer_names

SUFFIXES = (".h5", ".hdf5", ".keras")
_ARCHIVE_WEIGHTS = "model.weights.h5"  # inside a .keras zip
_VAR_NAMES = ("kernel", "bias")  # the order of a Conv2D's / Dense's weights
_CONV = re.compile(r"^conv(\d+)_(\d+)$")
_KERAS_CONV = re.compile(r"^block\d+_conv\d+/")
_HEAD = {"fc1": "fc1", "fc2": "fc2", classifier_layer("torchvision"): "predictions"}


def read_h5(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{"block1_conv1/kernel": tensor, ...} of a Keras `.weights.h5`, `.keras` or legacy `.h5` file.

    A contiguous, uncompressed dataset (how Keras writes them) is a `FileTensor` at its byte offset,
    read block by block during conversion like a safetensors tensor; others are read here.
    """
    path = os.fspath(path)
    try:
        import h5py
    except ImportError as e:
        raise ConversionError(f"{path}: Keras .h5 files need h5py (pip install h5py)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path}")
    try:
        archive = path.endswith(".keras")
        with h5py.File(_archived(path) if archive else path, "r") as f:
            tensor = functools.partial(_tensor, path=None if archive else path)
            if "layers" in f and "layer_names" not in f.attrs:
                state = _read_keras3(f["layers"], tensor)
            else:
                state = _read_legacy(f["model_weights"] if "model_weights" in f else f, tensor)
    except OSError as e:
        raise ConversionError(f"{path}: not a readable HDF5 file (truncated, or not HDF5?): "
                              f"{str(e).splitlines()[0]}") from e
    except (KeyError, ValueError, TypeError) as e:
        raise ConversionError(f"{path}: not a Keras weights file ({type(e).__name__}: {e})") from e
    if not state:
        raise ConversionError(f"{path}: the HDF5 file holds no Keras layer weights")
    return state


def _archived(path: str) -> io.BytesIO:
    """The model.weights.h5 of a .keras zip, in memory (h5py reads file-like objects)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return io.BytesIO(archive.read(_ARCHIVE_WEIGHTS))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ConversionError(f"{path}: not a .keras archive holding {_ARCHIVE_WEIGHTS} ({e})") from e


def _tensor(dataset, path: str | None) -> FileTensor | np.ndarray:
    """A dataset stored contiguously in the file at `path` as a lazy `FileTensor`, else its array."""
    offset = dataset.id.get_offset() if path is not None else None
    if offset is None or dataset.chunks is not None or dataset.compression or not dataset.shape:
        return np.asarray(dataset[()])
    return FileTensor(path, dataset.dtype, tuple(dataset.shape), offset)


def _named(layer: str, values: list[Any], tensor) -> dict[str, Any]:
    names = [_VAR_NAMES[i] if i < len(_VAR_NAMES) else str(i) for i in range(len(values))]
    return {f"{layer}/{n}": tensor(v) for n, v in zip(names, values, strict=True)}


def _read_keras3(layers, tensor) -> dict[str, Any]:
    """Every layer's weights by its name, nested models' (a Sequential head, a backbone) included."""
    state = {}
    for key, group in layers.items():
        variables = group.get("vars", {})
        name = variables.attrs.get("name", key) if hasattr(variables, "attrs") else key
        found = _named(_text(name), [variables[str(i)] for i in range(len(variables))], tensor)
        if "layers" in group:
            found.update(_read_keras3(group["layers"], tensor))
        if state.keys() & found.keys():
            raise KeyError(f"layer weights {sorted(state.keys() & found.keys())} appear twice")
        state.update(found)
    return state


def _read_legacy(root, tensor) -> dict[str, Any]:
    if "layer_names" not in root.attrs:
        raise KeyError("no 'layer_names' attribute: not a Keras HDF5 weights file")
    state = {}
    for layer in map(_text, root.attrs["layer_names"]):
        if layer not in root:
            raise KeyError(f"layer {layer!r} is listed in layer_names but has no group")
        group = root[layer]
        state.update(_named(layer, [group[_text(w)] for w in group.attrs.get("weight_names", [])], tensor))
    return state


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def keras_name(layer: str) -> str:
    """Our layer name -> Keras's: conv3_2 -> block3_conv2, fc3 -> predictions."""
    m = _CONV.match(layer)
    return f"block{m.group(1)}_conv{m.group(2)}" if m else _HEAD[layer]


def feature_rules(config) -> list[Rule]:
    """A conv's kernel (k, k, in, out) and bias per `block{b}_conv{k}`, copied as they are."""
    rules, channels = [], 3
    for name, entry in layer_names(config):
        if not is_conv_layer(name):
            continue
        width, ksize = entry if isinstance(entry, tuple) else (entry, 3)
        rules += [Rule(f"{keras_name(name)}/kernel", ("params", name, "kernel"),
                       (ksize, ksize, channels, width), "copy"),
                  Rule(f"{keras_name(name)}/bias", ("params", name, "bias"), (width,), "copy")]
        channels = width
    return rules


def classifier_rules(channels: int, fc_width: int, num_classes: int) -> list[Rule]:
    """fc1 reads Flatten's (7, 7, C) order, which is ours: (7*7*C, out), a copy like the rest."""
    sizes = {"fc1": (channels * FC_POOL_SIZE[0] * FC_POOL_SIZE[1], fc_width), "fc2": (fc_width, fc_width),
             classifier_layer("torchvision"): (fc_width, num_classes)}
    return [r for layer, (n_in, n_out) in sizes.items() for r in (
        Rule(f"{keras_name(layer)}/kernel", ("params", layer, "kernel"), (n_in, n_out), "copy"),
        Rule(f"{keras_name(layer)}/bias", ("params", layer, "bias"), (n_out,), "copy"))]


def rules(arch: Architecture, with_classifier: bool) -> tuple[list[Rule], list[str]]:
    head = classifier_rules(last_width(arch.config), arch.fc_width, arch.num_classes)
    if with_classifier:
        return feature_rules(arch.config) + head, []
    return feature_rules(arch.config), [r.key for r in head]


def _kernels(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if _KERAS_CONV.match(k) and k.endswith("/kernel")}


def _kernels_of(config) -> dict[str, tuple[int, ...]]:
    return {r.key: r.shape for r in feature_rules(config) if r.key.endswith("/kernel")}


def _difference(found: dict[str, tuple[int, ...]], config) -> list[str]:
    """What the file's conv kernels lack, add or shape differently from a config's."""
    want = _kernels_of(config)
    out = [f"lacks {k[:-len('/kernel')]} {want[k]}" for k in want if k not in found]
    out += [f"has an extra {k[:-len('/kernel')]} {found[k]}" for k in found if k not in want]
    return out + [f"{k[:-len('/kernel')]} is {found[k]}, not {want[k]}" for k in want
                  if k in found and found[k] != want[k]]


def _match_config(state: Mapping[str, Any], config) -> Any:
    """The given config if the file's conv kernels are its, else the paper config they are."""
    found = _kernels(state)
    if not found:
        sample = ", ".join(sorted(state)[:5])
        raise ConversionError(f"not Keras VGG weights: no block{{b}}_conv{{k}} kernels (found {sample})")
    candidates = [config] if config is not None else list(CONFIGS)
    differences = {i: _difference(found, c) for i, c in enumerate(candidates)}
    best = min(differences, key=lambda i: len(differences[i]))
    if not differences[best]:
        return candidates[best]
    raise ConversionError(f"the Keras conv layers are not VGG config {candidates[best]!r}"
                          f"{'' if config is not None else ' (the closest)'}: the file "
                          + "; ".join(differences[best][:5]))


def infer_architecture(state: Mapping[str, Any], **model_kwargs) -> Architecture:
    """Config and widths from the kernels' shapes (Keras's VGG has no BatchNorm); model_kwargs win."""
    if model_kwargs.get("batch_norm"):
        raise ConversionError("Keras's VGG layout has no BatchNorm layers: batch_norm=True does not fit")
    config = _match_config(state, model_kwargs.get("config"))
    fc1, fc3 = state.get("fc1/kernel"), state.get("predictions/kernel")
    fc_width = model_kwargs.get("fc_width") or (fc1.shape[1] if fc1 is not None else 4096)
    num_classes = model_kwargs.get("num_classes") or (fc3.shape[1] if fc3 is not None else 1000)
    return Architecture(config, False, int(num_classes), int(fc_width), "keras",
                        fc1 is not None or fc3 is not None)


def detect(state: Mapping[str, Any]) -> bool:
    return any(_KERAS_CONV.match(k) for k in state)


LAYOUT = Layout("keras", detect, infer_architecture, rules, classifier_key="fc1/kernel",
                preprocessing="caffe")
