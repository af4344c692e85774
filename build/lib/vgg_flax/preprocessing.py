"""Pixel normalisation presets shared by the converter, the input pipeline and `predict`.

Every preset maps RGB pixels in [0, 255] (any float dtype, NHWC) to the network's input:
`out = (x * scale - mean) / std`, with the channels reversed first for BGR presets.
Pure array code (numpy or jax.numpy): no I/O, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How a set of weights expects its input pixels.

    Attributes:
      mean, std: per channel, in the order the network sees them (BGR for `bgr=True`), after scaling.
      scale: multiplies the [0, 255] pixels first (1/255 for torchvision's ToTensor).
      bgr: reverse RGB to BGR (the original Caffe weights).
      resize: short side before the center crop in evaluation; crop: the crop size.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0 / 255.0
    bgr: bool = False
    resize: int = 256
    crop: int = 224

    def __call__(self, images: Any, xp: Any = np) -> Any:
        """Normalises float[..., 3] RGB pixels in [0, 255]; `xp` is numpy or jax.numpy."""
        x = xp.asarray(images, dtype=xp.float32)
        if self.bgr:
            x = x[..., ::-1]
        mean = xp.asarray(self.mean, xp.float32)
        std = xp.asarray(self.std, xp.float32)
        return (x * self.scale - mean) / std

    def invert(self, x: Any, xp: Any = np) -> Any:
        """Back to RGB pixels in [0, 255] (for showing inputs and for tests)."""
        pixels = (xp.asarray(x, xp.float32) * xp.asarray(self.std, xp.float32)
                  + xp.asarray(self.mean, xp.float32)) / self.scale
        return pixels[..., ::-1] if self.bgr else pixels


PRESETS: dict[str, Normalization] = {
    # torchvision's ImageNet weights: ToTensor (/255) then Normalize.
    "torchvision": Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # torchvision VGG16_Weights.IMAGENET1K_FEATURES (ported from ssd.pytorch): 0-255 input, mean
    # subtraction only (std 1/255 undoes ToTensor's scaling).
    "imagenet1k_features": Normalization(mean=(0.48235, 0.45882, 0.40784),
                                         std=(1 / 255.0, 1 / 255.0, 1 / 255.0)),
    # The original Caffe VGG weights (and Keras applications): BGR, mean-subtracted, no scaling.
    "caffe": Normalization(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0,
                           bgr=True),
    # Data in [-1, 1], for training from scratch on small datasets.
    "symmetric": Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


def get_preset(name: str) -> Normalization:
    """A normalisation preset by name."""
    if name not in PRESETS:
        raise KeyError(f"unknown normalization preset {name!r}; valid names: {sorted(PRESETS)}")
    return PRESETS[name]


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top-left corner of torchvision's CenterCrop: offsets rounded as int(round((H - crop) / 2))."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def resized_short_side(height: int, width: int, short: int) -> tuple[int, int]:
    """(new_h, new_w) of torchvision's Resize(short): the long side is int(short * long / short_in)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short
