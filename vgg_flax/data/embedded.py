"""Datasets that ship with vgg-flax, as TFDS builders built locally (no download).

Importing this module does not import TensorFlow; `builder_class` imports the builder module (which
registers the builder with TFDS) only when a pipeline asks for it.
"""

from __future__ import annotations


def _sklearn_digits():
    from vgg_flax.data.sklearn_digits import SklearnDigits

    return SklearnDigits


# Builder name (what `create_dataset` accepts) -> fn() -> its TFDS builder class, imported on demand.
# A new embedded dataset is a builder module in vgg_flax/data/ and a row here.
EMBEDDED = {"sklearn_digits": _sklearn_digits}


def builder_class(name: str):
    """The TFDS builder class of an embedded dataset, imported lazily (it imports TFDS)."""
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded dataset {name!r}; valid names: {sorted(EMBEDDED)}")
    return EMBEDDED[name]()
