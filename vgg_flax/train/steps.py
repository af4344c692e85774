"""The train state and the pure, jitted train step (evaluation: `vgg_flax.evaluation.Evaluator`).

Data parallelism the modern way (jit over a `vgg_flax.parallel` mesh, not pmap): the batch is sharded
on the mesh's "data" axis, parameters and optimizer state are replicated, and XLA inserts the gradient
all-reduce. Because the step is one program over the *global* batch, BatchNorm's batch mean and
variance are computed over the global batch (XLA reduces across devices), exactly as on one device.
The optimizer is any optax transformation with its learning rate inside (`vgg_flax.train.optim`):
the step applies its updates with `optax.apply_updates`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vgg_flax import parallel
from vgg_flax.evaluation.topk import topk_hits
from vgg_flax.ops import conv
from vgg_flax.train import optim


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (which is a function of `step`).

    step: int32[] optimizer steps done. rng: uint32[2] raw key data (dropout keys are folded from it
    and the step, so they do not depend on how the run was interrupted). opt_state: the optax state,
    with the learning rate and the plateau rule's scale as injected hyperparameters.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def _variables(params, batch_stats):
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _cross_entropy(logits, labels, mask):
    """Masked sums: (loss_sum, correct_count, count), float32 scalars."""
    mask = mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top1 = topk_hits(logits, labels, 1).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(top1 * mask), jnp.sum(mask)


def _micro_batches(batch, accum: int):
    """[G, ...] -> [accum, G / accum, ...] taking every accum-th row, so each micro-batch keeps the
    data sharding (a device's contiguous rows split evenly over the micro-batches)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)


def _loss_fn(params, batch_stats, micro, key, *, model, remat: bool):
    """Mean masked cross-entropy of one (micro-)batch; aux: (new batch_stats, accuracy)."""
    if remat:  # per conv block: only block outputs are kept for the backward pass
        model = model.clone(remat_blocks=True)
    logits, updates = model.apply(_variables(params, batch_stats), micro["image"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
    loss_sum, correct, count = _cross_entropy(logits, micro["label"], micro["mask"])
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, (updates.get("batch_stats", batch_stats), correct / count)


def _mean_gradients(state: TrainState, batch: dict, rng, *, model, remat: bool, grad_accum_steps: int):
    """(mean grads, batch_stats, mean loss, mean accuracy) over `grad_accum_steps` micro-batches."""
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model=model, remat=remat), has_aux=True)

    def micro_step(carry, xs):
        grads, batch_stats, loss, acc = carry
        micro, j = xs
        (micro_loss, (batch_stats, a)), g = grad_fn(state.params, batch_stats, micro,
                                                    jax.random.fold_in(rng, j))
        return (jax.tree_util.tree_map(jnp.add, grads, g), batch_stats, loss + micro_loss, acc + a), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    init = (zeros, state.batch_stats, jnp.float32(0), jnp.float32(0))
    if grad_accum_steps == 1:  # no loop: XLA:CPU runs convolutions inside a while loop far slower
        (grads, batch_stats, loss, acc), _ = micro_step(init, (batch, 0))
    else:
        micro = _micro_batches(batch, grad_accum_steps)
        # Unrolled for the CPU (the model traces the CPU conv path): XLA:CPU runs convolutions inside
        # a while loop several times slower. A program compiled here for a TPU keeps the loop.
        unroll = grad_accum_steps if conv.resolve_impl(model.conv_impl) == "cpu" else 1
        (grads, batch_stats, loss, acc), _ = jax.lax.scan(
            micro_step, init, (micro, jnp.arange(grad_accum_steps)), unroll=unroll)
    inv = 1.0 / grad_accum_steps
    return jax.tree_util.tree_map(lambda g: g * inv, grads), batch_stats, loss * inv, acc * inv


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               grad_accum_steps: int = 1, remat: bool = False):
    """One optimizer step on a global batch; pure, for `jax.jit`.

    Args:
      state: the TrainState (donated by `make_train_step`).
      tx: any optax transformation (its learning rate inside, e.g. `optim.make_optimizer`).
      batch: {"image": float32[G, H, W, 3], "label": int32[G], "mask": bool[G]}.
      grad_accum_steps: split the batch into this many micro-batches run one after another (less
        memory); gradients are averaged, BatchNorm statistics are those of each micro-batch.
      remat: rematerialise each conv block in the backward pass (less memory, ~1.3x compute).
    Returns:
      (new state, {"train_loss", "train_accuracy", "learning_rate"} float32 scalars; the learning
      rate this update used, left out when `tx` has no injected `learning_rate`).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, batch_stats, loss, acc = _mean_gradients(state, batch, rng, model=model, remat=remat,
                                                    grad_accum_steps=grad_accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"train_loss": loss, "train_accuracy": acc}
    lr = optim.learning_rate(opt_state)
    return new_state, metrics if lr is None else {**metrics, "learning_rate": lr}


def variables(state: TrainState) -> dict:
    """The model's variables {"params"[, "batch_stats"]} of a state (for inference, evaluation)."""
    return _variables(state.params, state.batch_stats)


def make_train_step(mesh: Mesh, state_sharding, **kwargs):
    """`train_step` jitted once: batch sharded on "data", state as `state_sharding`, state donated."""
    return jax.jit(functools.partial(train_step, **kwargs),
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


def create_state(*, model, tx, variables, rng: jax.Array) -> TrainState:
    """A TrainState at step 0 from initial variables; `rng` is a typed key or raw uint32[2]."""
    raw = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    params = variables["params"]
    return TrainState(step=jnp.int32(0), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=jnp.asarray(raw, jnp.uint32))


def state_sharding_like(state, mesh: Mesh):
    """Replicated sharding for every leaf of the state (the place a model axis would go)."""
    return jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), state)
