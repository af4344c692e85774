"""VGG networks (Simonyan & Zisserman, 2014, arXiv:1409.1556) as one Flax linen module.

Reading order: the `VGG` module, its config pair (`to_config` / `from_config`), then the builders
from one table. The config table and the layer-name contract are in `configs.py`, the small layers
in `layers.py`, the heads in `heads.py`. Images are NHWC. Submodule names are the weight converter's
contract:

    conv{b}_{k}, bn{b}_{k}   k-th conv (and its BatchNorm) of block b, both counted from 1
    fc1, fc2, fc3            the classifier ("torchvision" and "dense" heads)
    head_hidden, head_out    the small-image head

`fc1` is a Dense layer over the (7, 7, C) map flattened in NHWC (row-major h, w, c) order in the
"torchvision" head and the same kernel reshaped to a (7, 7, C, 4096) convolution in the "dense" head,
so the two heads share weights through a reshape. `fc2`/`fc3` are Dense layers in both heads (a Dense
layer over the channel axis of a map is a 1x1 convolution).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax.models.configs import (
    bn_name,
    config_to_json,
    conv_width,
    is_conv_layer,
    is_pool_layer,
    layer_names,
    parse_config,
    relu_name,
    stage_name,
    stages,
)
from vgg_flax.models.heads import get_head
from vgg_flax.models.layers import initializers, local_response_norm
from vgg_flax.ops.conv import make_conv_general_dilated, max_pool_2x2
from vgg_flax.ops.routing import resolve_impl

# Six feature-pyramid levels at reductions 1, 2, 4, 8, 16, 32: the activation before each pool
# (as timm's `features_only`) and the final pooled map, which is timm's sixth level too (its
# `features_only` output after the last pool, equal to our `pool5`), for every head.
PYRAMID_TAPS = ("stage1", "stage2", "stage3", "stage4", "stage5", "pool5")
# The fields that, with the weights, describe a trained VGG (`to_config`). The others (dtype,
# param_dtype, conv_impl, remat_blocks) are run-time choices: `from_config` accepts them too.
CONFIG_FIELDS = ("config", "batch_norm", "head", "num_classes", "dropout_rate", "fc_width",
                 "small_head_width", "weight_init")
_DTYPE_FIELDS = ("dtype", "param_dtype")
DTYPES = ("float32", "bfloat16", "float16")  # the dtype names a config may give


class VGG(nn.Module):
    """A VGG classifier or feature extractor built from a config list.

    Attributes:
      config: a name ("A", "A-LRN", "B", "C", "D", "E" or "vgg16", ...) or a custom list of
        widths, "M", "LRN" and (width, kernel_size) pairs.
      batch_norm: BatchNorm after every conv (torchvision's `_bn` variants).
      head: "torchvision" (adaptive 7x7 pool, FC-4096, FC-4096, FC-classes), "dense" (the paper's
        dense evaluation: FC layers as 7x7 and 1x1 convs, class scores averaged over the map),
        "none" (the final feature map) or "small" (global average pool and a small classifier,
        for 32x32-class images); see `vgg_flax.models.heads`.
      num_classes: classifier outputs.
      dropout_rate: dropout after FC1 and FC2 (and the small head's hidden layer) in training.
      fc_width: width of FC1/FC2 (4096 in the paper).
      small_head_width: hidden width of the small head; 0 for a linear classifier.
      weight_init: "torchvision" or "paper" initialisation.
      dtype: computation dtype (e.g. jnp.bfloat16); logits are returned in float32.
      param_dtype: parameter dtype (float32 by default, also under bf16/fp16 compute).
      conv_impl: how the convs and pools are computed, not what: "auto" (the fastest measured path
        for the backend: on CPU `vgg_flax.ops.conv`'s Winograd convs, blocked filter gradient and
        elementwise pool; plain XLA elsewhere), "xla" or "cpu". Same outputs and gradients up to
        rounding (tests/ops/test_conv.py); jax.grad and jax.vmap work on all. The CPU path defines
        custom VJPs, which JAX cannot differentiate forward: for jax.jvp, jax.jacfwd or
        jax.hessian on CPU use "xla".
      remat_blocks: rematerialise each conv block (`nn.remat` over its convs, BN, ReLUs and pool):
        only block outputs are kept for the backward pass, the rest is recomputed block by block.
        Same values and parameter names. Meant for large batches on small GPUs (unmeasured there);
        it saved no memory on XLA:CPU (docs/training.md) nor in VGG16's bf16 train step compiled
        for TPU v5e at 32 images per chip, where it costs 1.33x the FLOPs (`vgg-flax compile`,
        docs/PERFORMANCE.md, "TPU"): leave it off unless a compile says that it fits only with it.
    """

    config: Any = "D"
    batch_norm: bool = False
    head: str = "torchvision"
    num_classes: int = 1000
    dropout_rate: float = 0.5
    fc_width: int = 4096
    small_head_width: int = 512
    weight_init: str = "torchvision"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conv_impl: str = "auto"
    remat_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, taps: Sequence[str] = ()):
        """Runs the network.

        Args:
          x: float[N, H, W, 3] normalised images (see `vgg_flax.preprocessing`).
          train: dropout on and BatchNorm in batch-statistics mode (call `apply` with
            `mutable=["batch_stats"]` and a "dropout" rng).
          taps: names of intermediate activations to return as well (`tap_names` lists them).
            With a "perturbations" collection holding a zero array per tap, each tap gets it
            added (the rule of flax's `Module.perturb`), so `jax.grad` w.r.t. it is the gradient w.r.t. the
            tap; `vgg_flax.explain.tap_gradients` does this.
        Returns:
          float32[N, num_classes] logits (float[N, h, w, C] features for head "none"); with taps,
          a pair (output, {name: activation}).
        """
        head = get_head(self.head)
        wanted = set(taps)
        unknown = wanted - set(self.tap_names())
        if unknown:
            raise KeyError(f"unknown taps {sorted(unknown)}; valid taps: {self.tap_names()}")
        if taps and self.remat_blocks:
            raise ValueError("taps are not available with remat_blocks=True (values computed inside "
                             "a rematerialised block cannot leave it); use remat_blocks=False")
        found: dict[str, jax.Array] = {}

        def tap(name, value):
            if name in wanted:
                # Flax's `perturb` rule: a zero "perturbations" variable added at the tap has the
                # tap's gradient (vgg_flax.explain). Only read, never created, so `init` with
                # taps adds no collection and an apply without one computes exactly as before.
                if self.has_variable("perturbations", name):
                    value = value + self.get_variable("perturbations", name)
                found[name] = value
            return value

        x = self._features(jnp.asarray(x, self.dtype), train, tap)
        if head.apply is not None:
            x = head.apply(self, x, train, tap).astype(jnp.float32)
        return (x, found) if taps else x

    def tap_names(self) -> list[str]:
        """Every name accepted by `taps`, in network order."""
        names = []
        for name, _ in layer_names(self.config):
            if is_conv_layer(name):
                names += [name, relu_name(name)]
            elif is_pool_layer(name):
                names += [stage_name(name), name]
            else:
                names.append(name)
        return names + list(get_head(self.head).taps)

    def _features(self, x, train, tap):
        for stage in stages(self.config):
            if self.remat_blocks:  # the taps stay empty: values inside a remat cannot leave it
                x = nn.remat(VGG._stage, static_argnums=(2, 3, 4))(self, x, stage, train, None)
            else:
                x = self._stage(x, stage, train, tap)
        return x

    def _stage(self, x, stage, train, tap):
        """The layers of one block (convs [BN] ReLU, LRN, then its pool), in `_features`' scope."""
        tap = tap or (lambda name, value: value)
        for name, entry in stage:
            if is_pool_layer(name):
                tap(stage_name(name), x)
                x = tap(name, self._max_pool(x))
            elif is_conv_layer(name):
                x = tap(name, self._conv_bn(x, name, entry, train))
                x = tap(relu_name(name), nn.relu(x))
            else:
                x = tap(name, local_response_norm(x))
        return x

    def _conv_bn(self, x, name, entry, train):
        """The conv `name` and, with batch_norm, its BatchNorm (PyTorch's momentum and eps)."""
        conv_init, _ = initializers(self.weight_init)
        width, ksize = conv_width(entry)
        pad = ksize // 2
        x = nn.Conv(width, (ksize, ksize), padding=((pad, pad), (pad, pad)), kernel_init=conv_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                    conv_general_dilated_cls=functools.partial(make_conv_general_dilated,
                                                               self.conv_impl))(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=bn_name(name))(x)
        return x

    def _max_pool(self, x):
        """2x2/2 max-pool; on the CPU path with a faster gradient, same values (vgg_flax.ops.conv)."""
        if resolve_impl(self.conv_impl) == "cpu":
            return max_pool_2x2(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    def to_config(self) -> dict[str, Any]:
        """The JSON-able `CONFIG_FIELDS` that, with the weights, rebuild this model (`from_config`).

        A named config stays a name, a custom one becomes a list with [width, kernel] pairs.
        """
        out = {name: getattr(self, name) for name in CONFIG_FIELDS}
        out["config"] = config_to_json(self.config)
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> VGG:
        """The VGG a `to_config` dict (or a training config's `model` section) describes.

        Args:
          config: VGG fields; missing ones take their defaults. "config" may be a name, a list (of
            entries, pairs as lists) or a comma string ("64,M,128,M,256x1,M", `parse_config`);
            dtypes may be names of DTYPES ("bfloat16"). A training config's `model` section is such
            a dict: this is how a run builds its model.
          **overrides: fields to change, e.g. head="dense" (same weights) or dtype=jnp.bfloat16.
        Returns:
          the VGG module.
        """
        fields = {**config, **overrides}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__) - {"parent", "name"})
        if unknown:
            raise KeyError(f"unknown VGG fields {unknown}; valid fields: "
                           f"{list(CONFIG_FIELDS) + ['dtype', 'param_dtype', 'conv_impl', 'remat_blocks']}")
        if "config" in fields:
            fields["config"] = parse_config(fields["config"])
        for name in _DTYPE_FIELDS:
            if isinstance(fields.get(name), str):
                if fields[name] not in DTYPES:
                    raise ValueError(f"config.model.{name} must be one of {DTYPES}, not {fields[name]!r}")
                fields[name] = jnp.dtype(fields[name])
        return cls(**fields)


# Builders: torchvision's eight names and the paper-only configs A-LRN and C. One row per variant
# (name: the VGG fields it fixes); `get_model`, `MODELS` and `vgg-flax models` read this table.
VARIANTS: dict[str, dict[str, Any]] = {
    "vgg11": {"config": "A"}, "vgg11_bn": {"config": "A", "batch_norm": True},
    "vgg11_lrn": {"config": "A-LRN"},
    "vgg13": {"config": "B"}, "vgg13_bn": {"config": "B", "batch_norm": True},
    "vgg16_c": {"config": "C"},
    "vgg16": {"config": "D"}, "vgg16_bn": {"config": "D", "batch_norm": True},
    "vgg19": {"config": "E"}, "vgg19_bn": {"config": "E", "batch_norm": True},
}
MODELS = {name: functools.partial(VGG, **fields) for name, fields in VARIANTS.items()}
# The public names of the builders (vgg_flax.vgg16, ...): MODELS' partials, one per VARIANTS row
# (vgg_flax.models and vgg_flax export the same names, vgg_flax.nnx its NNX builders of them).
globals().update(MODELS)


def get_model(name: str, **kwargs) -> VGG:
    """A model by builder name, e.g. get_model("vgg16_bn", num_classes=10)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_params(variables) -> int:
    """Number of trainable parameters (the "params" collection only, as torchvision counts)."""
    params = variables.get("params", variables) if hasattr(variables, "get") else variables
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
