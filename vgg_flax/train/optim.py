"""Optimizers, learning-rate schedules and the paper's reduce-on-plateau rule, as optax chains.

`make_optimizer` returns a complete `optax.GradientTransformation`: the update direction (momentum of
gradient + weight decay, or Adam's normalised step plus decoupled decay), then the learning rate
`schedule(count) * lr_scale`, both hyperparameters injected with `optax.inject_hyperparams`, so the
train step is just `tx.update` + `optax.apply_updates` and any optax optimizer drops in. `lr_scale` is
the paper's host-side plateau rule: the loop sets it in the optimizer state between steps
(`set_lr_scale`), a value change only, so nothing recompiles; the schedule needs no host state.

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
import numpy as np
import optax

from vgg_flax.models import is_feature_layer

SCHEDULES = ("constant", "plateau", "step", "cosine")
LR_SCALE = "lr_scale"  # the injected hyperparameter the plateau rule sets


def kernel_mask(params):
    """True for weight matrices / conv kernels (ndim > 1): what weight decay applies to."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def feature_mask(params):
    """True for the convolutional feature extractor (conv*/bn* modules), False for the head."""
    return {name: jax.tree_util.tree_map(lambda _, n=name: is_feature_layer(n), sub)
            for name, sub in params.items()}


def _sgd(decay: list, *, momentum: float, nesterov: bool, **_) -> list:
    """Momentum SGD, PyTorch's convention v = m v + g (the paper's optimizer); L2 decay is added to
    the gradient before the momentum, as the paper's penalty."""
    return decay + ([optax.trace(decay=momentum, nesterov=nesterov)] if momentum else [])


def _adamw(decay: list, *, b1: float, b2: float, eps: float, **_) -> list:
    """Adam's normalised step, then decoupled decay (Loshchilov & Hutter, arXiv 1711.05101)."""
    return [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)] + decay


# The optimizers: name -> fn(weight-decay transforms, **hyperparameters) -> list of optax transforms
# before the learning rate. A new optimizer is a function and a row here (its hyperparameters are
# keyword arguments of `direction` and keys of the config's `optim` section).
OPTIMIZERS: dict[str, Callable[..., list]] = {"sgd": _sgd, "adamw": _adamw}


def direction(*, name: str = "sgd", momentum: float = 0.9, nesterov: bool = False,
              weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """The update direction before the learning rate (see the module docstring).

    Args:
      name: a key of OPTIMIZERS ("sgd" or "adamw").
      weight_decay: L2 multiplier on kernels (SGD: added to the gradient before the momentum;
        AdamW: decoupled, added after Adam's normalisation, as Loshchilov & Hutter).
      grad_clip_norm: clip the global gradient norm first; 0 for none.
    """
    if name not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    decay = [optax.add_decayed_weights(weight_decay, mask=kernel_mask)] if weight_decay else []
    chain += OPTIMIZERS[name](decay, momentum=momentum, nesterov=nesterov, b1=b1, b2=b2, eps=eps)
    return optax.chain(*chain) if chain else optax.identity()


def with_learning_rate(tx: optax.GradientTransformation, learning_rate: float | Callable
                       ) -> optax.GradientTransformation:
    """`tx` followed by the learning rate `learning_rate(count) * lr_scale` (lr_scale starts at 1).

    Both are injected hyperparameters (float32): after each update the state's `hyperparams` hold
    the values that update used, and `set_lr_scale` changes the scale between steps.
    """
    def factory(learning_rate, lr_scale):
        return optax.chain(tx, optax.scale_by_learning_rate(learning_rate * lr_scale))

    return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
        learning_rate=learning_rate, lr_scale=1.0)


def frozen(tx: optax.GradientTransformation, freeze: Callable) -> optax.GradientTransformation:
    """`tx` on the leaves where `freeze(params)` is False, zero updates where it is True."""
    label = lambda params: jax.tree_util.tree_map(lambda f: "frozen" if f else "train", freeze(params))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)


def make_optimizer(*, learning_rate: float | Callable, freeze_features: bool = False,
                   **direction_kwargs) -> optax.GradientTransformation:
    """The project's optimizer: `direction(**direction_kwargs)` at `learning_rate` (a schedule).

    Args:
      learning_rate: a float or a step -> rate schedule (`make_schedule`); the plateau rule scales it.
      freeze_features: zero updates for the conv/BatchNorm parameters (train the head only).
      direction_kwargs: the `optim` config section (see `direction`).
    Returns:
      an optax transformation: `optax.apply_updates(params, tx.update(grads, state, params)[0])`.
    """
    tx = with_learning_rate(direction(**direction_kwargs), learning_rate)
    return frozen(tx, feature_mask) if freeze_features else tx


def _hyperparams(opt_state) -> dict | None:
    return optax.tree_utils.tree_get(opt_state, "hyperparams")


def learning_rate(opt_state) -> jax.Array | None:
    """The learning rate of the update that produced `opt_state` (schedule value x lr_scale), or
    None for an optimizer without an injected `learning_rate` hyperparameter."""
    hp = _hyperparams(opt_state)
    if hp is None or "learning_rate" not in hp:
        return None
    return hp["learning_rate"] * hp.get(LR_SCALE, 1.0)


def set_lr_scale(opt_state, scale: float):
    """`opt_state` with the plateau scale set to `scale` (same dtype, shape and sharding)."""
    old = _hyperparams(opt_state)
    if old is None or LR_SCALE not in old:
        raise KeyError(f"the optimizer has no injected {LR_SCALE!r} hyperparameter (build it with "
                       "optim.with_learning_rate) so the plateau schedule cannot set it")
    # A host value (numpy): device_put replicates it, also onto a mesh spanning several processes.
    value = jax.device_put(np.asarray(scale, old[LR_SCALE].dtype), old[LR_SCALE].sharding)
    return optax.tree_utils.tree_set(opt_state, **{LR_SCALE: value})


def make_schedule(*, name: str, learning_rate: float, num_steps: int, warmup_steps: int = 0,
                  boundaries: Sequence[int] = (), factor: float = 0.1, end_fraction: float = 0.0,
                  patience: int = 2, min_delta: float = 0.0, max_reductions: int = 3
                  ) -> tuple[Callable[[jax.Array], jax.Array], Plateau | None]:
    """(step -> learning rate before the plateau scale, the plateau rule or None): the `schedule`
    config section.

    "constant" and "plateau" are flat (the plateau rule acts through `lr_scale`; its `factor`,
    `patience`, `min_delta` and `max_reductions` are `Plateau`'s); "step" multiplies by `factor` at
    each boundary (torchvision's recipe: x0.1 every 30 epochs); "cosine" decays to
    `end_fraction * learning_rate` at `num_steps`. A linear warmup over `warmup_steps` precedes any.
    """
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule {name!r}; valid: {SCHEDULES}")
    if name in ("constant", "plateau"):
        main = optax.constant_schedule(learning_rate)
    elif name == "step":
        main = optax.piecewise_constant_schedule(learning_rate, {int(b): factor for b in boundaries})
    else:
        main = optax.cosine_decay_schedule(learning_rate, max(1, num_steps - warmup_steps),
                                           alpha=end_fraction)
    if warmup_steps > 0:
        warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        main = optax.join_schedules([warm, main], [warmup_steps])
    plateau = Plateau(factor=factor, patience=patience, min_delta=min_delta,
                      max_reductions=max_reductions) if name == "plateau" else None
    return main, plateau


@dataclasses.dataclass
class Plateau:
    """The paper's rule: divide the learning rate by 10 when validation accuracy stops improving.

    A host-side state machine, updated after each evaluation and saved in every checkpoint's meta
    (its fields are plain numbers). `scale` multiplies the schedule's learning rate (`set_lr_scale`).

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
