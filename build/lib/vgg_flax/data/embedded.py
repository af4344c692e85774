"""Datasets that ship with vgg-flax, as TFDS builders built locally (no download).

Importing this module does not import TensorFlow; `get_builder_class` imports the builder module (which
registers the builder with TFDS) only when a pipeline asks for it.
"""

from __future__ import annotations

import importlib

# Builder name (what `create_dataset` accepts) -> "module:class", imported on demand.
EMBEDDED = {"sklearn_digits": "vgg_flax.data.sklearn_digits:SklearnDigits"}


def get_builder_class(name: str):
    """The TFDS builder class of an embedded dataset, imported lazily (it imports TFDS)."""
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded dataset {name!r}; valid names: {sorted(EMBEDDED)}")
    module, cls = EMBEDDED[name].split(":")
    return getattr(importlib.import_module(module), cls)
