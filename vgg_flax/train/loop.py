"""The training program: `train_and_evaluate(config, workdir)` and the pieces it wires together.

One run: check everything that can be checked before compute (config keys and names, the batch
against the device count, the dataset, the class count against starting weights), build the model,
optimizer and a replicated TrainState, resume from the newest readable checkpoint, then loop: a jitted
`train_step` per global batch, evaluation every `eval_every_steps` (feeding the plateau rule),
checkpoints every `checkpoint_every_steps`, at the end and on SIGTERM/SIGINT. The data order is a
function of (seed, step) and dropout keys are folded from (seed, step), so a run killed at any
moment and restarted with the same command ends with the same parameters as one never interrupted.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax.train import checkpoints as ckpt_lib
from vgg_flax.train import console, lock, metrics_log, optim, prefetch, steps, warm_start


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last checkpoint written is still good."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the state was checkpointed at `step` before stopping."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after saving step {step}")
        self.signum, self.step = signum, step


def initialize_distributed(enabled: bool) -> None:
    """`jax.distributed.initialize()` for multi-process runs (before any other JAX call).

    With no arguments JAX finds the cluster itself (Cloud TPU, SLURM, Open MPI, Kubernetes) or reads
    JAX_COORDINATOR_ADDRESS; JAX_NUM_PROCESSES and JAX_PROCESS_ID complete a hand-made cluster.
    """
    import os

    if not enabled:
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def _datasets_module():
    from vgg_flax.data import pipeline as input_pipeline

    return input_pipeline


def check_config(config) -> None:
    """Names and numbers that would otherwise fail late; unknown keys fail at the config itself."""
    if config.optimizer not in optim.OPTIMIZERS:
        raise KeyError(f"unknown optimizer {config.optimizer!r}; valid: {optim.OPTIMIZERS}")
    if config.schedule not in optim.SCHEDULES:
        raise KeyError(f"unknown schedule {config.schedule!r}; valid: {optim.SCHEDULES}")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {config.dtype!r}")
    if config.warm_start_from and config.pretrained:
        raise ValueError("set at most one of warm_start_from and pretrained")
    for key in ("num_train_steps", "global_batch_size", "eval_batch_size", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps"):
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")


def dataset_classes(config, datasets) -> int:
    """The class count, after checking that the dataset and its splits exist (before compute)."""
    try:
        info = datasets.dataset_info(config.dataset, data_dir=config.data_dir or None)
        for split in (config.train_split, config.eval_split):
            info.num_examples(split)
    except Exception as err:
        raise ValueError(f"dataset {config.dataset!r} (splits {config.train_split!r}, "
                         f"{config.eval_split!r}) is not available: {err}") from err
    return config.num_classes or int(info.num_classes)


def initial_variables(config, model, rng: jax.Array) -> dict:
    """Fresh variables, or those of a warm start (net A) / fine-tuning source, as numpy."""
    size = config.image_size
    variables = jax.device_get(jax.jit(model.init)(rng, jnp.zeros((1, size, size, 3), model.dtype)))
    if config.warm_start_from:
        _, net_a = ckpt_lib.load_for_inference(config.warm_start_from)
        return warm_start.paper_warm_start(variables, net_a)
    if config.pretrained:
        from vgg_flax.convert import pretrained  # a name, URL, torchvision file or save_pretrained file

        _, source = pretrained.from_pretrained(config.pretrained)
        source = jax.device_get(source)
        return warm_start.fine_tune_start(variables, source, reset_head=config.reset_head)
    return variables


def build_optimizer(config):
    """(optax transformation, schedule) from the config's optimizer section."""
    freeze = optim.feature_mask if config.freeze_features else None
    tx = optim.make_optimizer(name=config.optimizer, momentum=config.momentum, nesterov=config.nesterov,
                              weight_decay=config.weight_decay, b1=config.adam_b1, b2=config.adam_b2,
                              eps=config.adam_eps, grad_clip_norm=config.grad_clip_norm, freeze=freeze)
    schedule = optim.make_schedule(name=config.schedule, base_lr=config.learning_rate,
                                   num_steps=config.num_train_steps, warmup_steps=config.warmup_steps,
                                   boundaries=tuple(config.lr_boundaries), factor=config.lr_factor,
                                   end_lr_fraction=config.cosine_end_fraction)
    return tx, schedule


def make_plateau(config) -> optim.Plateau:
    return optim.Plateau(factor=config.lr_factor, patience=config.plateau_patience,
                         min_delta=config.plateau_min_delta, max_reductions=config.plateau_max_reductions)


def setup(config, workdir: str, datasets) -> SimpleNamespace:
    """Everything before the loop: checks, model, optimizer, (restored) state, compiled steps."""
    check_config(config)
    mesh = steps.create_mesh()
    steps.check_batch_divides(global_batch_size=config.global_batch_size, num_devices=mesh.size,
                              grad_accum_steps=config.grad_accum_steps, num_processes=jax.process_count())
    steps.check_batch_divides(global_batch_size=config.eval_batch_size, num_devices=mesh.size,
                              num_processes=jax.process_count())
    num_classes = dataset_classes(config, datasets)
    model = ckpt_lib.model_from_config(config.model.to_dict(), num_classes=num_classes, dtype=config.dtype)
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variables = initial_variables(config, model, init_rng)
    tx, schedule = build_optimizer(config)
    state = steps.create_state(model=model, tx=tx, variables=variables, rng=state_rng)
    shardings = steps.state_sharding_like(state, mesh)
    state = jax.device_put(state, shardings)
    run = SimpleNamespace(config=config, workdir=workdir, datasets=datasets, mesh=mesh, model=model,
                          schedule=schedule, num_classes=num_classes, plateau=make_plateau(config))
    run.ckpt = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoints)
    run.state = _resume(run, state, shardings)
    run.train_step = steps.make_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule,
                                           grad_accum_steps=config.grad_accum_steps, remat=config.remat)
    run.eval_step = steps.make_eval_step(mesh, shardings, model=model)
    ckpt_lib.write_config(workdir, config.to_dict())
    return run


def _resume(run, state, shardings):
    """The newest good checkpoint's state (plateau restored), or `state` when there is none."""
    def validate(meta):
        if int(meta["num_classes"]) != run.num_classes:
            raise warm_start.WeightsMismatchError(
                f"the checkpoints in {run.ckpt.directory} have {meta['num_classes']} classes but the run "
                f"has {run.num_classes}; use a new workdir")

    restored = run.ckpt.restore_latest_good(ckpt_lib.abstract_like(state, shardings), validate=validate)
    if restored is None:
        return state
    state, meta = restored
    run.plateau.load_state_dict(meta["plateau"])
    logging.info("resumed from step %d", int(state.step))
    return state


def _local_batches(run, *, train: bool, start_step: int = 0):
    """This process's share of the data: per-process batch = global batch / process count."""
    c = run.config
    size = (c.global_batch_size if train else c.eval_batch_size) // jax.process_count()
    options = {"scale_range": tuple(c.scale_range)} if train and any(c.scale_range) else {}
    return run.datasets.create_dataset(
        c.dataset, c.train_split if train else c.eval_split, batch_size=size, train=train,
        image_size=c.image_size, data_dir=c.data_dir or None, seed=c.seed, start_step=start_step,
        augment=c.augment, normalization=c.normalization, process_index=jax.process_index(),
        process_count=jax.process_count(), **options)


def evaluate(run) -> dict[str, float]:
    """Exact masked metrics over the whole eval split (padding rows count for nothing).

    Every process runs the same number of batches (the largest any process can need); a process
    whose shard is shorter feeds all-masked batches, so the collective program never deadlocks.
    """
    c = run.config
    local = c.eval_batch_size // jax.process_count()
    n = run.datasets.dataset_info(c.dataset, data_dir=c.data_dir or None).num_examples(c.eval_split)
    num_batches = math.ceil(math.ceil(n / jax.process_count()) / local)
    batches = iter(_local_batches(run, train=False))
    totals = None
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            batch = {"image": np.zeros((local, c.image_size, c.image_size, 3), np.float32),
                     "label": np.zeros((local,), np.int32), "mask": np.zeros((local,), bool)}
        out = run.eval_step(run.state, steps.global_batch(batch, run.mesh))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    t = jax.device_get(totals)
    count = max(float(t["count"]), 1.0)
    return {f"eval_{k}": float(t[k]) / count for k in ("loss", "top1", "top5")}


def _meta(run) -> dict:
    return {"num_classes": run.num_classes, "plateau": run.plateau.state_dict()}


def _save(run, metrics: dict | None = None) -> None:
    run.ckpt.save(int(run.state.step), run.state, _meta(run), metrics)


def _flush(run, pending: list, start_time: float, logger) -> float:
    """Checks the pending steps' losses (raising at the first non-finite one) and logs a row."""
    if not pending:
        return start_time
    rows = jax.device_get([m for _, m in pending])
    for (step, _), row in zip(pending, rows, strict=True):
        if not np.isfinite(row["train_loss"]):
            kept = run.ckpt.latest_step()
            raise NonFiniteLossError(f"training loss is {row['train_loss']} at step {step}; " + (
                f"the checkpoint of step {kept} is intact" if kept is not None else "no checkpoint yet"))
    now = time.time()
    row = {"step": pending[-1][0], "learning_rate": rows[-1]["learning_rate"],
           **{k: float(np.mean([r[k] for r in rows])) for k in ("train_loss", "train_accuracy")},
           "images_per_sec": len(pending) * run.config.global_batch_size / max(now - start_time, 1e-9)}
    logger.write(row)  # loss and accuracy: means over the steps since the last row
    pending.clear()
    return now


class _StopFlag:
    """Records SIGTERM/SIGINT so the loop can checkpoint and stop between steps."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _eval_and_plateau(run, logger) -> dict:
    metrics = evaluate(run)
    logger.write({"step": int(run.state.step), **metrics})
    if run.config.schedule == "plateau" and run.plateau.update(metrics["eval_top1"]):
        logging.info("eval_top1 plateaued: learning-rate scale now %g", run.plateau.scale)
        run.state = run.state.replace(lr_scale=jax.device_put(
            jnp.float32(run.plateau.scale), steps.replicated(run.mesh)))
    return metrics


def train_loop(run, logger, stop: _StopFlag) -> None:
    """Steps from the restored step to num_train_steps, with logging, eval and checkpoints."""
    c = run.config
    start = int(run.state.step)
    batches = prefetch.to_device(_local_batches(run, train=True, start_step=start),
                                 lambda local: steps.global_batch(local, run.mesh), size=2)
    pending, t0 = [], time.time()
    for step in range(start + 1, c.num_train_steps + 1):
        batch = next(batches)
        run.state, metrics = run.train_step(run.state, batch)
        pending.append((step, metrics))
        do_eval = step % c.eval_every_steps == 0 or step == c.num_train_steps
        do_save = step % c.checkpoint_every_steps == 0 or step == c.num_train_steps
        if step % c.log_every_steps == 0 or do_eval or do_save or stop.signum:
            t0 = _flush(run, pending, t0, logger)
        eval_metrics = _eval_and_plateau(run, logger) if do_eval else None
        if do_save or stop.signum:
            _save(run, {"eval_top1": eval_metrics["eval_top1"]} if eval_metrics else None)
        if stop.signum:
            run.ckpt.wait()
            raise Interrupted(stop.signum, step)
        if do_eval:
            t0 = time.time()  # evaluation time is not training throughput


def train_and_evaluate(config, workdir: str, *, datasets: Any = None):
    """Trains and evaluates as `config` says, in `workdir`; returns the final TrainState.

    Args:
      config: an `ml_collections.ConfigDict` like configs/default.py's (locked).
      workdir: checkpoints/, metrics.jsonl, TensorBoard events and config.json go here; a workdir
        with checkpoints is resumed from its newest readable one.
      datasets: an object with `create_dataset` and `dataset_info` (default: vgg_flax.input_pipeline).
    Raises:
      NonFiniteLossError, Interrupted (after checkpointing), ValueError/KeyError for bad settings,
      lock.WorkdirLockedError when another program is training in `workdir`.
    """
    with lock.WorkdirLock(workdir, enabled=jax.process_index() == 0):  # one program per workdir
        return _train_and_evaluate(config, workdir, datasets or _datasets_module())


def _train_and_evaluate(config, workdir: str, datasets):
    run = setup(config, workdir, datasets)
    console.show(console.header(config, workdir, params=run.state.params, datasets=datasets,
                                num_classes=run.num_classes, start_step=int(run.state.step)))
    logger = metrics_log.MetricsLogger(workdir, total_steps=config.num_train_steps,
                                       start_step=int(run.state.step), tensorboard=config.tensorboard,
                                       progress=config.progress)
    try:
        with _StopFlag() as stop:
            if int(run.state.step) < config.num_train_steps:
                train_loop(run, logger, stop)
            run.ckpt.wait()
    finally:
        logger.close()
        run.ckpt.close()
    console.show(console.summary(workdir))
    return run.state
