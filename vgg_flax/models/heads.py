"""The heads on top of VGG's feature extractor, one table (`HEAD_SPECS`) of what each declares.

A head is a function `(vgg, features, train, tap) -> output` run inside the `VGG` module's scope, so
its layers are named at the top level of the parameters (fc1, fc2, fc3; head_hidden, head_out), the
converter's contract. Beside it, each head declares what the rest of the library needs to know about
it instead of testing head names: its classifier layer (the one whose width is the class count and
that fine-tuning resets), its parameterised layers, its extra taps, the input size used to trace its
shapes, and whether torchvision/timm weights exist in its layout. Adding a head is one function and
one `Head` row below.

    torchvision   adaptive 7x7 pool, FC-4096, FC-4096, FC-classes (torchvision's classifier)
    dense         the paper's dense evaluation (Sec. 3.2): fc1 as a 7x7 conv, fc2/fc3 as 1x1 convs,
                  class scores averaged over the map; the same weights as "torchvision"
    none          the final feature map
    small         global average pool and a small classifier, for 32x32-class images
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from vgg_flax.models.configs import FC_POOL_SIZE
from vgg_flax.models.layers import DenseAsConv, adaptive_avg_pool, initializers


class Head(NamedTuple):
    """What a head is and declares.

    apply: (vgg module, float[N, h, w, C] features, train, tap) -> output; None returns the features.
    classifier: name of the layer producing the class scores, or None (no classifier).
    layers: its parameterised layers, in order (everything else is the feature extractor).
    taps: the tap names it adds after the feature extractor's.
    trace_size: a square input side at which `init` traces its shapes (`jax.eval_shape`).
    torchvision_layout: True if torchvision/timm state dicts exist in its layout.
    """

    apply: Callable[..., Any] | None
    classifier: str | None
    layers: tuple[str, ...]
    taps: tuple[str, ...]
    trace_size: int
    torchvision_layout: bool


def _dense(m, features: int, name: str) -> nn.Dense:
    _, fc_init = initializers(m.weight_init)
    return nn.Dense(features, kernel_init=fc_init, dtype=m.dtype, param_dtype=m.param_dtype, name=name)


def _dropout(m, x, train: bool):
    return nn.Dropout(m.dropout_rate, deterministic=not train)(x)


def torchvision_head(m, x, train, tap):
    x = adaptive_avg_pool(x, FC_POOL_SIZE)
    x = x.reshape(x.shape[0], -1)  # NHWC order; the converter permutes torchvision's rows.
    x = _dropout(m, nn.relu(_dense(m, m.fc_width, "fc1")(x)), train)
    x = _dropout(m, nn.relu(_dense(m, m.fc_width, "fc2")(x)), train)
    return _dense(m, m.num_classes, "fc3")(tap("pre_logits", x))


def dense_head(m, x, train, tap):
    """The paper's dense evaluation (Sec. 3.2), with timm's pooling of small maps up to 7x7."""
    kh, kw = FC_POOL_SIZE
    _, h, w, _ = x.shape
    if h < kh or w < kw:
        x = adaptive_avg_pool(x, (max(h, kh), max(w, kw)))
    _, fc_init = initializers(m.weight_init)
    x = DenseAsConv(m.fc_width, (kh, kw), kernel_init=fc_init, dtype=m.dtype,
                    param_dtype=m.param_dtype, name="fc1")(x)
    x = _dropout(m, nn.relu(x), train)
    x = _dropout(m, nn.relu(_dense(m, m.fc_width, "fc2")(x)), train)
    scores = tap("score_map", _dense(m, m.num_classes, "fc3")(tap("pre_logits", x)))
    return scores.astype(jnp.float32).mean(axis=(1, 2))


def small_head(m, x, train, tap):
    x = x.mean(axis=(1, 2))
    if m.small_head_width:
        x = _dense(m, m.small_head_width, "head_hidden")(x)
        x = _dropout(m, nn.relu(x), train)
    return _dense(m, m.num_classes, "head_out")(tap("pre_logits", x))


# trace_size: 224 for the FC heads, the size their weights were made for (any side of 32+ traces
# the same shapes through the adaptive pool); 32, the smallest input five pools take, for the rest.
HEAD_SPECS: dict[str, Head] = {
    "torchvision": Head(torchvision_head, "fc3", ("fc1", "fc2", "fc3"), ("pre_logits",), 224, True),
    "dense": Head(dense_head, "fc3", ("fc1", "fc2", "fc3"), ("pre_logits", "score_map"), 224, True),
    "none": Head(None, None, (), (), 32, True),
    "small": Head(small_head, "head_out", ("head_hidden", "head_out"), ("pre_logits",), 32, False),
}
HEADS = tuple(HEAD_SPECS)
# Every head's classifier layer: what fine-tuning with a new class count leaves freshly initialised.
CLASSIFIER_LAYERS = tuple(dict.fromkeys(h.classifier for h in HEAD_SPECS.values() if h.classifier))


def get_head(head: str) -> Head:
    """A head's spec by name; a KeyError lists the valid heads."""
    if head not in HEAD_SPECS:
        raise KeyError(f"unknown head {head!r}; valid heads: {HEADS}")
    return HEAD_SPECS[head]


def classifier_layer(head: str) -> str | None:
    """The layer producing a head's class scores ("fc3", "head_out"), or None for head "none"."""
    return get_head(head).classifier


def classifier_in(params) -> str | None:
    """Which classifier layer (of any head) a parameter tree holds, or None."""
    return next((name for name in CLASSIFIER_LAYERS if name in params), None)
