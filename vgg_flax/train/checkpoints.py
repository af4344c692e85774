"""Orbax checkpoints of a training run: save, resume, survive crashes, load for inference.

A checkpoint step holds two items: "state" (the TrainState pytree: step, params, batch statistics,
optimizer state, RNG key, plateau scale) and "meta" (JSON: the plateau rule's state and the class
count). Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves no step that looks finished; a step that is nevertheless unreadable
(a disk error, a file truncated by hand) is moved aside to `checkpoints_corrupt/` with a warning and
the previous step is restored instead.

Retention: the last `keep` steps plus the best one by `eval_top1`. The `checkpoints` config section
is `Checkpoints`' keyword arguments (every_steps, keep, async_save).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

from vgg_flax.models import VGG, classifier_in, parse_config

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def _ocp():
    import orbax.checkpoint as ocp  # heavy import, only when checkpoints are touched

    return ocp


class Checkpoints:
    """A CheckpointManager over `workdir/checkpoints` with the project's retention and fallback.

    Args:
      workdir: the run's directory.
      every_steps: the training loop saves at multiples of this step count (`due`).
      keep: how many of the latest steps to keep (the best by eval_top1 is kept as well).
      async_save: write in a background thread while training continues.
    """

    def __init__(self, workdir: str, *, every_steps: int = 1, keep: int = 3, async_save: bool = True):
        for name, value in (("every_steps", every_steps), ("keep", keep)):
            if value <= 0:
                raise ValueError(f"config.checkpoints.{name} must be positive, got {value}")
        self.every_steps = every_steps
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self.keep, self.async_save = keep, async_save
        self._manager = self._open()

    def _open(self):
        ocp = _ocp()
        policies = ocp.checkpoint_managers
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=self.keep),
            policies.BestN(get_metric_fn=lambda m: m["eval_top1"], reverse=False, n=1,
                           keep_checkpoints_without_metrics=False)])
        # best_fn makes orbax write each step's metrics to disk, so the best step is still known
        # (and kept) after a restart; retention itself is `preserve`.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, best_fn=lambda m: m["eval_top1"], best_mode="max",
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def due(self, step: int, last_step: int) -> bool:
        """Whether the loop saves after `step` (every `every_steps`, and the last step)."""
        return step % self.every_steps == 0 or step == last_step

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest eval_top1 (the latest when none has one)."""
        return self._manager.best_step()

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts saving `state` at `step` (returns before the write ends when async)."""
        ocp = _ocp()
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) at `step`; `abstract_state` gives shapes, dtypes and shardings."""
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        return out["state"], out["meta"]

    def restore_latest_good(self, abstract_state: Any, validate=None) -> tuple[Any, dict] | None:
        """The newest readable checkpoint, moving unreadable ones aside; None if there is none.

        A checkpoint that reads fine but was written by another run (`validate(meta)` raises, or the
        array shapes differ from `abstract_state`'s) is an error, never "corrupt": it is left alone.
        Every process tries the same steps in the same order, so all agree on the step restored.
        """
        want = _shapes(abstract_state)
        for step in reversed(self.all_steps()):
            try:
                meta, saved = self.read_meta(step), _shapes(self._state_metadata(step))
            except Exception as err:  # orbax raises many types for damaged files
                self._warn_and_quarantine(step, err)
                continue
            if validate is not None:
                validate(meta)
            if saved != want:
                raise CheckpointError(f"the checkpoints in {self.directory} were written for another model "
                                      "or optimizer (array shapes differ); use a new workdir")
            try:
                return self.restore(step, abstract_state)
            except Exception as err:
                self._warn_and_quarantine(step, err)
        return None

    def read_meta(self, step: int) -> dict:
        """The JSON item saved with `step` (the plateau rule's state, the class count)."""
        ocp = _ocp()
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _state_metadata(self, step: int) -> Any:
        metadata = self._manager.item_metadata(step)["state"]
        return metadata.tree if hasattr(metadata, "tree") else metadata

    def _warn_and_quarantine(self, step: int, err: Exception) -> None:
        # orbax's read errors carry the whole TensorStore spec (~80 lines): the first line names the array.
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous "
                        "one", step, self.directory, type(err).__name__, reason)
        self._quarantine(step)

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step out of the manager's directory (kept for inspection)."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(src):
                shutil.move(src, dst)
        if jax.process_count() > 1:  # the others must not reopen the directory before the move
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vgg_flax_quarantine_{step}")
        self._manager.close()
        self._manager = self._open()

    def read_state_numpy(self, step: int) -> dict:
        """The saved state at `step` as nested dicts of numpy arrays, on any number of devices."""
        ocp = _ocp()
        item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                      self._state_metadata(step))
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))
        return out["state"]


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    """The sorted leaf shapes: a structure-order-free fingerprint of a state."""
    return sorted(tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)
                  for x in jax.tree_util.tree_leaves(tree))


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for `state`'s structure."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)


def write_config(workdir: str, config_dict: dict) -> None:
    """The resolved config as JSON (process 0 only), so a run can be rebuilt for inference."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> dict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found: {workdir!r} is not a vgg-flax training workdir")
    with open(path) as f:
        return json.load(f)


DTYPES = ("float32", "bfloat16", "float16")


def model_from_config(model_cfg: dict, *, num_classes: int, dtype: str | None = None):
    """The VGG module a config's `model` section describes (see configs/default.py).

    `dtype` (the compute dtype; parameters stay float32) overrides the section's `dtype`.
    """
    dtype = dtype or model_cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {DTYPES}, not {dtype!r}")
    return VGG.from_config(model_cfg, num_classes=num_classes, dtype=dtype)


# The old name of `vgg_flax.models.parse_config` (configs' comma strings).
parse_architecture = parse_config


def load_for_inference(workdir: str, *, which: str = "latest"):
    """(model, variables) of a training run, for evaluation and prediction.

    Args:
      workdir: a directory written by `training.train_and_evaluate`.
      which: "latest" or "best" (by eval_top1; falls back to latest when no eval was saved).
    Returns:
      the VGG module (float32 compute) and {"params", ["batch_stats"]} as numpy arrays.
    """
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', not {which!r}")
    config = read_config(workdir)
    ckpt = Checkpoints(workdir, async_save=False)
    try:
        step = (ckpt.best_step() if which == "best" else None) or ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        state = ckpt.read_state_numpy(step)
    finally:
        ckpt.close()
    num_classes = int(np.shape(jax.tree_util.tree_leaves(_classifier(state["params"]))[-1])[-1])
    model = model_from_config(config["model"], num_classes=num_classes, dtype="float32")
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return model, variables


def _classifier(params: dict) -> dict:
    """The last classifier layer's parameters (fc3 or head_out)."""
    name = classifier_in(params)
    if name is not None:
        return {"bias": params[name]["bias"]}
    raise CheckpointError("the checkpoint has no classifier layer (fc3 or head_out)")
