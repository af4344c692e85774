"""Training curves: read metrics.jsonl (ignoring a torn last line) and write a real PNG."""

import json

import numpy as np
import pytest

from vgg_flax.train import plots, workdir


def _write(path, rows, torn=False):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if torn:
            f.write('{"step": 30, "train_lo')


def test_curves_png_from_metrics(tmp_path):
    rows = [{"step": s, "train_loss": 2.0 / s, "train_accuracy": 1 - 1 / s, "learning_rate": 0.1,
             "images_per_sec": 100.0} for s in (1, 10, 20)]
    rows.append({"step": 20, "eval_loss": 0.1, "eval_top1": 0.97, "eval_top5": 1.0})
    _write(tmp_path / "metrics.jsonl", rows, torn=True)
    rows = workdir.read_rows(str(tmp_path))
    train, evals = workdir.train_rows(rows), workdir.eval_rows(rows)
    assert [r["step"] for r in train] == [1, 10, 20] and evals[0]["eval_top1"] == 0.97
    out = plots.plot_metrics(str(tmp_path))
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert np.std(image) > 0.05  # curves and text were drawn, not a blank canvas


def test_empty_metrics_is_a_clear_error(tmp_path):
    _write(tmp_path / "metrics.jsonl", [])
    with pytest.raises(ValueError, match="no training or evaluation rows"):
        plots.plot_metrics(str(tmp_path))
