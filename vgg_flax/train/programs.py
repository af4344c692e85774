"""The compiled programs of a run, built once from its config: `vgg-flax train` and `vgg-flax compile`.

`build_programs(config, mesh, ...)` makes the model (from the `model` section), the optimizer and its
schedule (`optim`, `schedule`), the TrainState's shardings, and the jitted train step (state donated,
`step` section: gradient accumulation, remat) and the evaluator (`vgg_flax.evaluation.Evaluator`,
whose "center" program evaluates during training). `vgg_flax.train.loop.setup` runs them on
this machine's devices; `vgg_flax.train.aot` compiles the very same functions ahead of time for a TPU
slice it does not have, with the state as `abstract_state`'s shapes (nothing is materialised: VGG16's
138M parameters stay ShapeDtypeStructs). The only difference is the conv path, fixed for the target
platform (`vgg_flax.ops.routing.for_platform`): a CPU host would otherwise trace its own Winograd path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vgg_flax import evaluation, parallel
from vgg_flax.models import VGG
from vgg_flax.ops import routing
from vgg_flax.train import optim, steps


@dataclasses.dataclass(frozen=True)
class Programs:
    """What a run computes with: the model, optimizer, state shardings, the jitted train step and the
    evaluator."""

    mesh: Mesh
    model: Any  # vgg_flax.VGG
    tx: optax.GradientTransformation
    plateau: optim.Plateau | None  # None unless schedule.name == "plateau"
    state_sharding: Any  # a TrainState of shardings
    train_step: Callable  # (state, batch) -> (state, metrics); state donated
    evaluator: evaluation.Evaluator  # its program("center"): (variables, images) -> posteriors


def build_optimizer(config, optimizer: optax.GradientTransformation | None = None):
    """(optax transformation, plateau rule or None) from the `optim` and `schedule` sections, or
    `optimizer` as given (the plateau schedule then needs its injected `lr_scale`)."""
    schedule, plateau = optim.make_schedule(num_steps=config.num_train_steps, **config.schedule)
    tx = optimizer or optim.make_optimizer(learning_rate=schedule, **config.optim)
    return tx, plateau


def check_batches(config, *, num_devices: int, num_processes: int) -> None:
    """The train batch (with its micro-batches) and the eval batch split evenly, or a ValueError
    (`vgg_flax.parallel.check_batch_divides`'s)."""
    for size, accum in ((config.global_batch_size, config.step.grad_accum_steps),
                        (config.eval.batch_size, 1)):
        parallel.check_batch_divides(global_batch_size=size, num_devices=num_devices,
                                     grad_accum_steps=accum, num_processes=num_processes)


def abstract_state(model, tx, *, image_size: int, state_sharding=None) -> steps.TrainState:
    """The TrainState's shapes and dtypes (ShapeDtypeStructs, with `state_sharding` if given),
    traced with `jax.eval_shape`: no parameter is materialised."""
    def init():
        shape = (1, image_size, image_size, 3)
        variables = model.init(jax.random.key(0), jnp.zeros(shape, model.dtype))
        return steps.create_state(model=model, tx=tx, variables=variables, rng=jax.random.key(0))

    shapes = jax.eval_shape(init)
    if state_sharding is None:
        return shapes
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, state_sharding)


def build_programs(config, mesh: Mesh, *, num_classes: int, optimizer=None,
                   platform: str | None = None, datasets: Any = None,
                   device_memory: int | None = None) -> Programs:
    """The model, optimizer, state shardings and jitted steps of `config` on `mesh`.

    Args:
      config: a training config (configs/default.py's keys).
      mesh: the data-parallel mesh (`vgg_flax.parallel.create_mesh`, over real or compile-only devices).
      num_classes: the classifier width (the dataset's, or config.data.num_classes).
      optimizer: an optax transformation instead of the `optim`/`schedule` sections.
      platform: the target ("tpu", "cuda", ...) when it is not this host's backend: the model's
        `conv_impl` is resolved for it (`vgg_flax.ops.routing.for_platform`); None: resolved when traced.
      datasets: the evaluator's `create_dataset` (default: vgg_flax.data.pipeline).
      device_memory: bytes per device that bound the evaluator's views per call (default: this
        host's devices, `vgg_flax.evaluation.device_memory`; a TPU target passes its HBM).
    """
    tx, plateau = build_optimizer(config, optimizer)
    model = VGG.from_config(config.model.to_dict(), num_classes=num_classes)
    if platform is not None:
        model = routing.for_platform(model, platform)
    shapes = abstract_state(model, tx, image_size=config.data.image_size)
    sharding = steps.state_sharding_like(shapes, mesh)
    image_size = config.data.image_size
    evaluator = evaluation.Evaluator(
        model, image_size=image_size, mesh=mesh, datasets=datasets,
        max_views=evaluation.views_per_call(model, image_size, memory=device_memory))
    return Programs(mesh=mesh, model=model, tx=tx, plateau=plateau, state_sharding=sharding,
                    train_step=steps.make_train_step(mesh, sharding, model=model, tx=tx, **config.step),
                    evaluator=evaluator)
