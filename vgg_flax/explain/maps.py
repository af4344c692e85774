"""Attribution maps: gradient saliency, Grad-CAM, Grad-CAM++, Integrated Gradients, SmoothGrad.

Each public method is `(model, variables, images, targets, **options) -> float32[N, H, W]`:
`images` float32[N, H, W, 3] normalised as the weights expect, `targets` int[N] (one class per
image) or None / "top1"; a linen `vgg_flax.VGG` with its variables or an NNX VGG with None. Each
runs one jitted function per shape and options (a pure core, `_saliency` ..., that `smooth_grad`
reuses under `jax.lax.scan`).

The references they are tested against: `captum` 0.9 (`Saliency`, `IntegratedGradients`) and
`grad-cam` 1.5 (pytorch-grad-cam's `GradCAM`, `GradCAMPlusPlus`) on torchvision's VGG16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax.explain import gradients as G
from vgg_flax.models import get_head, is_conv_layer

# Captum's integration rules (captum.attr._utils.approximation_methods): n -> (alphas, weights).
# "gausslegendre" is captum's default; the Riemann weights are captum's 1/n each, halved at both
# ends for the trapezoid, exactly as captum computes them.
IG_RULES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "gausslegendre": lambda n: (0.5 * (1 + np.polynomial.legendre.leggauss(n)[0]),
                                0.5 * np.polynomial.legendre.leggauss(n)[1]),
    "riemann_left": lambda n: (np.linspace(0, 1 - 1 / n, n), np.full(n, 1 / n)),
    "riemann_right": lambda n: (np.linspace(1 / n, 1, n), np.full(n, 1 / n)),
    "riemann_middle": lambda n: (np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n), np.full(n, 1 / n)),
    "riemann_trapezoid": lambda n: (np.linspace(0, 1, n),
                                    np.r_[0.5 / n, np.full(n - 2, 1 / n), 0.5 / n]),
}
_CAM_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (cam - min) / (1e-7 + max)
_PLUS_EPS = 1e-6  # pytorch-grad-cam's GradCAMPlusPlus denominator


def _prepare(model, variables, images, targets):
    model, variables = G.as_linen(model, variables)
    images = G.check_images(images)
    return model, variables, images, G.check_targets(model, images, targets)


def default_cam_tap(model) -> str:
    """The last conv's ReLU ("relu5_3" for VGG16): Grad-CAM's layer in Selvaraju et al."""
    return [t for t in model.tap_names() if t.startswith("relu")][-1]


def check_cam_tap(model, tap: str | None) -> str:
    """`tap` (default `default_cam_tap`) if it is a tap of the conv blocks, else a KeyError."""
    head_taps = set(get_head(model.head).taps)
    valid = [t for t in model.tap_names() if t not in head_taps]
    tap = default_cam_tap(model) if tap is None else tap
    if tap not in valid:
        raise KeyError(f"unknown conv-block tap {tap!r} for Grad-CAM; valid taps: {valid}")
    return tap


# --- the traceable cores ------------------------------------------------------------------------

def _saliency(model, variables, images, targets, per_channel=False):
    g = jnp.abs(G.gradients(model, variables, images, targets).input_grad)
    return g if per_channel else g.max(axis=-1)


def _min_max(cam):
    """Each map shifted to min 0 and divided by (1e-7 + max), as pytorch-grad-cam scales."""
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (_CAM_EPS + cam.max(axis=(1, 2), keepdims=True))


def _upsample(cam, size):
    """pytorch-grad-cam's output: min-max scaled, bilinearly resized (cv2 INTER_LINEAR, half-pixel
    centres, edges clamped, which jax.image.resize's "linear" equals when enlarging), scaled again."""
    up = jax.image.resize(_min_max(cam), (cam.shape[0], *size), "linear")
    return _min_max(up)


def _cam(model, variables, images, targets, tap, upsample, weights_fn):
    r = G.gradients(model, variables, images, targets, (tap,))
    acts = r.activations[tap].astype(jnp.float32)
    weights = weights_fn(acts, r.tap_grads[tap].astype(jnp.float32))  # [N, C]
    cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", acts, weights))
    return _upsample(cam, images.shape[1:3]) if upsample else cam


def _grad_cam_weights(acts, grads):
    """Selvaraju et al. 2017, Eq. 1: the spatial mean of dS_c/dA^k."""
    return grads.mean(axis=(1, 2))


def _grad_cam_pp_weights(acts, grads):
    """Chattopadhyay et al. 2018, Eq. 19 with exp(S) dropped (as pytorch-grad-cam):
    alpha = g^2 / (2 g^2 + sum_ij A * g^3 + eps), zero where g == 0; w = sum_ij alpha * relu(g)."""
    g2 = grads * grads
    a_sum = acts.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2 * g2 + a_sum * g2 * grads + _PLUS_EPS)
    alpha = jnp.where(grads != 0, alpha, 0)
    return (jax.nn.relu(grads) * alpha).sum(axis=(1, 2))


def _grad_cam(model, variables, images, targets, tap=None, upsample=True):
    tap = check_cam_tap(model, tap)
    return _cam(model, variables, images, targets, tap, upsample, _grad_cam_weights)


def _grad_cam_pp(model, variables, images, targets, tap=None, upsample=True):
    tap = check_cam_tap(model, tap)
    return _cam(model, variables, images, targets, tap, upsample, _grad_cam_pp_weights)


def _ig_path(steps: int, rule: str, n: int, internal_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights), each float32[calls, k]: the quadrature's path points, k per network call
    (k images-worth of N each; padded points have weight 0)."""
    if rule not in IG_RULES:
        raise KeyError(f"unknown integration rule {rule!r}; valid rules: {sorted(IG_RULES)}")
    alphas, weights = IG_RULES[rule](steps)
    k = max(1, min(steps, internal_batch // n))
    pad = -steps % k
    alphas = np.r_[alphas, np.zeros(pad)].reshape(-1, k).astype(np.float32)
    weights = np.r_[weights, np.zeros(pad)].reshape(-1, k).astype(np.float32)
    return alphas, weights


def _ig_tap(model) -> str | None:
    """The first conv's tap when the map from the input to it is affine (conv + bias, eval-mode
    BatchNorm), so that gradients summed there pass through its transpose once; else None."""
    first = model.tap_names()[0]
    return first if is_conv_layer(first) else None


def _ig_call(model, variables, images, targets, baseline, a, w):
    """One network call of Integrated Gradients: sum_j w_j dS_c/dA(x' + a_j (x - x')) at `_ig_tap`
    (the input itself where there is none): float[N, ...], the tap's or the input's shape."""
    k, n = a.shape[0], images.shape[0]
    x = (baseline[None] + a[:, None, None, None, None] * (images - baseline)[None])
    tap = _ig_tap(model)
    r = G.gradients(model, variables, x.reshape(-1, *images.shape[1:]), jnp.tile(targets, k),
                    (tap,) if tap else ())
    g = r.tap_grads[tap] if tap else r.input_grad
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))  # a bfloat16 model's sums in float32
    return jnp.einsum("k,knhwc->nhwc", w.astype(g.dtype), g.reshape(k, n, *g.shape[1:]))


def _ig_to_input(model, variables, images, total):
    """The input gradient of the summed `_ig_call`s: the tap's affine map transposed, once.

    dS/dx = J^T dS/dA with J the (constant) Jacobian of the affine map x -> A, so
    sum_j w_j J^T g_j = J^T sum_j w_j g_j: one transposed conv per image instead of one per path
    point (the conv with 3 output channels runs far below the machine's FLOP rate).
    """
    tap = _ig_tap(model)
    if tap is None:
        return total
    activation, vjp = jax.vjp(lambda x: model.apply(variables, x, train=False, taps=(tap,))[1][tap], images)
    (grad,) = vjp(total.astype(activation.dtype))
    return grad


def _integrated_gradients(model, variables, images, targets, baseline=None, steps=50,
                          rule="gausslegendre", per_channel=False, internal_batch=32):
    """The traceable core (for `smooth_grad`): the network calls in a scan."""
    baseline = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(baseline, images.shape)
    alphas, weights = _ig_path(steps, rule, images.shape[0], internal_batch)

    def body(total, aw):
        return total + _ig_call(model, variables, images, targets, baseline, *aw), None

    first = jax.eval_shape(lambda: _ig_call(model, variables, images, targets, baseline,
                                            jnp.asarray(alphas[0]), jnp.asarray(weights[0])))
    total, _ = jax.lax.scan(body, jnp.zeros(first.shape, first.dtype),
                            (jnp.asarray(alphas), jnp.asarray(weights)))
    attributions = _ig_to_input(model, variables, images, total) * (images - baseline)
    return attributions if per_channel else attributions.sum(axis=-1)


# Method name -> traceable core, for `smooth_grad` and the CLI.
CORES: dict[str, Callable[..., jax.Array]] = {
    "saliency": _saliency,
    "grad_cam": _grad_cam,
    "grad_cam_plus_plus": _grad_cam_pp,
    "integrated_gradients": _integrated_gradients,
}


def _smooth_grad(model, variables, images, targets, method="saliency", samples=50, noise=0.15,
                 seed=0, **options):
    if method not in CORES:
        raise KeyError(f"unknown method {method!r} for SmoothGrad; valid methods: {sorted(CORES)}")
    core = functools.partial(CORES[method], model, variables, targets=targets, **options)
    span = images.max(axis=(1, 2, 3), keepdims=True) - images.min(axis=(1, 2, 3), keepdims=True)
    sigma = noise * span  # Smilkov et al. 2017: sigma / (x_max - x_min), 10-20% works best

    def body(total, key):
        return total + core(images + sigma * jax.random.normal(key, images.shape)), None

    first = jax.eval_shape(lambda: core(images))
    keys = jax.random.split(jax.random.key(seed), samples)
    total, _ = jax.lax.scan(body, jnp.zeros(first.shape, first.dtype), keys)
    return total / samples


_ig_call_jit = jax.jit(_ig_call, static_argnames=("model",))
_ig_to_input_jit = jax.jit(_ig_to_input, static_argnames=("model",))


@functools.partial(jax.jit, static_argnames=("model",))
def _top1(model, variables, images):
    return jnp.argmax(model.apply(variables, images, train=False), -1).astype(jnp.int32)


_STATIC = ("model", "per_channel", "tap", "upsample", "steps", "rule", "internal_batch", "method",
           "samples", "seed")


@functools.partial(jax.jit, static_argnames=("core", *_STATIC))
def _run(core, model, variables, images, targets, **options):
    # The path points and noisy copies all explain the clean image's top-1; the other methods
    # take it from their own forward pass (`gradients`).
    if targets is None and core in (_integrated_gradients, _smooth_grad):
        targets = jnp.argmax(model.apply(variables, images, train=False), -1).astype(jnp.int32)
    return core(model, variables, images, targets, **options)


def _public(core, model, variables, images, targets, **options) -> jax.Array:
    model, variables, images, targets = _prepare(model, variables, images, targets)
    return _run(core, model, variables, images, targets, **options)


# --- the public methods --------------------------------------------------------------------------

def saliency(model: Any, variables: Any, images: Any, targets: Any = None, *,
             per_channel: bool = False) -> jax.Array:
    """Gradient saliency (Simonyan, Vedaldi & Zisserman 2013, Sec. 3.1): max over channels of |dS_c/dx|.

    S_c is the unnormalised class score (the logit), as in the paper; equals captum's
    `Saliency(abs=True)` reduced by the max over channels.
    Returns:
      float32[N, H, W] (per_channel=True: the float32[N, H, W, 3] |dS_c/dx|).
    """
    return _public(_saliency, model, variables, images, targets, per_channel=per_channel)


def grad_cam(model: Any, variables: Any, images: Any, targets: Any = None, *, tap: str | None = None,
             upsample: bool = True) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k w_k A^k), w_k the spatial mean of dS_c/dA^k.

    Args:
      tap: any conv-block tap (`model.tap_names()` before the head); default the last conv's ReLU.
      upsample: True: pytorch-grad-cam's output, the map min-max scaled to [0, 1], bilinearly
        resized to the input's H x W and min-max scaled again, float32[N, H, W]. False: the map at
        the tap's resolution before any normalisation, float32[N, h, w].
    """
    return _public(_grad_cam, model, variables, images, targets, tap=tap, upsample=upsample)


def grad_cam_plus_plus(model: Any, variables: Any, images: Any, targets: Any = None, *,
                       tap: str | None = None, upsample: bool = True) -> jax.Array:
    """Grad-CAM++ (Chattopadhyay et al. 2018): Grad-CAM with the weights of their Eq. 19.

    The second and third derivatives of exp(S_c) reduce to powers of dS_c/dA, as in the paper's
    Eq. 19 and pytorch-grad-cam (eps 1e-6 in the denominator). `tap`, `upsample` as `grad_cam`.
    """
    return _public(_grad_cam_pp, model, variables, images, targets, tap=tap, upsample=upsample)


def integrated_gradients(model: Any, variables: Any, images: Any, targets: Any = None, *,
                         baseline: Any = None, steps: int = 50, rule: str = "gausslegendre",
                         per_channel: bool = False, internal_batch: int = 32) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017): (x - x') * integral_0^1 dS_c/dx(x' + a(x - x')) da.

    Args:
      baseline: x', float[N, H, W, 3] or broadcastable; default zeros (the mean image after
        normalisation).
      steps, rule: the quadrature, as captum's `n_steps` and `method` (`IG_RULES`; default captum's
        Gauss-Legendre with 50 points).
      internal_batch: images per network call (path points times N), bounding memory.
    Returns:
      float32[N, H, W], the attributions summed over channels (completeness: each map sums to
      S_c(x) - S_c(x') up to the integration error); per_channel=True: float32[N, H, W, 3].
    """
    # One jitted network call run per chunk of path points, not a scan over them: XLA:CPU runs the
    # convolutions of a while loop's body several times slower (as `vgg_flax.train.steps` notes),
    # and unrolling them all would hold every call's activations at once.
    model, variables, images, targets = _prepare(model, variables, images, targets)
    if targets is None:  # every path point explains the clean image's top-1
        targets = _top1(model, variables, images)
    baseline = (jnp.zeros_like(images) if baseline is None
                else jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape))
    alphas, weights = _ig_path(int(steps), rule, images.shape[0], int(internal_batch))
    total = 0.0
    for a, w in zip(alphas, weights, strict=True):
        total = total + _ig_call_jit(model, variables, images, targets, baseline, a, w)
    attributions = _ig_to_input_jit(model, variables, images, total) * (images - baseline)
    return attributions if per_channel else attributions.sum(axis=-1)


def smooth_grad(model: Any, variables: Any, images: Any, targets: Any = None, *,
                method: str = "saliency", samples: int = 50, noise: float = 0.15, seed: int = 0,
                **options) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): the mean of a method's map over noisy copies of the images.

    Args:
      method: "saliency", "grad_cam", "grad_cam_plus_plus" or "integrated_gradients"; `options`
        go to it (tap=..., steps=...).
      samples: noisy copies (the paper's 50). noise: the Gaussian's sigma as a fraction of each
        image's value range (x_max - x_min; the paper finds 10-20% best). seed: the noise's key.
      The target of each image is fixed first (top-1 of the clean image where none is given).
    Returns:
      the method's output shape, float32.
    """
    if method not in CORES:
        raise KeyError(f"unknown method {method!r} for SmoothGrad; valid methods: {sorted(CORES)}")
    return _public(_smooth_grad, model, variables, images, targets, method=method,
                   samples=int(samples), noise=noise, seed=int(seed), **options)
