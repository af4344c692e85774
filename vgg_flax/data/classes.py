"""The 1000 ImageNet-1k class names, in the output order of torchvision's (and timm's) weights."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def _names() -> tuple[str, ...]:
    text = resources.files("vgg_flax.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(text.splitlines())
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, not 1000 (a broken install)")
    return names


def imagenet_classes() -> list[str]:
    """The 1000 class names (a fresh list: callers may keep or change it)."""
    return list(_names())
