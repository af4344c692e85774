"""The pretrained weights we know by name: torchvision's VGG weights with their published facts.

The facts are copied from torchvision's weights enums (`torchvision/models/vgg.py`, the
`VGG*_Weights` classes: URL with its sha256 prefix, parameter count, ImageNet-1k acc@1/acc@5,
GMACs, file size in MB, transforms); `tests/convert/test_registry.py` checks this table against
them wherever torchvision is installed. timm's hub copies (`timm/vgg16.tv_in1k`) hold the same
IMAGENET1K_V1 weights, so each name is also reachable by its timm tag.
"""

from __future__ import annotations

import math
from typing import NamedTuple

TORCHVISION_BASE = "https://download.pytorch.org/models"
TORCHVISION_LICENSE = "BSD-3-Clause (torchvision)"


class Pretrained(NamedTuple):
    """One weights entry: where the file is and what it promises."""

    name: str             # our name, also torchvision's builder name
    builder: str          # vgg_flax.MODELS key of the architecture
    file: str             # file name under `base`, with torch.hub's sha256 prefix
    params: int
    acc1: float           # ImageNet-1k val top-1 (%), as published; NaN for features-only weights
    acc5: float
    gmacs: float          # at 224 x 224
    file_size_mb: float   # as torchvision lists it (MiB: bytes / 2**20)
    layout: str           # the file's key layout: a vgg_flax.convert.engine.LAYOUTS name
    preprocessing: str    # the vgg_flax.preprocessing preset the weights expect
    features_only: bool = False
    license: str = TORCHVISION_LICENSE
    base: str = TORCHVISION_BASE
    hub: str | None = None  # the timm hub copy, for `hf-hub:` loading

    @property
    def url(self) -> str:
        return f"{self.base}/{self.file}"


def _tv(name, file, params, acc1, acc5, gmacs, size, builder=None, features_only=False):
    return Pretrained(name, builder or name, file, params, acc1, acc5, gmacs, size, "torchvision",
                      "imagenet1k_features" if features_only else "torchvision", features_only,
                      hub=None if features_only else f"timm/{name}.tv_in1k")


REGISTRY: dict[str, Pretrained] = {e.name: e for e in (
    _tv("vgg11", "vgg11-8a719046.pth", 132_863_336, 69.020, 88.628, 7.609, 506.84),
    _tv("vgg11_bn", "vgg11_bn-6002323d.pth", 132_868_840, 70.370, 89.810, 7.609, 506.881),
    _tv("vgg13", "vgg13-19584684.pth", 133_047_848, 69.928, 89.246, 11.308, 507.545),
    _tv("vgg13_bn", "vgg13_bn-abd245e5.pth", 133_053_736, 71.586, 90.374, 11.308, 507.59),
    _tv("vgg16", "vgg16-397923af.pth", 138_357_544, 71.592, 90.382, 15.47, 527.796),
    _tv("vgg16.features", "vgg16_features-amdegroot-88682ab5.pth", 138_357_544, math.nan,
        math.nan, 15.47, 527.802, builder="vgg16", features_only=True),
    _tv("vgg16_bn", "vgg16_bn-6c64b313.pth", 138_365_992, 73.360, 91.516, 15.47, 527.866),
    _tv("vgg19", "vgg19-dcbb9e9d.pth", 143_667_240, 72.376, 90.876, 19.632, 548.051),
    _tv("vgg19_bn", "vgg19_bn-c79401a0.pth", 143_678_248, 74.218, 91.842, 19.632, 548.143),
)}
# timm's tags for the same files.
ALIASES = {f"{e.name}.tv_in1k": e.name for e in REGISTRY.values() if e.hub}


def get(name: str) -> Pretrained:
    """The entry of a name or a timm tag; KeyError listing the valid names."""
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise KeyError(f"no pretrained weights named {name!r}; valid names: "
                       f"{sorted(REGISTRY) + sorted(ALIASES)}")
    return REGISTRY[key]
