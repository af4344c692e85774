"""Class model visualisation (Simonyan, Vedaldi & Zisserman 2013, Sec. 2): the image a class likes.

    I* = argmax_I  S_c(I) - lambda ||I||_2^2

by gradient ascent on the image, S_c the unnormalised class score (the paper: the score before
the softmax, whose maximisation could otherwise be won by lowering the other classes), started
from the zero image, which after the normalisation is the mean image (the paper's zero-centred
input). optax does the steps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vgg_flax.explain import gradients as G


@functools.partial(jax.jit, static_argnames=("model", "steps", "optimizer"))
def _ascend(model, variables, images, targets, l2, steps, optimizer):
    def objective(x):  # -(S_c(x) - l2 ||x||^2) per image, summed: images are independent
        scores = G.class_score(model.apply(variables, x, train=False), targets)
        return -(scores - l2 * jnp.sum(x * x, axis=(1, 2, 3))).sum()

    def step(carry, _):
        x, state = carry
        updates, state = optimizer.update(jax.grad(objective)(x), state, x)
        return (optax.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(step, (images, optimizer.init(images)), None, length=steps)
    return x


def class_model(model: Any, variables: Any, images: Any, targets: Any, *, steps: int = 200,
                l2: float = 1e-3, learning_rate: float = 0.1,
                optimizer: optax.GradientTransformation | None = None) -> jax.Array:
    """Class model visualisation by gradient ascent on S_c(I) - l2 ||I||^2 (Simonyan et al. 2013).

    Args:
      model, variables: a linen `vgg_flax.VGG` and its variables, or an NNX VGG and None.
      images: float32[N, H, W, 3], the starting images in the network's normalised space; the
        paper's start is the zero image, `jnp.zeros((N, H, W, 3))` (the training mean).
      targets: int[N], the class to visualise for each image (None / "top1": the start's top-1).
      steps: ascent steps. l2: lambda, the L2 penalty on the normalised image.
      learning_rate: for the default optimiser, `optax.adam(learning_rate)` (the paper's plain
        gradient ascent is `optax.sgd`; Adam's per-pixel steps make the image appear in fewer
        steps at the same objective).
      optimizer: any optax transformation, used as given (it minimises the negated objective).
    Returns:
      float32[N, H, W, 3], the images in the normalised space (`Normalization.invert` for pixels).
    """
    model, variables = G.as_linen(model, variables)
    images = G.check_images(images)
    targets = G.resolve_targets(model, variables, images, targets)
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    return _ascend(model, variables, images, targets, jnp.float32(l2), int(steps), optimizer)
