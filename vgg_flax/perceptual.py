"""Perceptual losses on VGG features: LPIPS, feature (content) loss, Gram matrices and style loss.

Pure functions of explicit variables, jittable and differentiable w.r.t. the images:

    lpips_fn, variables = load_lpips(backbone="vgg16")      # or a path / state dict
    d = jax.jit(lpips_fn)(variables, x, y)                  # float32[N]; x, y in [-1, 1]
    g = jax.grad(lambda x: lpips_fn(variables, x, y).sum())(x)

LPIPS is Zhang et al. 2018 (arXiv:1801.03924), v0.1 of the `lpips` package: inputs shifted and scaled,
VGG16 features at relu1_2 .. relu5_3, each unit-normalised over channels, squared difference, a learnt
1x1 linear layer (no bias), spatial mean, sum over layers. `feature_loss` is the feature
reconstruction loss of Johnson et al. 2016 (arXiv:1603.08155); `gram_matrix` and `style_loss` are
Gatys et al. 2016 ("Image Style Transfer Using Convolutional Neural Networks"), with Gram matrices
normalised by C*H*W.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import models
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.pretrained import from_pretrained
from vgg_flax.convert.readers import read_state_dict

LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# The `lpips` package's ScalingLayer (v0.1): (x - shift) / scale on [-1, 1] RGB input.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # lpips.normalize_tensor: x / (sqrt(sum_c x^2) + eps)
_LINEAR_FILE = os.path.join("weights", "v0.1", "vgg.pth")  # inside the installed `lpips` package


def unit_normalize(x: jax.Array, eps: float = LPIPS_EPS) -> jax.Array:
    """x / (||x||_2 over the channel axis + eps), as lpips.normalize_tensor.

    The norm's gradient is taken as 0 where a pixel's features are all zero (sqrt has an infinite
    derivative at 0, which gives NaN there in a plain implementation); values are unchanged.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


def lpips_distance(model: models.VGG, variables: Mapping[str, Any], x: jax.Array, y: jax.Array,
                   spatial: bool = False) -> jax.Array:
    """LPIPS between two image batches.

    Args:
      model: a linen VGG with the LPIPS taps (head "none" is enough).
      variables: {"backbone": the model's variables, "linear": {tap: float32[C]}}.
      x, y: float[N, H, W, 3] RGB in [-1, 1].
      spatial: return the per-pixel map instead of its mean.
    Returns:
      float32[N] (float64 for a float64 model under jax_enable_x64), or [N, H, W] with
      spatial=True (each layer's map bilinearly upsampled to the input size, half-pixel centres, as
      lpips' nn.Upsample(align_corners=False)).
    """
    n, h, w, _ = x.shape
    # float32 constants, as the lpips buffers (also when the rest runs in float64).
    shift, scale = np.float32(LPIPS_SHIFT), np.float32(LPIPS_SCALE)
    both = (_at_least_f32(jnp.concatenate([x, y])) - shift) / scale
    _, feats = model.apply(variables["backbone"], both, train=False, taps=tuple(variables["linear"]))
    total = 0.0
    for tap, weight in variables["linear"].items():
        f = unit_normalize(_at_least_f32(feats[tap]))
        layer = jnp.einsum("nhwc,c->nhw", jnp.square(f[:n] - f[n:]), weight,
                           precision=jax.lax.Precision.HIGHEST)
        if spatial:
            total += jax.image.resize(layer, (n, h, w), "bilinear", antialias=False)
        else:
            total += layer.mean(axis=(1, 2))
    return total


def _at_least_f32(a: jax.Array) -> jax.Array:
    """float16/bfloat16 -> float32; float32 and float64 (under jax_enable_x64) stay."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def default_linear_file() -> str:
    """Path of the LPIPS v0.1 VGG linear layers shipped by the installed `lpips` package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the LPIPS linear layers ship with the `lpips` package (pip install "
                                "lpips), or pass linear=<path to vgg.pth or a state dict>")
    return os.path.join(list(spec.submodule_search_locations)[0], _LINEAR_FILE)


def read_linear(source: str | os.PathLike | Mapping[str, Any] | None = None,
                taps: Sequence[str] = LPIPS_TAPS) -> dict[str, np.ndarray]:
    """{tap: float32[C]} from the lpips linear file (keys lin{k}.model.1.weight, float[1, C, 1, 1])."""
    state = read_state_dict(default_linear_file() if source is None else source)
    where = "the linear state dict" if isinstance(source, Mapping) else os.fspath(source or "lpips")
    out, problems = {}, []
    for k, tap in enumerate(taps):
        key = f"lin{k}.model.1.weight"
        w = np.asarray(state[key]) if key in state else None
        if w is None or w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
            problems.append(f"{key}: {'missing' if w is None else f'shape {w.shape}'}")
        else:
            out[tap] = w.reshape(-1).astype(np.float32)
    if problems:
        raise ConversionError(f"{where}: not an LPIPS linear file (expected lin0..lin{len(taps) - 1}"
                              f".model.1.weight of shape [1, C, 1, 1]): {'; '.join(problems)}")
    return out


def _check_channels(model: models.VGG, variables: Mapping[str, Any], linear: Mapping[str, Any]) -> None:
    """One clear error when the linear layers do not fit the backbone's tap widths."""
    probe = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    _, feats = jax.eval_shape(lambda v, x: model.apply(v, x, taps=tuple(linear)), variables, probe)
    wrong = [f"{t}: backbone {feats[t].shape[-1]} channels, linear {w.shape[0]}"
             for t, w in linear.items() if feats[t].shape[-1] != w.shape[0]]
    if wrong:
        raise ConversionError(f"the LPIPS linear layers do not fit the backbone: {'; '.join(wrong)}")


def load_lpips(backbone: Any = "vgg16", linear: str | os.PathLike | Mapping[str, Any] | None = None,
               **model_kwargs) -> tuple[Callable[..., jax.Array], dict[str, Any]]:
    """LPIPS (v0.1, VGG) as a pure function and its variables.

    Args:
      backbone: VGG16 weights: anything `vgg_flax.from_pretrained` / `load_torchvision` takes (a
        name once `from_pretrained` exists, a path, a state dict in torchvision's layout), or a
        (linen model, variables) pair.
      linear: the LPIPS linear layers: a path or state dict; by default the file shipped in the
        installed `lpips` package (lpips/weights/v0.1/vgg.pth).
      **model_kwargs: VGG fields for the backbone (dtype, conv_impl, ...).
    Returns:
      (lpips_fn, variables): lpips_fn(variables, x, y, spatial=False) -> float32[N] (see
      `lpips_distance`), jittable (spatial static) and differentiable w.r.t. x and y.
    """
    if isinstance(backbone, tuple):
        model, trunk = backbone
    else:
        model, trunk = from_pretrained(backbone, head="none", **model_kwargs)
    weights = {t: jnp.asarray(w) for t, w in read_linear(linear).items()}
    _check_channels(model, trunk, weights)
    return functools.partial(lpips_distance, model), {"backbone": trunk, "linear": weights}


def extract(model: models.VGG, variables: Mapping[str, Any], images: jax.Array,
            taps: Sequence[str]) -> dict[str, jax.Array]:
    """{tap: float[N, h, w, C]} activations of a linen VGG in eval mode."""
    return model.apply(variables, images, train=False, taps=tuple(taps))[1]


def gram_matrix(features: jax.Array) -> jax.Array:
    """G = F^T F / (C H W) per example, accumulated in float32 whatever the features' dtype.

    float16 sums of products of activations overflow 65504 (NaN Gram matrices in other ports), so
    the features are cast to float32 (exact for float16 / bfloat16) before the contraction.

    Args:
      features: float[N, H, W, C].
    Returns:
      float32[N, C, C].
    """
    n, h, w, c = features.shape
    f = features.reshape(n, h * w, c).astype(jnp.float32)
    g = jnp.einsum("npc,npd->ncd", f, f, precision=jax.lax.Precision.HIGHEST)
    return g / jnp.float32(c * h * w)


def _weighted_sum(per_layer: Mapping[str, jax.Array], weights: Mapping[str, float] | None) -> jax.Array:
    weights = {t: 1.0 for t in per_layer} if weights is None else weights
    missing = set(weights) - set(per_layer)
    if missing:
        raise KeyError(f"weights for taps {sorted(missing)} that are not among the features "
                       f"{sorted(per_layer)}")
    return sum(jnp.float32(w) * per_layer[t] for t, w in weights.items())


def feature_loss(features: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                 weights: Mapping[str, float] | None = None) -> jax.Array:
    """Johnson et al.'s feature reconstruction loss: sum_l w_l * mean_{h,w,c} (f_l - t_l)^2.

    Args:
      features, targets: {tap: float[N, h, w, C]} (targets may have batch 1 to broadcast).
      weights: {tap: weight}; every tap of `features` with weight 1 when None.
    Returns:
      float32[N], computed in float32.
    """
    per_layer = {t: jnp.mean(jnp.square(f.astype(jnp.float32) - targets[t].astype(jnp.float32)),
                             axis=(1, 2, 3)) for t, f in features.items()}
    return _weighted_sum(per_layer, weights)


def style_loss(features: Mapping[str, jax.Array], target_grams: Mapping[str, jax.Array],
               weights: Mapping[str, float] | None = None) -> jax.Array:
    """Gatys et al.'s style loss: sum_l w_l * mean_{c,d} (G(f_l) - A_l)^2, G from `gram_matrix`.

    Args:
      features: {tap: float[N, h, w, C]}.
      target_grams: {tap: float32[N or 1, C, C]} (`gram_matrix` of the style image's features).
      weights: {tap: weight}; every tap of `features` with weight 1 when None.
    Returns:
      float32[N].
    """
    per_layer = {t: jnp.mean(jnp.square(gram_matrix(f) - target_grams[t]), axis=(1, 2))
                 for t, f in features.items()}
    return _weighted_sum(per_layer, weights)
