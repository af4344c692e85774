"""Starting a run from other weights: the paper's warm start from net A, and fine-tuning.

Paper, Sec. 3.1: "we began with training the configuration A, shallow enough to be trained with
random initialisation. Then, when training deeper architectures, we initialised the first four
convolutional layers and the last three fully-connected layers with the layers of net A (the
intermediate layers were initialised randomly)." Net A's first four convs are conv1_1, conv2_1,
conv3_1 and conv3_2; every deeper config (B, C, D, E) has layers of the same names and shapes, so the
copy is by name. Fine-tuning copies every layer the two networks share and can leave the classifier
freshly initialised for a new class count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

PAPER_WARM_START_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc1", "fc2", "fc3")
CLASSIFIER_LAYERS = ("fc3", "head_out")


class WeightsMismatchError(ValueError):
    """Source weights that do not fit the network being trained (names, shapes or classes)."""


def _class_count(params: Mapping[str, Any]) -> int | None:
    for name in CLASSIFIER_LAYERS:
        if name in params:
            return int(np.shape(params[name]["bias"])[0])
    return None


def check_class_count(source_params: Mapping[str, Any], num_classes: int, what: str) -> None:
    """Raises when the source classifier's class count differs (and the head is not being reset)."""
    have = _class_count(source_params)
    if have is not None and have != num_classes:
        raise WeightsMismatchError(
            f"{what} has {have} classes but the run has {num_classes}; set reset_head=True to train a "
            f"new classifier, or num_classes={have}")


def transplant(target: Mapping[str, Any], source: Mapping[str, Any], layers: Iterable[str],
               *, collection: str = "params", strict: bool = True) -> dict[str, Any]:
    """A copy of `target[collection]` with the named layers taken from `source[collection]`.

    BatchNorm layers follow their conv (bn{b}_{k} with conv{b}_{k}) when both networks have them.
    With strict, a named layer missing from either side or of another shape is an error.
    """
    tgt, src = dict(target.get(collection, {})), source.get(collection, {})
    names = list(layers)
    names += ["bn" + n[4:] for n in names if n.startswith("conv") and "bn" + n[4:] in tgt]
    for name in names:
        if name not in src or name not in tgt:
            if strict and not name.startswith("bn"):
                raise WeightsMismatchError(f"layer {name!r} is missing from the "
                                           f"{'source' if name not in src else 'target'} network")
            continue
        tgt_shapes = jax.tree_util.tree_map(np.shape, tgt[name])
        src_shapes = jax.tree_util.tree_map(np.shape, src[name])
        if tgt_shapes != src_shapes:
            raise WeightsMismatchError(f"layer {name!r}: source shapes {src_shapes} do not match the "
                                       f"network's {tgt_shapes}")
        tgt[name] = jax.tree_util.tree_map(lambda a, t: np.asarray(a, dtype=t.dtype), src[name], tgt[name])
    return tgt


def paper_warm_start(variables: Mapping[str, Any], net_a: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of a deeper net with net A's first four convs and three FC layers (Sec. 3.1)."""
    check_class_count(net_a["params"], int(np.shape(variables["params"]["fc3"]["bias"])[0]),
                      "the net A checkpoint")
    out = dict(variables)
    out["params"] = transplant(variables, net_a, PAPER_WARM_START_LAYERS)
    if "batch_stats" in variables and "batch_stats" in net_a:
        out["batch_stats"] = transplant(variables, net_a, PAPER_WARM_START_LAYERS,
                                        collection="batch_stats", strict=False)
    return out


def fine_tune_start(variables: Mapping[str, Any], pretrained: Mapping[str, Any], *,
                    reset_head: bool) -> dict[str, Any]:
    """Every layer shared with `pretrained`; the classifier stays freshly initialised if reset_head."""
    num_classes = _class_count(variables["params"])
    if not reset_head and num_classes is not None:
        check_class_count(pretrained["params"], num_classes, "the pretrained weights")
    skip = set(CLASSIFIER_LAYERS) if reset_head else set()
    out = dict(variables)
    for collection in ("params", "batch_stats"):
        if collection in variables and collection in pretrained:
            shared = [n for n in variables[collection] if n in pretrained[collection] and n not in skip]
            out[collection] = transplant(variables, pretrained, shared, collection=collection)
    return out
