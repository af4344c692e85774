"""The torch side of conversion checks: torchvision's VGG for any config, and a logits self-check.

Imports torch inside functions only, so the library imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_flax.convert.engine import to_torchvision
from vgg_flax.models import FC_POOL_SIZE, VGG, resolve_config


def torch_reference(model: VGG):
    """A torch module with torchvision's VGG structure for `model`'s config (needs torch).

    torchvision's own `VGG` class around a `features` Sequential built like its `make_layers`, plus
    `LocalResponseNorm(5, 1e-4, 0.75, 2)` for "LRN" and 1x1 convs for config C, which torchvision
    does not ship. `to_torchvision(model, variables)` loads into it with strict=True.
    """
    import torch
    from torch import nn
    from torchvision.models.vgg import VGG as TorchVGG

    layers, channels = [], 3
    for entry in resolve_config(model.config):
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif entry == "LRN":
            layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            width, ksize = entry if isinstance(entry, tuple) else (entry, 3)
            layers.append(nn.Conv2d(channels, width, ksize, padding=ksize // 2))
            if model.batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
    reference = TorchVGG(nn.Sequential(*layers), num_classes=model.num_classes, init_weights=False)
    if model.fc_width != 4096 or channels != 512:
        pooled = channels * FC_POOL_SIZE[0] * FC_POOL_SIZE[1]
        reference.classifier = nn.Sequential(
            nn.Linear(pooled, model.fc_width), nn.ReLU(True), nn.Dropout(),
            nn.Linear(model.fc_width, model.fc_width), nn.ReLU(True), nn.Dropout(),
            nn.Linear(model.fc_width, model.num_classes))
    return reference.to(torch.float32).eval()


def self_check(model: VGG, variables: Mapping[str, Any], size: tuple[int, int] = (224, 224),
               seed: int = 0) -> tuple[float, float]:
    """Max abs difference between Flax and torch outputs for the same weights on random input.

    The torch side is `torch_reference(model)` loaded (strict=True) with `to_torchvision`'s export;
    for head "none" the feature maps are compared. Returns (max abs diff, max abs torch output).
    """
    import torch

    reference = torch_reference(model)
    exported = to_torchvision(model, variables)
    if model.head == "none":
        reference.classifier = torch.nn.Identity()
        exported = {k: v for k, v in exported.items() if k.startswith("features.")}
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                              strict=model.head != "none")
    x = np.random.default_rng(seed).standard_normal((1, 3, *size), dtype=np.float32)
    with torch.no_grad():
        expected = (reference.features(torch.from_numpy(x)) if model.head == "none"
                    else reference(torch.from_numpy(x))).numpy()
    got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    if model.head == "none":
        got = got.transpose(0, 3, 1, 2)
    return float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))
