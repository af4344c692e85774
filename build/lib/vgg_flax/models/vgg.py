"""VGG networks (Simonyan & Zisserman, 2014, arXiv:1409.1556) as one Flax linen module.

Reading order: the config table, the small pure layers (adaptive pooling, LRN), the `VGG` module,
then the builders. Images are NHWC. Submodule names are the weight converter's contract:

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
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax.ops.conv import make_conv_general_dilated, max_pool_2x2, resolve_impl

# A config entry is a conv width (3x3 conv), "M" (2x2/2 max-pool), "LRN" (local response
# normalisation) or a (width, kernel_size) pair for other square kernels such as config C's 1x1.
ConfigEntry = int | str | tuple[int, int]

CONFIGS: dict[str, tuple[ConfigEntry, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "A-LRN": (64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "C": (64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
# The torchvision / common names of the paper's configs.
CONFIG_ALIASES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C",
                  "vgg16": "D", "vgg19": "E"}

HEADS = ("torchvision", "dense", "none", "small")
# Six feature-pyramid levels at reductions 1, 2, 4, 8, 16, 32: the activation before each pool
# (as timm's `features_only`) and the final pooled map. timm's sixth level is its 4096-channel
# pre-logits map; ours is `pool5` so that the pyramid exists for every head.
PYRAMID_TAPS = ("stage1", "stage2", "stage3", "stage4", "stage5", "pool5")
FC_POOL_SIZE = (7, 7)  # torchvision's AdaptiveAvgPool2d((7, 7)); the paper's FC1 receptive field.


def resolve_config(config: str | Sequence[ConfigEntry]) -> tuple[ConfigEntry, ...]:
    """A config name ("D", "vgg16", ...) or a custom list, checked, as a tuple of entries."""
    if isinstance(config, str):
        key = CONFIG_ALIASES.get(config, config)
        if key not in CONFIGS:
            raise KeyError(f"unknown VGG config {config!r}; valid names: "
                           f"{sorted(CONFIGS) + sorted(CONFIG_ALIASES)}")
        return CONFIGS[key]
    entries = tuple(tuple(e) if isinstance(e, list) else e for e in config)
    for e in entries:
        ok = (e in ("M", "LRN") or (isinstance(e, int) and e > 0)
              or (isinstance(e, tuple) and len(e) == 2 and all(isinstance(v, int) and v > 0
                                                              for v in e)))
        if not ok:
            raise ValueError(f"bad config entry {e!r}: expected a width, 'M', 'LRN' or "
                             "a (width, kernel_size) pair")
    return entries


def layer_names(config: str | Sequence[ConfigEntry]) -> list[tuple[str, ConfigEntry]]:
    """(name, entry) for every entry of a config: conv{b}_{k}, lrn{b}, pool{b}."""
    names, block, k = [], 1, 0
    for e in resolve_config(config):
        if e == "M":
            names.append((f"pool{block}", e))
            block, k = block + 1, 0
        elif e == "LRN":
            names.append((f"lrn{block}", e))
        else:
            k += 1
            names.append((f"conv{block}_{k}", e))
    return names


def _stages(config) -> list[tuple[tuple[str, ConfigEntry], ...]]:
    """`layer_names` cut into blocks, each ending with its pool (the last may have none)."""
    stages, current = [], []
    for name, entry in layer_names(config):
        current.append((name, entry))
        if name.startswith("pool"):
            stages.append(tuple(current))
            current = []
    return stages + ([tuple(current)] if current else [])


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d on NHWC maps, for any input size (also smaller than the output).

    Window i of n outputs over a length-L axis covers [floor(i L / n), ceil((i + 1) L / n)), as in
    PyTorch. Done as two small averaging matrices, exact for windows that overlap or repeat.

    Args:
      x: float[N, H, W, C].
      output_size: (out_h, out_w).
    Returns:
      float[N, out_h, out_w, C].
    """
    _, h, w, _ = x.shape
    if (h, w) == tuple(output_size):
        return x
    ph = _pool_matrix(h, output_size[0]).astype(x.dtype)
    pw = _pool_matrix(w, output_size[1]).astype(x.dtype)
    return jnp.einsum("nhwc,oh,pw->nopc", x, ph, pw, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=64)
def _pool_matrix(length: int, out: int) -> np.ndarray:
    m = np.zeros((out, length), np.float32)
    for i in range(out):
        start, end = (i * length) // out, -((-(i + 1) * length) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def local_response_norm(x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 2.0) -> jax.Array:
    """Cross-channel LRN with torch.nn.LocalResponseNorm's semantics (AlexNet's defaults).

    b_c = a_c / (k + alpha / size * sum_{c' in window(c)} a_{c'}^2) ** beta, the window running from
    c - size // 2 to c + (size - 1) // 2, zero-padded at the ends.
    """
    sq = jnp.square(x.astype(jnp.float32))
    padded = jnp.pad(sq, [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)])
    window_sum = jax.lax.reduce_window(padded, 0.0, jax.lax.add,
                                       (1,) * (x.ndim - 1) + (size,), (1,) * x.ndim, "VALID")
    div = jnp.power(k + alpha / size * window_sum, beta)
    return (x.astype(jnp.float32) / div).astype(x.dtype)


def _initializers(init: str):
    """(conv kernel, dense kernel) initialisers.

    "torchvision": kaiming normal (fan_out, ReLU gain) convs, N(0, 0.01) Dense layers.
    "paper": N(0, 0.01) everywhere. The paper states "10^-2 variance"; the authors' released Caffe
    definitions used std 0.01, and std 0.1 diverges for deep nets, so std 0.01 it is.
    """
    if init == "torchvision":
        return nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.normal(0.01)
    if init == "paper":
        return nn.initializers.normal(0.01), nn.initializers.normal(0.01)
    raise KeyError(f"unknown init {init!r}; valid: 'torchvision', 'paper'")


class DenseAsConv(nn.Module):
    """A VALID convolution whose kernel is stored as a Dense kernel float[kh * kw * C, features].

    The storage matches the "torchvision" head's fc1 (NHWC flatten order), so one set of weights
    serves both heads; the paper's dense evaluation slides it over larger maps.
    """

    features: int
    window: tuple[int, int]
    kernel_init: Any = nn.initializers.normal(0.01)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.window
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh * kw * c, self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.reshape(kh, kw, c, self.features).astype(self.dtype),
            (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class VGG(nn.Module):
    """A VGG classifier or feature extractor built from a config list.

    Attributes:
      config: a name ("A", "A-LRN", "B", "C", "D", "E" or "vgg16", ...) or a custom list of
        widths, "M", "LRN" and (width, kernel_size) pairs.
      batch_norm: BatchNorm after every conv (torchvision's `_bn` variants).
      head: "torchvision" (adaptive 7x7 pool, FC-4096, FC-4096, FC-classes), "dense" (the paper's
        dense evaluation: FC layers as 7x7 and 1x1 convs, class scores averaged over the map),
        "none" (the final feature map) or "small" (global average pool and a small classifier,
        for 32x32-class images).
      num_classes: classifier outputs.
      dropout_rate: dropout after FC1 and FC2 (and the small head's hidden layer) in training.
      fc_width: width of FC1/FC2 (4096 in the paper).
      small_head_width: hidden width of the small head; 0 for a linear classifier.
      weight_init: "torchvision" or "paper" initialisation.
      dtype: computation dtype (e.g. jnp.bfloat16); logits are returned in float32.
      param_dtype: parameter dtype (float32 by default, also under bf16/fp16 compute).
      conv_impl: how the convs and pools are computed, not what: "auto" (the fastest measured path
        for the backend: on CPU `vgg_flax.conv`'s Winograd convs, blocked filter gradient and
        elementwise pool; plain XLA elsewhere), "xla" or "cpu". Same outputs and gradients up to
        rounding (tests/ops/test_conv.py); jax.grad and jax.vmap work on all. The CPU path defines
        custom VJPs, which JAX cannot differentiate forward: for jax.jvp, jax.jacfwd or
        jax.hessian on CPU use "xla".
      remat_blocks: rematerialise each conv block (`nn.remat` over its convs, BN, ReLUs and pool):
        only block outputs are kept for the backward pass, the rest is recomputed block by block.
        Same values and parameter names. Meant for large batches on small GPUs (unmeasured there);
        on XLA:CPU it saved no memory in our measurement (README, Training), so leave it off there.
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
        Returns:
          float32[N, num_classes] logits (float[N, h, w, C] features for head "none"); with taps,
          a pair (output, {name: activation}).
        """
        if self.head not in HEADS:
            raise KeyError(f"unknown head {self.head!r}; valid heads: {HEADS}")
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
                found[name] = value
            return value

        x = self._features(jnp.asarray(x, self.dtype), train, tap)
        if self.head == "torchvision":
            x = self._torchvision_head(x, train, tap)
        elif self.head == "dense":
            x = self._dense_head(x, train, tap)
        elif self.head == "small":
            x = self._small_head(x, train, tap)
        if self.head != "none":
            x = x.astype(jnp.float32)
        return (x, found) if taps else x

    def tap_names(self) -> list[str]:
        """Every name accepted by `taps`, in network order."""
        names = []
        for name, _ in layer_names(self.config):
            if name.startswith("conv"):
                names += [name, "relu" + name[4:]]
            elif name.startswith("pool"):
                names += ["stage" + name[4:], name]
            else:
                names.append(name)
        if self.head in ("torchvision", "dense", "small"):
            names.append("pre_logits")
        if self.head == "dense":
            names.append("score_map")
        return names

    def _features(self, x, train, tap):
        for stage in _stages(self.config):
            if self.remat_blocks:  # the taps stay empty: values inside a remat cannot leave it
                x = nn.remat(VGG._stage, static_argnums=(2, 3, 4))(self, x, stage, train, None)
            else:
                x = self._stage(x, stage, train, tap)
        return x

    def _stage(self, x, stage, train, tap):
        """The layers of one block (convs [BN] ReLU, LRN, then its pool), in `_features`' scope."""
        tap = tap or (lambda name, value: value)
        conv_init, _ = _initializers(self.weight_init)
        for name, entry in stage:
            if name.startswith("pool"):
                tap("stage" + name[4:], x)
                x = tap(name, self._max_pool(x))
            elif name.startswith("lrn"):
                x = tap(name, local_response_norm(x))
            else:
                width, ksize = entry if isinstance(entry, tuple) else (entry, 3)
                pad = ksize // 2
                x = nn.Conv(width, (ksize, ksize), padding=((pad, pad), (pad, pad)),
                            kernel_init=conv_init, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name,
                            conv_general_dilated=make_conv_general_dilated(self.conv_impl))(x)
                if self.batch_norm:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name="bn" + name[4:])(x)
                tap(name, x)
                x = tap("relu" + name[4:], nn.relu(x))
        return x

    def _max_pool(self, x):
        """2x2/2 max-pool; on the CPU path with a faster gradient, same values (vgg_flax.conv)."""
        if resolve_impl(self.conv_impl) == "cpu":
            return max_pool_2x2(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    def _dense(self, features, name):
        _, fc_init = _initializers(self.weight_init)
        return nn.Dense(features, kernel_init=fc_init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

    def _dropout(self, x, train):
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    def _torchvision_head(self, x, train, tap):
        x = adaptive_avg_pool(x, FC_POOL_SIZE)
        x = x.reshape(x.shape[0], -1)  # NHWC order; the converter permutes torchvision's rows.
        x = self._dropout(nn.relu(self._dense(self.fc_width, "fc1")(x)), train)
        x = self._dropout(nn.relu(self._dense(self.fc_width, "fc2")(x)), train)
        return self._dense(self.num_classes, "fc3")(tap("pre_logits", x))

    def _dense_head(self, x, train, tap):
        """The paper's dense evaluation (Sec. 3.2), with timm's pooling of small maps up to 7x7."""
        kh, kw = FC_POOL_SIZE
        _, h, w, c = x.shape
        if h < kh or w < kw:
            x = adaptive_avg_pool(x, (max(h, kh), max(w, kw)))
        _, fc_init = _initializers(self.weight_init)
        x = DenseAsConv(self.fc_width, (kh, kw), kernel_init=fc_init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="fc1")(x)
        x = self._dropout(nn.relu(x), train)
        x = self._dropout(nn.relu(self._dense(self.fc_width, "fc2")(x)), train)
        scores = tap("score_map", self._dense(self.num_classes, "fc3")(tap("pre_logits", x)))
        return scores.astype(jnp.float32).mean(axis=(1, 2))

    def _small_head(self, x, train, tap):
        x = x.mean(axis=(1, 2))
        if self.small_head_width:
            x = self._dense(self.small_head_width, "head_hidden")(x)
            x = self._dropout(nn.relu(x), train)
        return self._dense(self.num_classes, "head_out")(tap("pre_logits", x))


# Builders: torchvision's eight names and the paper-only configs A-LRN and C.
vgg11 = functools.partial(VGG, config="A")
vgg11_bn = functools.partial(VGG, config="A", batch_norm=True)
vgg11_lrn = functools.partial(VGG, config="A-LRN")
vgg13 = functools.partial(VGG, config="B")
vgg13_bn = functools.partial(VGG, config="B", batch_norm=True)
vgg16_c = functools.partial(VGG, config="C")
vgg16 = functools.partial(VGG, config="D")
vgg16_bn = functools.partial(VGG, config="D", batch_norm=True)
vgg19 = functools.partial(VGG, config="E")
vgg19_bn = functools.partial(VGG, config="E", batch_norm=True)

MODELS = {"vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg11_lrn": vgg11_lrn, "vgg13": vgg13,
          "vgg13_bn": vgg13_bn, "vgg16_c": vgg16_c, "vgg16": vgg16, "vgg16_bn": vgg16_bn,
          "vgg19": vgg19, "vgg19_bn": vgg19_bn}


def get_model(name: str, **kwargs) -> VGG:
    """A model by builder name, e.g. get_model("vgg16_bn", num_classes=10)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_params(variables) -> int:
    """Number of trainable parameters (the "params" collection only, as torchvision counts)."""
    params = variables.get("params", variables) if hasattr(variables, "get") else variables
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
