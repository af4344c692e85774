"""The run directory's one owner: metrics.jsonl parsed in one place, robust to the half-written
last line a kill leaves, which the console's summary, the plot and a resume all read through it."""

import json

from vgg_flax.train import console, workdir

ROWS = [{"step": 1, "train_loss": 2.5, "train_accuracy": 0.25, "images_per_sec": 10.0},
        {"step": 2, "eval_loss": 1.25, "eval_top1": 0.5, "eval_top5": 1.0},
        {"step": 3, "train_loss": 1.5, "train_accuracy": 0.5, "images_per_sec": 10.0}]


def _write(root, torn: str = '{"step": 4, "train_lo'):
    text = "".join(json.dumps(r) + "\n" for r in ROWS) + torn
    (root / workdir.METRICS_FILE).write_text(text)
    return text


def test_read_rows_skips_a_half_written_last_line(tmp_path):
    _write(tmp_path)
    assert workdir.read_rows(str(tmp_path)) == ROWS
    _write(tmp_path, torn='{"step": 4}')  # valid JSON, but its newline never came: not complete
    assert workdir.read_rows(str(tmp_path)) == ROWS
    assert workdir.eval_rows(ROWS) == ROWS[1:2] and workdir.train_rows(ROWS) == ROWS[::2]
    assert workdir.read_rows(str(tmp_path / "nowhere")) == []


def test_the_summary_reads_a_torn_file(tmp_path):
    _write(tmp_path)
    text = console.summary(str(tmp_path))
    assert "done      step 3, best eval top-1 0.5000 at step 2" in text
    assert str(tmp_path / workdir.CURVES_FILE) in text


def test_truncate_keeps_the_rows_up_to_the_step_byte_for_byte(tmp_path):
    text = _write(tmp_path)
    workdir.truncate_after(str(tmp_path), 2)
    assert (tmp_path / workdir.METRICS_FILE).read_text() == "".join(text.splitlines(keepends=True)[:2])
