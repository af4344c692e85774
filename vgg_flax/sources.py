"""Weights by source: the one place that picks the loader for a name, URL, path or state dict.

`vgg_flax.from_pretrained` (registry names, URLs, the hub) is looked up on the package when it is
called, so this module works with and without it; without it, paths and state dicts go through
`vgg_flax.load_torchvision`, which is what `from_pretrained` does for them too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import vgg_flax


def load(source: str | os.PathLike | Mapping[str, Any], **kwargs) -> tuple[Any, dict[str, Any]]:
    """(linen model, variables) from `vgg_flax.from_pretrained` or, for paths and state dicts only,
    `vgg_flax.load_torchvision`; `kwargs` (head, dtype, ...) go to the loader."""
    loader = getattr(vgg_flax, "from_pretrained", None)
    if loader is not None:
        return loader(source, **kwargs)
    if not isinstance(source, Mapping) and not os.path.exists(os.fspath(source)):
        raise FileNotFoundError(f"{os.fspath(source)!r} is not a weight file; weights by name need "
                                "vgg_flax.from_pretrained, which this install lacks: pass a path or "
                                "a state dict")
    return vgg_flax.load_torchvision(source, **kwargs)
