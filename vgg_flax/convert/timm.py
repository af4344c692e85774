"""timm's VGG layout (the hub's `timm/vgg16.tv_in1k` copies): torchvision's `features.*`, and a
fully convolutional classifier: `pre_logits.fc1` a 7x7 Conv2d (torchvision's classifier.0 reshaped
to (4096, 512, 7, 7)), `pre_logits.fc2` a 1x1 Conv2d, `head.fc` a Linear."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from vgg_flax.convert import torchvision
from vgg_flax.convert.rules import Layout, Rule
from vgg_flax.models import FC_POOL_SIZE

KEYS = ("pre_logits.fc1", "pre_logits.fc2", "head.fc")


def classifier_rules(channels: int, fc_width: int, num_classes: int) -> list[Rule]:
    """timm's classifier: fc1 a (out, C, 7, 7) conv, fc2 a (out, in, 1, 1) conv, head.fc a Linear."""
    return torchvision.head_rules(KEYS, ((fc_width, channels, *FC_POOL_SIZE), "fc1_conv"),
                                  ((fc_width, fc_width, 1, 1), "conv1x1"), fc_width, num_classes)


def detect(state: Mapping[str, object]) -> bool:
    return any(k.startswith(("pre_logits.", "head.fc.")) for k in state)


LAYOUT = Layout("timm", detect, functools.partial(torchvision.infer_architecture, layout="timm", keys=KEYS),
                torchvision.rules_with(classifier_rules), classifier_key=KEYS[0] + ".weight",
                preprocessing="torchvision")
