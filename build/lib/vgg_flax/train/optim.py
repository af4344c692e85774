"""Optimizers, learning-rate schedules and the paper's reduce-on-plateau rule.

The optimizers here stop one step short of a learning rate: they return the update direction
(momentum of gradient + weight decay, or Adam's normalised step plus decoupled decay), and the train
step multiplies it by `-learning_rate(step) * lr_scale`. That way a per-step schedule (step, cosine)
and the paper's host-side plateau rule, which changes `lr_scale` only after an evaluation, combine
without recompiling and without schedule state hidden in the optimizer.

Weight decay, the paper's way: Sec. 3.1 regularises with "weight decay (the L2 penalty multiplier
set to 5e-4)". `optax.add_decayed_weights(wd)` placed before the momentum trace adds `wd * w` to the
gradient, which is exactly the gradient of `wd / 2 * ||w||^2` in the loss, so SGD sees the same update
as with the penalty in the loss; we use the transform so that the logged `train_loss` stays the data
loss and no extra pass over the weights is traced. It is applied to conv/Dense kernels only (ndim > 1),
not to biases or BatchNorm parameters, as the authors' Caffe definitions did (bias decay_mult 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "plateau", "step", "cosine")


def kernel_mask(params):
    """True for weight matrices / conv kernels (ndim > 1): what weight decay applies to."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def feature_mask(params):
    """True for the convolutional feature extractor (conv*/bn* modules), False for the head."""
    return {name: jax.tree_util.tree_map(lambda _, n=name: n.startswith(("conv", "bn")), sub)
            for name, sub in params.items()}


def make_optimizer(*, name: str, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip_norm: float = 0.0, freeze: Callable | None = None
                   ) -> optax.GradientTransformation:
    """The update direction before the learning rate (see the module docstring).

    Args:
      name: "sgd" (momentum, PyTorch's convention v = m v + g, the paper's optimizer) or "adamw".
      weight_decay: L2 multiplier on kernels (SGD: added to the gradient; AdamW: decoupled, added
        after Adam's normalisation, as Loshchilov & Hutter).
      grad_clip_norm: clip the global gradient norm first; 0 for none.
      freeze: a function params -> pytree of bools; True leaves get zero updates (frozen features).
    Returns:
      an optax transformation; apply the learning rate with `-lr * updates`.
    """
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    decay = [optax.add_decayed_weights(weight_decay, mask=kernel_mask)] if weight_decay else []
    if name == "sgd":
        chain += decay + ([optax.trace(decay=momentum, nesterov=nesterov)] if momentum else [])
    elif name == "adamw":
        chain += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)] + decay
    else:
        raise KeyError(f"unknown optimizer {name!r}; valid: {OPTIMIZERS}")
    tx = optax.chain(*chain)
    if freeze is None:
        return tx
    label = lambda params: jax.tree_util.tree_map(lambda f: "frozen" if f else "train", freeze(params))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)


def make_schedule(*, name: str, base_lr: float, num_steps: int, warmup_steps: int = 0,
                  boundaries: Sequence[int] = (), factor: float = 0.1,
                  end_lr_fraction: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """step -> learning rate (before the plateau scale), traceable inside the train step.

    "constant" and "plateau" are flat (the plateau rule acts through `lr_scale`); "step" multiplies
    by `factor` at each boundary (torchvision's recipe: x0.1 every 30 epochs); "cosine" decays to
    `end_lr_fraction * base_lr` at `num_steps`. A linear warmup over `warmup_steps` precedes any.
    """
    if name in ("constant", "plateau"):
        main = optax.constant_schedule(base_lr)
    elif name == "step":
        main = optax.piecewise_constant_schedule(base_lr, {int(b): factor for b in boundaries})
    elif name == "cosine":
        main = optax.cosine_decay_schedule(base_lr, max(1, num_steps - warmup_steps),
                                           alpha=end_lr_fraction)
    else:
        raise KeyError(f"unknown schedule {name!r}; valid: {SCHEDULES}")
    if warmup_steps <= 0:
        return main
    warm = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


@dataclasses.dataclass
class Plateau:
    """The paper's rule: divide the learning rate by 10 when validation accuracy stops improving.

    A host-side state machine, updated after each evaluation and saved in every checkpoint (its
    fields are plain numbers). `scale` multiplies the schedule's learning rate.

    Attributes:
      factor: multiplier at each reduction (0.1 in the paper).
      patience: evaluations without improvement before a reduction.
      min_delta: improvement in top-1 (fraction) that counts.
      max_reductions: the paper reduced 3 times; later plateaus leave the rate alone.
    """

    factor: float = 0.1
    patience: int = 2
    min_delta: float = 0.0
    max_reductions: int = 3
    scale: float = 1.0
    best: float = -1.0
    bad_evals: int = 0
    reductions: int = 0

    def update(self, metric: float) -> bool:
        """Feeds one evaluation accuracy; returns True when the rate was just reduced."""
        metric = float(metric)  # a plain float: the state is saved as JSON
        if metric > self.best + self.min_delta:
            self.best, self.bad_evals = metric, 0
            return False
        self.bad_evals += 1
        if self.bad_evals < self.patience or self.reductions >= self.max_reductions:
            return False
        self.scale *= self.factor
        self.reductions += 1
        self.bad_evals = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "best": float(self.best), "bad_evals": int(self.bad_evals),
                "reductions": int(self.reductions)}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best = float(state["scale"]), float(state["best"])
        self.bad_evals, self.reductions = int(state["bad_evals"]), int(state["reductions"])


def learning_rate_at(schedule: Callable, step: int, scale: float) -> float:
    """The learning rate the train step uses at `step`, for logging."""
    return float(schedule(jnp.asarray(step)) * scale)
