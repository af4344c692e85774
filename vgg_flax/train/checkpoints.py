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

import asyncio
import contextlib
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np

from vgg_flax.models import VGG, classifier_in, resolve_config
from vgg_flax.models.configs import config_to_spec
from vgg_flax.train import workdir as workdir_lib
from vgg_flax.train.errors import CheckpointError


def _ocp():
    import orbax.checkpoint as ocp  # heavy import, only when checkpoints are touched

    return ocp


class _TidyLoops(asyncio.AbstractEventLoopPolicy):
    """The current event loop policy, except that a loop it creates cancels and awaits its pending
    tasks when closed (what `asyncio.run` does, for that loop only).

    Why: orbax runs each read in a fresh loop (`asyncio_utils._run_sync_via_new_loop`) and closes it
    as soon as the read raises. The other arrays' reads, gathered with the failing one, are still
    pending then; they die later at garbage collection or when TensorStore completes them, printing
    "Exception ignored in coroutine _read_array_index_and_device_put" and "RuntimeError: Event loop
    is closed" tracebacks after the one-line warning of a damaged checkpoint.
    """

    def __init__(self, base: asyncio.AbstractEventLoopPolicy):
        self._base = base

    def new_event_loop(self):
        loop = self._base.new_event_loop()
        close = loop.close

        def finish_pending_then_close():
            if not loop.is_closed() and not loop.is_running():
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:  # return_exceptions: their errors are retrieved, never logged at exit
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            close()

        loop.close = finish_pending_then_close
        return loop

    def get_event_loop(self):
        return self._base.get_event_loop()

    def set_event_loop(self, loop):
        self._base.set_event_loop(loop)

    def get_child_watcher(self):  # Unix, Python < 3.14
        return self._base.get_child_watcher()

    def set_child_watcher(self, watcher):
        self._base.set_child_watcher(watcher)


@contextlib.contextmanager
def _tidy_reads():
    """Around an orbax read: a failed read leaves no task behind (see `_TidyLoops`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the policy API, deprecated in 3.14
        base = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(_TidyLoops(base))
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(base)


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
        self.directory = workdir_lib.path(self.workdir, workdir_lib.CHECKPOINT_DIR)
        self.keep, self.async_save = keep, async_save
        self._manager = self._open()

    def _open(self):
        ocp = _ocp()
        policies = ocp.checkpoint_managers
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=self.keep),
            policies.BestN(get_metric_fn=_top1, reverse=False, n=1, keep_checkpoints_without_metrics=False)])
        # best_fn makes orbax write each step's metrics to disk, so the best step is still known
        # (and kept) after a restart; retention itself is `preserve`.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, best_fn=_top1, best_mode="max",
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return _manager_class()(self.directory, item_handlers=handlers, options=options)

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
        """Starts saving `state` at `step` (returns before the write ends when async).

        metrics: {"eval_top1": ...} when the step was evaluated. A step saved between evaluations
        gets {} (ranked below every evaluated step, `_top1`): orbax warns at every save given no
        metrics once a `best_fn` is set.
        """
        ocp = _ocp()
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, metrics=metrics or {}, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) at `step`; `abstract_state` gives shapes, dtypes and shardings."""
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        with _tidy_reads():
            out = self._manager.restore(step, args=args)
        return out["state"], out["meta"]

    def restore_latest_good(self, abstract_state: Any, validate=None) -> tuple[Any, dict] | None:
        """The newest readable checkpoint, moving unreadable ones aside; None if there is none.

        A checkpoint that reads fine but was written by another run (`validate(meta)` raises, or the
        array names or shapes differ from `abstract_state`'s) is an error, never "corrupt": it is
        left alone. Every process tries the same steps in the same order, so all agree on the step
        restored.
        """
        want = _fingerprint(abstract_state)
        for step in reversed(self.all_steps()):
            try:
                meta, saved = self.read_meta(step), _fingerprint(self._state_metadata(step))
            except Exception as err:  # orbax raises many types for damaged files
                self._warn_and_quarantine(step, err)
                continue
            if validate is not None:
                validate(meta)
            if saved != want:
                raise CheckpointError(f"the checkpoints in {self.directory} were written for another model "
                                      f"or optimizer ({_first_difference(saved, want)}); use a new workdir")
            try:
                return self.restore(step, abstract_state)
            except Exception as err:
                self._warn_and_quarantine(step, err)
        return None

    def read_meta(self, step: int) -> dict:
        """The JSON item saved with `step` (the plateau rule's state, the class count)."""
        ocp = _ocp()
        with _tidy_reads():
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _state_metadata(self, step: int) -> Any:
        with _tidy_reads():
            metadata = self._manager.item_metadata(step)["state"]
        return metadata.tree if hasattr(metadata, "tree") else metadata

    def _warn_and_quarantine(self, step: int, err: Exception) -> None:
        # orbax wraps TensorStore's error (which names the array and what is wrong with its bytes) in
        # one carrying the whole TensorStore spec (~80 lines): report the innermost cause's first line.
        while err.__cause__ is not None:
            err = err.__cause__
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous "
                        "one", step, self.directory, type(err).__name__, reason)
        self._quarantine(step)

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step out of the manager's directory (kept for inspection)."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            aside = workdir_lib.path(self.workdir, workdir_lib.CORRUPT_DIR)
            dst = os.path.join(aside, f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(src):
                shutil.move(src, dst)
        if jax.process_count() > 1:  # the others must not reopen the directory before the move
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vgg_flax_quarantine_{step}")
        self._manager.close()
        self._manager = self._open()

    def read_state_numpy(self, step: int) -> dict:
        """The saved state at `step` as nested dicts of arrays, read onto this process's first device
        whatever devices and processes wrote it (the saved shardings name the writers' devices)."""
        ocp = _ocp()
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                      self._state_metadata(step))
        with _tidy_reads():
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))
        return out["state"]


def _manager_class():
    """orbax's CheckpointManager, except that it never asks JAX's preemption sync point itself.

    Why: the training loop asks `reached_preemption_sync_point` once per step, with its own step
    count, to learn the step at which every process stops (stopping.StopFlag). The sync manager keeps
    the last count it was given and, on a notice, agrees on the largest count + 1; orbax's own calls
    (with the saved step, also from its background finalize thread, after the loop has moved on)
    would hand it a stale count, and an agreed step already passed would never come.
    """
    ocp = _ocp()

    class Manager(ocp.CheckpointManager):
        def reached_preemption(self, step: int) -> bool:
            return False

    return Manager


def _top1(metrics: dict) -> float:
    """A saved step's rank for retention and `best_step`: its eval top-1, -inf when not evaluated."""
    return float(metrics.get("eval_top1", -np.inf))


def _key_name(key: Any) -> str:
    """A path entry as orbax's metadata tree spells it: a dict key, attribute name or index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _fingerprint(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(path "params/conv1_1/kernel", shape) of every leaf, sorted: a state's structure as the
    TrainState and orbax's metadata dicts both give it (the same arrays, in containers of other types)."""
    return sorted(("/".join(_key_name(k) for k in path), tuple(np.shape(x)))
                  for path, x in jax.tree_util.tree_leaves_with_path(tree))


def _first_difference(saved: list, want: list) -> str:
    """What differs first between two fingerprints, in words."""
    saved_d, want_d = dict(saved), dict(want)
    for path in sorted(set(saved_d) | set(want_d)):
        if path not in want_d:
            return f"they have {path}, this run does not"
        if path not in saved_d:
            return f"this run has {path}, they do not"
        if saved_d[path] != want_d[path]:
            return f"{path} is {saved_d[path]} there, {want_d[path]} here"
    return "the same arrays"


def describe_model(model_cfg: dict) -> str:
    """"vgg11, BatchNorm, small head": the architecture a `VGG.to_config` dict describes."""
    config = config_to_spec(model_cfg["config"])
    return f"{config}{', BatchNorm' if model_cfg.get('batch_norm') else ''}, {model_cfg.get('head')} head"


def check_same_architecture(saved: dict | None, current: dict, directory: str) -> None:
    """Raises CheckpointError naming both architectures when a checkpoint's model (its meta's
    `VGG.to_config`; None in checkpoints written before it was saved) is not the run's: another
    config (names resolved: vgg11 is A), BatchNorm or head. Other fields are the arrays' business."""
    if saved is None:
        return
    same = (resolve_config(saved["config"]) == resolve_config(current["config"])
            and all(saved.get(k) == current.get(k) for k in ("batch_norm", "head")))
    if not same:
        raise CheckpointError(f"the checkpoints in {directory} are of model {describe_model(saved)!r}, "
                              f"this run's is {describe_model(current)!r}; use a new workdir (or the "
                              "checkpoints' model)")


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for `state`'s structure."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)


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
    config = workdir_lib.read_config(workdir)
    ckpt = Checkpoints(workdir, async_save=False)
    try:
        step = (ckpt.best_step() if which == "best" else None) or ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        state = ckpt.read_state_numpy(step)
    finally:
        ckpt.close()
    num_classes = int(np.shape(jax.tree_util.tree_leaves(_classifier(state["params"]))[-1])[-1])
    model = VGG.from_config(config["model"], num_classes=num_classes, dtype="float32")
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
