"""What a training run prints on its own: a short header before the first step, a summary at the end.

Between them the console shows only the progress display and evaluation lines (metrics_log); the
resolved config is in config.json, the numbers in metrics.jsonl. Only process 0 prints.
"""

from __future__ import annotations

import os
import sys

import jax

from vgg_flax import models
from vgg_flax.train import checkpoints as ckpt_lib
from vgg_flax.train import workdir as workdir_lib


def _devices() -> str:
    kinds = sorted({d.device_kind for d in jax.devices()})
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{jax.device_count()} x {', '.join(kinds)} ({jax.default_backend()}){hosts}"


def header(config, workdir: str, *, model_config: dict, params, num_examples: dict[str, int],
           start_step: int) -> str:
    """Model, parameter count, dataset and split sizes, devices, workdir and where the run starts.

    Args:
      config: the run's ConfigDict; model_config: the run's `VGG.to_config()` (described by
      `checkpoints.describe_model`, as a checkpoint of another model is); params: its parameters
      (any array type); num_examples: {split: examples} of the train and eval splits.
    """
    d = config.data
    sizes = ", ".join(f"{split} {n:,}" for split, n in num_examples.items())
    start = f"resuming at step {start_step}" if start_step else "from step 0"
    return "\n".join([
        f"model     VGG {ckpt_lib.describe_model(model_config)}, {model_config['num_classes']} classes, "
        f"{models.count_params(params):,} parameters, {config.model.dtype}",
        f"data      {d.dataset} {d.image_size}px: {sizes} (train/eval examples)",
        f"devices   {_devices()}, global batch {config.global_batch_size}",
        f"workdir   {os.path.abspath(workdir)} ({start}, {config.num_train_steps} steps)"])


def summary(workdir: str) -> str:
    """Best eval top-1 and where the checkpoints, metrics and curves of `workdir` are."""
    workdir = os.path.abspath(workdir)
    path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
    rows = workdir_lib.read_rows(workdir)
    evals = workdir_lib.eval_rows(rows)
    best = max(evals, key=lambda r: r["eval_top1"], default=None)
    last = max((r["step"] for r in rows), default=0)
    done = f"best eval top-1 {best['eval_top1']:.4f} at step {best['step']}" if best else "no evaluation yet"
    return "\n".join([
        f"done      step {last}, {done}",
        f"          checkpoints {workdir_lib.path(workdir, workdir_lib.CHECKPOINT_DIR)}",
        f"          metrics     {path} (config.json and TensorBoard events beside it)",
        f"          curves      `vgg-flax plot {workdir}` writes "
        f"{workdir_lib.path(workdir, workdir_lib.CURVES_FILE)}"])


def show(text: str) -> None:
    """Prints `text` on process 0 (stdout, flushed so it precedes the progress display)."""
    if jax.process_index() == 0:
        print(text, file=sys.stdout, flush=True)
