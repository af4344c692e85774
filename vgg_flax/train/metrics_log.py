"""Where a run's numbers go: metrics.jsonl, TensorBoard events and a progress display.

Only process 0 writes. `metrics.jsonl` holds one JSON object per line (its rows:
`vgg_flax.train.workdir`). On resume, rows after the restored step (written by
the interrupted run and about to be recomputed) are dropped so the file reads as one clean run.
TensorFlow is imported only when TensorBoard logging is on and the first scalar is written.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from vgg_flax.train import workdir as workdir_lib


class MetricsLogger:
    """Appends rows to metrics.jsonl and (optionally) TensorBoard; shows progress.

    Args:
      workdir: the run directory.
      total_steps: for the progress bar's ETA.
      start_step: where this (possibly resumed) run starts.
      tensorboard: also write TensorBoard event files to the workdir.
      progress: "auto" (a tqdm bar on a terminal, plain lines otherwise), "bar", "lines" or "none".
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: str = "auto"):
        self.enabled = jax.process_index() == 0
        self.path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
        self.workdir, self.tensorboard, self.total = workdir, tensorboard, total_steps
        self._writer = None
        self._bar = None
        self._shown: dict[str, str] = {}  # the bar's latest training and eval numbers
        self._t0, self._step0 = time.time(), start_step
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        workdir_lib.truncate_after(workdir, start_step)
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        if progress == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.progress = progress

    def write(self, row: dict) -> None:
        """One row ({"step": int, name: float, ...}) to every sink."""
        if not self.enabled:
            return
        row = {"step": int(row["step"]), **{k: float(v) for k, v in row.items() if k != "step"}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard:
            self._tb_scalars(row)
        self._show(row)

    def _tb_scalars(self, row: dict) -> None:
        """Scalar events as raw Summary protos: needs TensorFlow only, not the tensorboard package
        (tensorflow-cpu does not install it, and `tf.summary.scalar` refuses to work without it)."""
        import tensorflow as tf  # lazily: TensorFlow is slow to import
        from tensorflow.core.framework import summary_pb2

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.workdir)
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in row.items() if k != "step"]
        with self._writer.as_default():
            tf.summary.experimental.write_raw_pb(summary_pb2.Summary(value=values).SerializeToString(),
                                                 step=row["step"])
        self._writer.flush()

    def _show(self, row: dict) -> None:
        step = row["step"]
        if "eval_top1" in row and self.progress != "none":  # evaluations stay on screen as lines
            line = (f"eval step {step}: top-1 {row['eval_top1']:.4f}  top-5 {row['eval_top5']:.4f}  "
                    f"loss {row['eval_loss']:.4g}")
            if self._bar is None:
                print(line, flush=True)
            else:
                self._bar.write(line)
        if self._bar is not None:
            self._bar.n = step
            self._shown.update({k: f"{v:.4g}" for k, v in row.items()
                                if k in ("train_loss", "train_accuracy", "images_per_sec", "eval_top1")})
            self._bar.set_postfix(self._shown, refresh=True)
        elif self.progress == "lines" and "eval_top1" not in row:
            done = max(step - self._step0, 1)
            eta = (time.time() - self._t0) / done * max(self.total - step, 0)
            text = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step")
            print(f"step {step}/{self.total} {text} eta={eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
