"""metrics.jsonl rows, TensorBoard scalars and the truncation of a resumed run's rows."""

import json
import os

import pytest


def test_metrics_log_rows_tensorboard_and_resume_truncation(tmp_path):
    from vgg_flax.train import metrics_log

    log = metrics_log.MetricsLogger(str(tmp_path), total_steps=4, tensorboard=True, progress="lines")
    for step in (1, 2, 3):
        log.write({"step": step, "train_loss": 1.0 / step, "train_accuracy": 0.5, "learning_rate": 0.1,
                   "images_per_sec": 10.0})
    log.write({"step": 3, "eval_loss": 0.5, "eval_top1": 0.75, "eval_top5": 1.0})
    log.close()
    import tensorflow as tf

    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    scalars = {(e.step, v.tag): v.simple_value for f in events
               for e in tf.compat.v1.train.summary_iterator(str(tmp_path / f)) for v in e.summary.value}
    assert scalars[(2, "train_loss")] == pytest.approx(0.5) and scalars[(3, "eval_top1")] == 0.75
    metrics_log.MetricsLogger(str(tmp_path), total_steps=4, start_step=2, tensorboard=False,
                              progress="none").close()  # a run resumed from step 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
