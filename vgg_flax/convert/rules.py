"""The conversion table's neutral parts: one `Rule` per tensor, layout kinds, what a source declares.

Every tensor moves by one `Rule`: a source key, a Flax variable path, the source shape, and a layout
`kind` whose pair of pure functions (`KINDS`) maps the tensor both ways:

    copy         the same layout: biases, BatchNorm weight/bias/running stats, and Keras's HWIO
                 conv kernels and (in, out) Dense kernels, which are Flax's layouts already
    conv         Conv2d weight OIHW  <-> Flax HWIO
    linear       Linear weight (out, in)  <-> Dense kernel (in, out)
    fc1_linear   classifier.0 (out, C*7*7), flattened channel-major (c, h, w) by torch's NCHW flatten
                 <-> fc1's Dense kernel (7*7*C, out) in NHWC (h, w, c) row order
    fc1_conv     timm's pre_logits.fc1 Conv2d (out, C, 7, 7) <-> the same fc1 kernel
    conv1x1      timm's pre_logits.fc2 Conv2d (out, in, 1, 1) <-> fc2's Dense kernel (in, out)
    conv_dense   keras-hub's fc1 / fc2 Conv2D kernels (7, 7, C, out) / (1, 1, in, out), HWIO
                 <-> the Dense kernel (7*7*C, out) / (in, out): a reshape, HWIO rows are NHWC's order

A weight source is a `Layout`: how to recognise its keys, infer the architecture from them, list its
rules, and which preprocessing preset its weights expect. Each source is one module (torchvision.py,
timm.py, keras.py, keras_hub.py) that fills in a `Layout`; `engine.py` holds the table of them and
does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from vgg_flax.convert.errors import ConversionError
from vgg_flax.models import FC_POOL_SIZE

_KH, _KW = FC_POOL_SIZE


def _fc1_to_flax(w):  # (out, C*7*7) channel-major -> (7, 7, C, out), i.e. (7*7*C, out) NHWC rows
    return w.reshape(w.shape[0], -1, _KH, _KW).transpose(2, 3, 1, 0)


def _fc1_to_torch(k, shape):
    return k.reshape(_KH, _KW, -1, k.shape[1]).transpose(3, 2, 0, 1).reshape(shape)


# kind -> (source tensor -> flax array, or None to keep the layout;
#          (flax array, source shape) -> source tensor)
KINDS: dict[str, tuple[Callable | None, Callable]] = {
    "copy": (None, lambda k, s: k),
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k, s: k.transpose(3, 2, 0, 1)),
    "linear": (lambda w: w.T, lambda k, s: k.T),
    "fc1_linear": (_fc1_to_flax, _fc1_to_torch),
    "fc1_conv": (_fc1_to_flax, _fc1_to_torch),
    "conv1x1": (lambda w: w.reshape(w.shape[:2]).T, lambda k, s: k.T.reshape(s)),
    "conv_dense": (None, lambda k, s: k.reshape(s)),
}
# kind -> (source shape -> the Flax shape the converted tensor is reshaped to), for kinds that reshape.
RESHAPES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "fc1_linear": lambda s: (-1, s[0]),
    "fc1_conv": lambda s: (-1, s[0]),
    "conv_dense": lambda s: (-1, s[-1]),
}


class Rule(NamedTuple):
    """One tensor: source key and shape, Flax path ("params", "conv1_1", "kernel"), layout kind."""

    key: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str


class Architecture(NamedTuple):
    """What a state dict holds, inferred from its keys and shapes."""

    config: Any
    batch_norm: bool
    num_classes: int
    fc_width: int
    layout: str            # a key of engine.LAYOUTS
    has_classifier: bool   # False for features-only state dicts


class Layout(NamedTuple):
    """A weight source's rules: what a module per source (torchvision.py, keras.py, ...) declares.

    detect: (state) -> True when the keys are in this layout.
    infer: (state, **model_kwargs) -> Architecture; explicit model_kwargs win over the weights.
    rules: (Architecture, with_classifier) -> (rules, source keys read but deliberately unused).
    classifier_key: the first classifier tensor's key, named when a file has none.
    preprocessing: the `vgg_flax.preprocessing` preset its weights expect.
    nan_classifier_preprocessing: the preset of a features-only file whose classifier is NaN
      (torchvision's IMAGENET1K_FEATURES), or None: NaN weights are then an error.
    """

    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    infer: Callable[..., Architecture]
    rules: Callable[[Architecture, bool], tuple[list[Rule], list[str]]]
    classifier_key: str
    preprocessing: str
    nan_classifier_preprocessing: str | None = None


def check_state(state: Mapping[str, np.ndarray], rules: list[Rule], ignored: list[str],
                where: str) -> None:
    """Raises one ConversionError listing every missing, unexpected and wrongly shaped key."""
    wanted = {r.key for r in rules}
    problems = [f"missing key {r.key!r} (expected shape {r.shape}, for {'/'.join(r.path)})"
                for r in rules if r.key not in state]
    problems += [f"key {r.key!r}: expected shape {r.shape}, found {tuple(state[r.key].shape)}"
                 for r in rules if r.key in state and tuple(state[r.key].shape) != r.shape]
    problems += [f"unexpected key {k!r} (shape {tuple(v.shape)})" for k, v in state.items()
                 if k not in wanted and k not in ignored]
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        raise ConversionError(f"cannot convert {where}: {len(problems)} problem(s):\n  "
                              + "\n  ".join(problems[:20] + more))
