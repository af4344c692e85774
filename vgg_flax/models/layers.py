"""The small pure layers VGG needs beyond flax's: adaptive pooling, LRN, a Dense kernel used as a
convolution, and the two initialisation schemes."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_INITS = ("torchvision", "paper")


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


def initializers(init: str):
    """(conv kernel, dense kernel) initialisers.

    "torchvision": kaiming normal (fan_out, ReLU gain) convs, N(0, 0.01) Dense layers.
    "paper": N(0, 0.01) everywhere. The paper states "10^-2 variance"; the authors' released Caffe
    definitions used std 0.01, and std 0.1 diverges for deep nets, so std 0.01 it is.
    """
    if init == "torchvision":
        return nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.normal(0.01)
    if init == "paper":
        return nn.initializers.normal(0.01), nn.initializers.normal(0.01)
    raise KeyError(f"unknown init {init!r}; valid: {', '.join(repr(i) for i in WEIGHT_INITS)}")


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
