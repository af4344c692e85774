"""The training program: `train_and_evaluate(config, workdir)` and the pieces it wires together.

One run: check everything that can be checked before compute (each config section where it is used,
the batch against the device count, the dataset, the class count against starting weights), build the
model, optimizer and a replicated TrainState, resume from the newest readable checkpoint, then loop:
a jitted `train_step` per global batch, evaluation every `eval.every_steps` (feeding the plateau
rule), checkpoints every `checkpoints.every_steps`, at the end and on SIGTERM/SIGINT (on several
processes at one step that all of them agree on: `stopping.StopFlag`). The data order is a function
of (seed, step) and dropout keys are folded from (seed, step), so a run killed at any moment and restarted
with the same command ends with the same parameters as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vgg_flax import evaluation, parallel
from vgg_flax.convert import pretrained as pretrained_weights
from vgg_flax.data import pipeline as input_pipeline
from vgg_flax.train import checkpoints as ckpt_lib
from vgg_flax.train import console, lock, metrics_log, optim, prefetch, programs, steps, warm_start
from vgg_flax.train import workdir as workdir_lib
from vgg_flax.train.errors import NonFiniteLossError
from vgg_flax.train.stopping import Interrupted, StopFlag

# float16 trains with float32 parameters and no loss scaling: gradient values below float16's
# smallest subnormal (6e-8) flush to zero and those below 6e-5 lose precision, more so at large
# batches (the loss is a batch mean). bfloat16 has float32's range and needs no scaling.
FLOAT16_WARNING = ("config.model.dtype='float16' trains without loss scaling: small gradients "
                   "underflow to zero; bfloat16 (float32's range) is the supported half precision")


def _check_positive(section: str, **values: int) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"config.{section}{key} must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class Data:
    """The `data` config section (`make_data` checks it), with what the dataset says of itself."""

    datasets: Any  # `create_dataset` and `dataset_info`, as vgg_flax.data.pipeline
    dataset: str
    train_split: str
    eval_split: str
    image_size: int
    augment: str
    normalization: str
    scale_range: tuple[int, int] | None  # None: the augmentation's default
    data_dir: str | None  # None: TFDS's default
    seed: int
    num_classes: int
    num_train_examples: int
    num_eval_examples: int

    def split_sizes(self) -> dict[str, int]:
        return {self.train_split: self.num_train_examples, self.eval_split: self.num_eval_examples}

    def train_batches(self, global_batch_size: int, start_step: int):
        """Batches from `start_step` on: per-process batch = global batch / process count."""
        return self.datasets.create_dataset(
            self.dataset, self.train_split, batch_size=global_batch_size // jax.process_count(),
            train=True, image_size=self.image_size, data_dir=self.data_dir, seed=self.seed,
            start_step=start_step, augment=self.augment, normalization=self.normalization,
            scale_range=self.scale_range, process_index=jax.process_index(),
            process_count=jax.process_count())


def make_data(datasets, *, seed: int, dataset: str, train_split: str, eval_split: str, image_size: int,
              augment: str, normalization: str, data_dir: str | None = None,
              scale_range: tuple[int, int] | None = None, num_classes: int | None = None) -> Data:
    """The `data` config section, after checking that the dataset and its splits exist.

    num_classes: None for the dataset's. scale_range: (min, max) short side for augment="paper"
    (None: fixed at the paper's S). data_dir: None for TFDS's default.
    """
    if num_classes is not None:
        _check_positive("data.", num_classes=num_classes)  # (0 once meant "the dataset's": now None)
    try:
        info = datasets.dataset_info(dataset, data_dir=data_dir)
        num_train = info.num_examples(train_split)
        num_eval = info.num_examples(eval_split)
    except Exception as err:
        raise ValueError(f"dataset {dataset!r} (splits {train_split!r}, {eval_split!r}) is not "
                         f"available: {err}") from err
    return Data(datasets, dataset, train_split, eval_split, image_size, augment, normalization,
                None if scale_range is None else tuple(scale_range), data_dir, seed,
                int(info.num_classes) if num_classes is None else num_classes, num_train, num_eval)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """The `eval` config section: every how many steps, and the global eval batch size."""

    every_steps: int
    batch_size: int

    def __post_init__(self):
        _check_positive("eval.", every_steps=self.every_steps, batch_size=self.batch_size)


@dataclasses.dataclass(frozen=True)
class LogSpec:
    """The `log` config section: a metrics row every `every_steps`, TensorBoard, the console."""

    every_steps: int
    tensorboard: bool
    progress: str  # auto | bar | lines | none

    def __post_init__(self):
        _check_positive("log.", every_steps=self.every_steps)

    def open(self, workdir: str, *, total_steps: int, start_step: int) -> metrics_log.MetricsLogger:
        return metrics_log.MetricsLogger(workdir, total_steps=total_steps, start_step=start_step,
                                         tensorboard=self.tensorboard, progress=self.progress)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the loop needs besides the TrainState, built once by `setup`."""

    mesh: Mesh
    data: Data
    train_step: Callable
    evaluator: evaluation.Evaluator  # the "center" protocol over the eval split
    ckpt: ckpt_lib.Checkpoints
    model_config: dict  # VGG.to_config(): saved with each checkpoint, checked on resume
    plateau: optim.Plateau | None  # None unless schedule.name == "plateau"
    eval: EvalSpec
    log: LogSpec
    num_train_steps: int
    global_batch_size: int


def initial_variables(model, rng: jax.Array, *, image_size: int, warm_start_from: str | None = None,
                      pretrained: str | None = None, reset_head: bool = False) -> dict:
    """Fresh variables, or those of a warm start (net A) / fine-tuning source, as numpy."""
    if warm_start_from and pretrained:
        raise ValueError("set at most one of config.warm_start_from and config.pretrained")
    shape = (1, image_size, image_size, 3)
    variables = jax.device_get(jax.jit(model.init)(rng, jnp.zeros(shape, model.dtype)))
    if warm_start_from:
        _, net_a = ckpt_lib.load_for_inference(warm_start_from)
        return warm_start.paper_warm_start(variables, net_a)
    if pretrained:  # a registry name, URL, torchvision/timm file or save_pretrained file
        _, source = pretrained_weights.from_pretrained(pretrained)
        source = jax.device_get(source)
        return warm_start.fine_tune_start(variables, source, reset_head=reset_head)
    return variables


def setup(config, workdir: str, datasets, optimizer=None) -> tuple[Run, steps.TrainState]:
    """Everything before the loop: checks, model, optimizer, (restored) state, compiled steps."""
    _check_positive("", num_train_steps=config.num_train_steps, global_batch_size=config.global_batch_size)
    eval_spec, log_spec = EvalSpec(**config.eval), LogSpec(**config.log)
    mesh = parallel.create_mesh()
    programs.check_batches(config, num_devices=mesh.size, num_processes=jax.process_count())
    data = make_data(datasets, seed=config.seed, **config.data)
    built = programs.build_programs(config, mesh, num_classes=data.num_classes, optimizer=optimizer,
                                    datasets=datasets)
    model, tx, plateau, shardings = built.model, built.tx, built.plateau, built.state_sharding
    if model.dtype == jnp.float16:
        logging.warning(FLOAT16_WARNING)
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variables = initial_variables(model, init_rng, image_size=data.image_size,
                                  warm_start_from=config.warm_start_from, pretrained=config.pretrained,
                                  reset_head=config.reset_head)
    state = steps.create_state(model=model, tx=tx, variables=variables, rng=state_rng)
    if plateau is not None:
        optim.set_lr_scale(state.opt_state, 1.0)  # fails now, not at the first plateau
    ckpt = ckpt_lib.Checkpoints(workdir, **config.checkpoints)
    model_config = model.to_config()
    try:
        state = _resume(ckpt, jax.device_put(state, shardings), shardings, data.num_classes, model_config,
                        plateau)
    except BaseException:
        ckpt.close()
        raise
    run = Run(mesh=mesh, data=data, ckpt=ckpt, model_config=model_config, plateau=plateau, eval=eval_spec,
              log=log_spec,
              train_step=built.train_step, evaluator=built.evaluator,
              num_train_steps=config.num_train_steps, global_batch_size=config.global_batch_size)
    if jax.process_index() == 0:
        workdir_lib.write_config(workdir, config.to_dict())
    return run, state


def _resume(ckpt, state, shardings, num_classes: int, model_config: dict, plateau):
    """The newest good checkpoint's state (plateau restored), or `state` when there is none.

    Checkpoints of another architecture or class count are an error naming both (never "corrupt").
    """
    def validate(meta):
        ckpt_lib.check_same_architecture(meta.get("model"), model_config, ckpt.directory)
        saved = (meta.get("model") or {}).get("num_classes")  # the class count's one copy
        if saved is not None and int(saved) != num_classes:
            raise warm_start.WeightsMismatchError(
                f"the checkpoints in {ckpt.directory} have {saved} classes but the run "
                f"has {num_classes}; use a new workdir")

    restored = ckpt.restore_latest_good(ckpt_lib.abstract_like(state, shardings), validate=validate)
    if restored is None:
        return state
    state, meta = restored
    if plateau is not None and "plateau" in meta:  # (a run started with another schedule has none)
        plateau.load_state_dict(meta["plateau"])
    logging.info("resumed from step %d", int(state.step))
    return state


def evaluate_run(run: Run, state) -> dict[str, float]:
    """{"eval_loss", "eval_top1", "eval_top5"} of `state` over the whole eval split: the "center"
    protocol of `vgg_flax.evaluation`, every example counted once (padding masked)."""
    data = run.data
    probs, labels = run.evaluator.posteriors(
        steps.variables(state), data.dataset, data.eval_split, protocol="center",
        batch_size=run.eval.batch_size // jax.process_count(), data_dir=data.data_dir,
        normalization=data.normalization, process_index=jax.process_index(),
        process_count=jax.process_count())
    metrics = evaluation.metrics(probs, labels)
    return {f"eval_{k}": metrics[k] for k in ("loss", "top1", "top5")}


def _meta(run: Run) -> dict:
    plateau = {"plateau": run.plateau.state_dict()} if run.plateau is not None else {}
    return {"model": run.model_config, **plateau}  # the model's config holds the class count


def _flush(run: Run, pending: list, start_time: float, logger) -> float:
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
    lr = {"learning_rate": rows[-1]["learning_rate"]} if "learning_rate" in rows[-1] else {}
    row = {"step": pending[-1][0], **lr,
           **{k: float(np.mean([r[k] for r in rows])) for k in ("train_loss", "train_accuracy")},
           "images_per_sec": len(pending) * run.global_batch_size / max(now - start_time, 1e-9)}
    logger.write(row)  # loss and accuracy: means over the steps since the last row
    pending.clear()
    return now


def _eval_and_plateau(run: Run, state, logger):
    """(state, eval metrics): the plateau rule sees eval_top1 and may set the state's lr_scale."""
    metrics = evaluate_run(run, state)
    logger.write({"step": int(state.step), **metrics})
    if run.plateau is not None and run.plateau.update(metrics["eval_top1"]):
        logging.info("eval_top1 plateaued: learning-rate scale now %g", run.plateau.scale)
        state = state.replace(opt_state=optim.set_lr_scale(state.opt_state, run.plateau.scale))
    return state, metrics


def train_loop(run: Run, state, logger, stop: StopFlag):
    """Steps from the restored step to num_train_steps, with logging, eval and checkpoints."""
    start, last = int(state.step), run.num_train_steps
    batches = prefetch.to_device(run.data.train_batches(run.global_batch_size, start),
                                 lambda local: parallel.global_batch(local, run.mesh), size=2)
    try:
        return _steps(run, state, logger, stop, batches, start, last)
    finally:
        batches.close()  # stops and joins the prefetch thread


def _steps(run: Run, state, logger, stop: StopFlag, batches, start: int, last: int):
    """The step loop of `train_loop` over prefetched device batches."""
    pending, t0 = [], time.time()
    for step in range(start + 1, last + 1):
        state, metrics = run.train_step(state, next(batches))
        pending.append((step, metrics))
        do_eval = step % run.eval.every_steps == 0 or step == last
        do_save = run.ckpt.due(step, last)
        signum = stop.stop_signal(step - start)
        if step % run.log.every_steps == 0 or do_eval or do_save or signum:
            t0 = _flush(run, pending, t0, logger)
        eval_metrics = None
        if do_eval:
            state, eval_metrics = _eval_and_plateau(run, state, logger)
        if do_save or signum:
            best = {"eval_top1": eval_metrics["eval_top1"]} if eval_metrics else None
            run.ckpt.save(step, state, _meta(run), best)
        if signum:
            run.ckpt.wait()
            raise Interrupted(signum, step)
        if do_eval:
            t0 = time.time()  # evaluation time is not training throughput
    return state


def train_and_evaluate(config, workdir: str, *, datasets: Any = None,
                       optimizer: optax.GradientTransformation | None = None):
    """Trains and evaluates as `config` says, in `workdir`; returns the final TrainState.

    Args:
      config: an `ml_collections.ConfigDict` like configs/default.py's (locked).
      workdir: checkpoints/, metrics.jsonl, TensorBoard events and config.json go here; a workdir
        with checkpoints is resumed from its newest readable one.
      datasets: an object with `create_dataset` and `dataset_info` (default: vgg_flax.data.pipeline).
      optimizer: any optax transformation to train with instead of config.optim/config.schedule
        (its learning rate is its own; see `optim.with_learning_rate` for the plateau rule's scale).
    Raises:
      NonFiniteLossError, Interrupted (after checkpointing), ValueError/KeyError for bad settings.
    """
    with lock.WorkdirLock(workdir, enabled=jax.process_index() == 0):  # one program per workdir
        return _train_and_evaluate(config, workdir, datasets or input_pipeline, optimizer)


def _train_and_evaluate(config, workdir: str, datasets, optimizer):
    run, state = setup(config, workdir, datasets, optimizer)
    console.show(console.header(config, workdir, model_config=run.model_config, params=state.params,
                                num_examples=run.data.split_sizes(), start_step=int(state.step)))
    logger = run.log.open(workdir, total_steps=run.num_train_steps, start_step=int(state.step))
    try:
        with StopFlag() as stop:
            if int(state.step) < run.num_train_steps:
                state = train_loop(run, state, logger, stop)
            run.ckpt.wait()
    finally:
        logger.close()
        run.ckpt.close()
    console.show(console.summary(workdir))
    return state
