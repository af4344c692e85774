"""The primitive of every attribution method: class scores and their gradients w.r.t. taps and input.

`tap_gradients` runs the network once forward and once backward (`jax.vjp`) and returns, for each
image n, the score S_{c_n}(x_n) of its target class, the requested taps' activations A and the
gradients dS/dA and dS/dx. The tap gradients come from flax's `perturb` rule: a zero array per tap
is passed in the "perturbations" collection, which `vgg_flax.VGG` adds at the tap, so the
gradient w.r.t. that zero is the gradient w.r.t. the activation. Without the collection the model
computes exactly as before.

Models are linen `vgg_flax.VGG`s with their variables or NNX `vgg_flax.nnx.VGG`s (variables None:
the module's own). Inference mode throughout (BatchNorm's running statistics, no dropout), so the
images of a batch are independent and one backward pass of sum_n S_{c_n}(x_n) gives each image's
gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import models
from vgg_flax import nnx as vgg_nnx

# A score function: (model output, int32[N] targets) -> float32[N], one scalar per image.
Score = Callable[[jax.Array, jax.Array], jax.Array]


class Gradients(NamedTuple):
    """What `tap_gradients` returns (N images, tap activations NHWC as the model computes them).

    scores: float32[N], S_{c_n}(x_n) (by default the unnormalised class score, the logit).
    targets: int32[N], the classes scored (the top-1 where none was given).
    output: the model's output, float32[N, classes] for the classifier heads.
    activations: {tap: float[N, h, w, C]} the taps' values.
    tap_grads: {tap: float[N, h, w, C]} dS/dA for each tap.
    input_grad: float32[N, H, W, 3] dS/dx.
    """

    scores: jax.Array
    targets: jax.Array
    output: jax.Array
    activations: dict[str, jax.Array]
    tap_grads: dict[str, jax.Array]
    input_grad: jax.Array


def class_score(output: jax.Array, targets: jax.Array) -> jax.Array:
    """S_c: the unnormalised score (logit) of each image's target class, float32[N]."""
    return jnp.take_along_axis(output, targets[:, None], axis=1)[:, 0].astype(jnp.float32)


def as_linen(model: Any, variables: Mapping[str, Any] | None) -> tuple[models.VGG, Mapping[str, Any]]:
    """(linen module, variables) from a linen VGG and its variables or an NNX VGG (variables None)."""
    if isinstance(model, vgg_nnx.VGG):
        if variables is not None:
            raise ValueError("an NNX VGG carries its own variables: pass variables=None")
        return model.linen, vgg_nnx.to_variables(model)
    if not isinstance(model, models.VGG):
        raise TypeError(f"model must be a vgg_flax.VGG or vgg_flax.nnx.VGG, got {type(model).__name__}")
    if variables is None:
        raise ValueError("a linen VGG needs its variables ({'params': ..., 'batch_stats': ...})")
    return model, {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def check_taps(model: models.VGG, taps: Sequence[str]) -> tuple[str, ...]:
    """The taps as a tuple; a KeyError lists the valid names for an unknown one."""
    valid = model.tap_names()
    unknown = [t for t in taps if t not in valid]
    if unknown:
        raise KeyError(f"unknown taps {unknown}; valid taps: {valid}")
    return tuple(taps)


def num_classes(model: models.VGG) -> int:
    """The class count of a classifier model; a ValueError for head "none" (nothing to score)."""
    if models.get_head(model.head).classifier is None:
        raise ValueError(f"head {model.head!r} has no class scores to explain; use a classifier head")
    return model.num_classes


def check_targets(model: models.VGG, images: jax.Array, targets: Any) -> jax.Array | None:
    """int32[N] target classes checked (one per image, in range), or None for None / "top1"."""
    n, classes = images.shape[0], num_classes(model)
    if targets is None or (isinstance(targets, str) and targets == "top1"):
        return None
    if isinstance(targets, str):
        raise ValueError(f"targets must be class indices, None or 'top1', got {targets!r}")
    t = np.asarray(targets)
    if t.ndim == 0:
        t = np.full((n,), int(t))
    if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"targets must be int[{n}] (one class per image), None or 'top1'; got "
                         f"{t.dtype}{list(t.shape)}")
    if t.min() < 0 or t.max() >= classes:
        raise ValueError(f"target classes {sorted(set(t[(t < 0) | (t >= classes)].tolist()))} out "
                         f"of range: the model has {classes} classes (0..{classes - 1})")
    return jnp.asarray(t, jnp.int32)


def resolve_targets(model: models.VGG, variables: Mapping[str, Any], images: jax.Array,
                    targets: Any) -> jax.Array:
    """`check_targets`, with None / "top1" replaced by each image's top-1 (one forward pass)."""
    t = check_targets(model, images, targets)
    if t is None:
        return jnp.argmax(forward(model, variables, images), axis=-1).astype(jnp.int32)
    return t


def check_images(images: Any) -> jax.Array:
    """float32[N, H, W, 3] or a ValueError naming the shape."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be float[N, H, W, 3] (normalised NHWC), got shape {list(x.shape)}")
    return x


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, images):
    """The jitted inference output (logits) of a linen model."""
    return model.apply(variables, images, train=False)


def gradients(model: models.VGG, variables: Mapping[str, Any], images: jax.Array, targets: Any,
              taps: tuple[str, ...] = (), score: Score = class_score) -> Gradients:
    """`tap_gradients`' traceable core (use inside jit / scan): one forward and one backward pass.

    targets: int32[N], or None for each image's top-1 (argmax of the output, not differentiated).
    """
    def net(perturbations, x):
        if not taps:  # the output alone
            return model.apply(variables, x, train=False), {}
        return model.apply({**variables, "perturbations": perturbations}, x, train=False, taps=taps)

    shapes = jax.eval_shape(lambda x: net({}, x)[1], images) if taps else {}
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    out, net_vjp, acts = jax.vjp(net, zeros, images, has_aux=True)
    if targets is None:
        targets = jnp.argmax(out, axis=-1).astype(jnp.int32)
    targets = jax.lax.stop_gradient(targets)
    scores, score_vjp = jax.vjp(lambda o: score(o, targets), out)
    (out_grad,) = score_vjp(jnp.ones_like(scores))
    tap_grads, input_grad = net_vjp(out_grad)
    return Gradients(scores, targets, out, dict(acts), dict(tap_grads), input_grad)


_gradients_jit = jax.jit(gradients, static_argnames=("model", "taps", "score"))


def tap_gradients(model: Any, variables: Mapping[str, Any] | None, images: Any, targets: Any = None,
                  taps: Sequence[str] = (), *, score: Score = class_score) -> Gradients:
    """Scores S_{c_n}(x_n) and their gradients w.r.t. any named taps and the input, jitted per shape.

    Args:
      model, variables: a linen `vgg_flax.VGG` and its variables, or an NNX VGG and None.
      images: float32[N, H, W, 3] normalised as the weights expect.
      targets: int[N] classes, one per image, or None / "top1" for each image's top-1.
      taps: names from `model.tap_names()` ("relu4_3", "stage5", "pre_logits", ...).
      score: (output, int32[N] targets) -> float32[N]; default `class_score`, the logit S_c.
    Returns:
      `Gradients`: scores, targets, output, activations, tap_grads, input_grad (float32[N, H, W, 3]).
    """
    model, variables = as_linen(model, variables)
    images = check_images(images)
    taps = check_taps(model, taps)
    targets = check_targets(model, images, targets)
    return _gradients_jit(model, variables, images, targets, taps=taps, score=score)
