"""The VGG networks as Flax NNX modules: the linen `VGG` wrapped, one architecture definition.

`VGG` is a `flax.nnx.bridge.ToNNX` over the linen module whose variables are attributes named as
the converter's contract: `m.conv1_1["kernel"]` is an `nnx.Param`, `m.bn1_1["mean"]` an
`nnx.BatchStat`, and `nnx.state(m, nnx.Param)` / `nnx.state(m, nnx.BatchStat)` have exactly the
paths of the linen "params" / "batch_stats" collections (conv1_1/kernel, bn1_1/mean, fc1/bias, ...).
Besides them the state holds the dropout key stream, under flax's own attribute `to_nnx__rngs`.

Why the bridge and not a native copy: the numbers come from the one linen definition (its
conv routing, heads, taps), so nothing can drift. `ToNNX` and `nnx.Optimizer` are the same in
flax 0.12.8 and 0.12.12 (the versions Python 3.11 and 3.12+ get). `from_variables` sets the
attributes from given variables without running an init.

    m = vgg_flax.nnx.vgg16(num_classes=10, rngs=nnx.Rngs(0))
    logits = m(x)                                   # as model.apply(variables, x)
    out, feats = m(x, taps=("relu1_2", "relu2_2"))  # as apply with taps
    logits = m(x, train=True)                       # BatchNorm statistics updated in place
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict

from vgg_flax import models
from vgg_flax.convert.pretrained import from_pretrained as _from_pretrained

# linen collection -> the NNX variable type that holds it (as flax.nnx.bridge maps them).
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}
# Parameter shapes do not depend on the image size (the heads pool to fixed sizes), so builders
# initialise on one small image.
_INIT_SHAPE = (1, 32, 32, 3)


class VGG(nnx.bridge.ToNNX):
    """A linen `vgg_flax.VGG` and its variables as an NNX module; build with `from_variables`.

    Attributes (besides the layers, named as in linen): `linen`, the wrapped linen module.
    """

    def __init__(self, model: models.VGG, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None):
        unknown = set(variables) - set(COLLECTIONS)
        if unknown:
            raise ValueError(f"variables hold collections {sorted(unknown)}; a VGG has only "
                             f"{sorted(COLLECTIONS)}")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        # Only a dropout stream: ToNNX draws every stored stream on each call.
        super().__init__(model, rngs=nnx.Rngs(dropout=rngs.dropout()))
        for name, tree in _attributes(variables).items():
            setattr(self, name, nnx.data(tree))

    @property
    def linen(self) -> models.VGG:
        return self.to_nnx__module

    def __call__(self, x: jax.Array, train: bool = False, taps: Sequence[str] = (), *,
                 rngs: nnx.Rngs | None = None):
        """`linen.apply(variables, x, train=train, taps=taps)`; in train mode the BatchNorm statistics
        are written back and dropout keys come from `rngs` (default: the module's stream).

        Args:
          x: float[N, H, W, 3] normalised images.
        Returns:
          what linen's `apply` returns: logits float32[N, classes] (features for head "none"),
          with taps a pair (output, {name: activation}).
        """
        return super().__call__(x, train=train, taps=tuple(taps), rngs=rngs,
                                mutable=["batch_stats"] if train else False)

    def tap_names(self) -> list[str]:
        """Every name accepted by `taps`, in network order."""
        return self.linen.tap_names()


def _attributes(variables: Mapping[str, Any]) -> dict[str, dict]:
    """{layer: {leaf: Variable}} from linen variables, merging a layer's params and batch_stats."""
    layers: dict[str, dict] = {}
    for collection, var_type in COLLECTIONS.items():
        for path, value in flatten_dict(dict(variables.get(collection, {}))).items():
            node = layers.setdefault(path[0], {})
            for key in path[1:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = var_type(jnp.asarray(value))
    return layers


def from_variables(model: models.VGG, variables: Mapping[str, Any], *,
                   rngs: nnx.Rngs | None = None) -> VGG:
    """An NNX module from a linen VGG and its variables (`load_torchvision`, a checkpoint, `init`).

    The arrays are shared, not copied; `to_variables` gives them back. `rngs` keys dropout in train
    mode (its "dropout" stream, else its default; nnx.Rngs(0) when None).
    """
    return VGG(model, variables, rngs=rngs)


def to_variables(module: VGG) -> dict[str, Any]:
    """The linen variables {"params": ..., "batch_stats": ...} of an NNX VGG (the same arrays)."""
    out = {}
    for collection, var_type in COLLECTIONS.items():
        tree = nnx.to_pure_dict(nnx.state(module, var_type))
        if tree:
            out[collection] = tree
    return out


def from_pretrained(source: str | os.PathLike | Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                    **kwargs) -> VGG:
    """`from_variables(*vgg_flax.from_pretrained(source, **kwargs))`: weights by name, URL, path or
    state dict (`head`, `dtype`, ... as there). Without `vgg_flax.from_pretrained` installed, paths
    and state dicts go through `vgg_flax.load_torchvision`."""
    return from_variables(*_from_pretrained(source, **kwargs), rngs=rngs)


def build(name: str, *, rngs: nnx.Rngs, **model_kwargs) -> VGG:
    """A freshly initialised NNX VGG by builder name ("vgg16", ...); `model_kwargs` as the linen
    builders take (num_classes, head, batch_norm, dtype, ...). Parameters come from rngs.params()."""
    model = models.get_model(name, **model_kwargs)
    variables = jax.jit(model.init)(rngs.params(), jnp.zeros(_INIT_SHAPE, model.param_dtype))
    return VGG(model, variables, rngs=rngs)


# The linen builders' names, each an NNX builder: vgg16(num_classes=10, rngs=nnx.Rngs(0)).
globals().update({name: functools.partial(build, name) for name in models.VARIANTS})

__all__ = ["VGG", "build", "from_pretrained", "from_variables", "to_variables", *models.VARIANTS]
