"""The project's weights format: one safetensors file of Flax variables plus their contract.

Keys are the Flax variable paths (`params/conv1_1/kernel`); the metadata (JSON strings) carries
the model config, the preprocessing preset, the class names, the source file and its sha256, and
for registry weights their provenance (name, URL, license, reported accuracy).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from vgg_flax import preprocessing as pp
from vgg_flax.convert.device import to_device
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.readers import read_safetensors
from vgg_flax.data.classes import imagenet_classes
from vgg_flax.models import VGG, get_head

FORMAT = "vgg-flax.pretrained.v1"


def flatten_variables(variables: Mapping[str, Any], leaf=np.asarray) -> dict[str, Any]:
    """{"params": {"conv1_1": {"kernel": x}}} -> {"params/conv1_1/kernel": leaf(x)}."""
    flat = traverse_util.flatten_dict(_plain(variables), sep="/")
    return {k: leaf(v) for k, v in flat.items()}


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_variables`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _plain(tree: Any) -> Any:
    """Nested Mappings (FrozenDict, OrderedDict) as dicts, which traverse_util walks."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def check_variables(model: Any, variables: Mapping[str, Any], where: str) -> None:
    """Raises ConversionError unless `variables` has exactly the model's paths and shapes."""
    import jax
    import jax.numpy as jnp

    size = get_head(model.head).trace_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    expected = flatten_variables(shapes, leaf=lambda v: tuple(v.shape))
    found = flatten_variables(variables, leaf=lambda v: tuple(v.shape))
    problems = [f"missing {k} (expected shape {s})" for k, s in expected.items() if k not in found]
    problems += [f"unexpected {k} (shape {s})" for k, s in found.items() if k not in expected]
    problems += [f"{k}: expected shape {s}, found {found[k]}" for k, s in expected.items()
                 if k in found and found[k] != s]
    if problems:
        raise ConversionError(f"{where}: variables do not fit the model:\n  " + "\n  ".join(problems))


def save_pretrained(path: str | os.PathLike, model: Any, variables: Mapping[str, Any], *,
                    preprocessing: str = "torchvision", classes: list[str] | None = None,
                    source: str | None = None, source_sha256: str | None = None,
                    provenance: Mapping[str, Any] | None = None) -> None:
    """Writes weights with their contract to one safetensors file (see the module docstring).

    Args:
      model: the VGG module the variables belong to (its fields are stored as JSON).
      variables: {"params": ..., "batch_stats": ...} as returned by `load_torchvision` or training.
      preprocessing: the `vgg_flax.preprocessing` preset the weights expect.
      classes: class names in output order; None stores ImageNet's when num_classes == 1000.
      source, source_sha256: where the weights came from, for provenance.
      provenance: more JSON-able facts (registry name, URL, license, accuracy), stored as
        "provenance".
    """
    from safetensors.numpy import save_file

    pp.get_preset(preprocessing)  # fail now on a misspelt preset, not at predict time
    check_variables(model, variables, where=os.fspath(path))
    if classes is None and model.num_classes == 1000 and model.head != "none":
        classes = imagenet_classes()
    if classes is not None and len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    metadata = {"format": FORMAT, "model": json.dumps(model.to_config()),
                "preprocessing": preprocessing, "classes": json.dumps(classes),
                "source": source or "", "source_sha256": source_sha256 or "",
                "provenance": json.dumps(dict(provenance or {}))}
    flat = {k: np.ascontiguousarray(v) for k, v in flatten_variables(variables).items()}
    tmp = os.fspath(path) + f".tmp{os.getpid()}"
    save_file(flat, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under the real name


def pretrained_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a `save_pretrained` file: model, preprocessing, classes, source."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{os.fspath(path)}: not a readable safetensors file: {e}") from e
    if raw.get("format") != FORMAT:
        raise ConversionError(f"{os.fspath(path)}: not a vgg-flax pretrained file (format "
                              f"{raw.get('format')!r}, expected {FORMAT!r}); for torchvision/timm/Keras "
                              "files use load_weights")
    meta = dict(raw)
    meta["model"] = json.loads(raw["model"])
    meta["classes"] = json.loads(raw["classes"])
    meta["provenance"] = json.loads(raw.get("provenance") or "{}")
    return meta


def load_pretrained(path: str | os.PathLike, **overrides) -> tuple[Any, dict[str, Any]]:
    """Loads a `save_pretrained` file as (model, variables).

    Args:
      path: the .safetensors file.
      **overrides: VGG fields to change, e.g. head="dense" (same weights) or dtype=jnp.bfloat16.
    Returns:
      (VGG module, {"params": ..., "batch_stats": ...} of jax arrays).
    """
    meta = pretrained_metadata(path)
    model = VGG.from_config(meta["model"], **overrides)
    flat = read_safetensors(os.fspath(path))
    check_variables(model, unflatten_variables(flat), where=os.fspath(path))
    return model, unflatten_variables({k: to_device(v, v.dtype) for k, v in flat.items()})
