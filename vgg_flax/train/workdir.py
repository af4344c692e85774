"""The layout of a training run's directory, and the one reader of each file in it.

    WORKDIR/config.json               the resolved config (`write_config`, `read_config`)
    WORKDIR/metrics.jsonl             one JSON row per line (`read_rows`; written by metrics_log)
    WORKDIR/checkpoints/              orbax checkpoints (vgg_flax.train.checkpoints)
    WORKDIR/checkpoints_corrupt/      checkpoints that failed to read, moved aside
    WORKDIR/train.lock                the running program's lock (vgg_flax.train.lock)
    WORKDIR/curves.png                `vgg-flax plot`'s default output
    WORKDIR/events.out.tfevents.*     TensorBoard events

metrics.jsonl rows: training {"step", "train_loss", "train_accuracy", "learning_rate",
"images_per_sec"}, evaluation {"step", "eval_loss", "eval_top1", "eval_top5"}. A program killed
mid-write leaves a half-written last line: every reader skips a line that is not JSON.
"""

from __future__ import annotations

import json
import os

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
LOCK_FILE = "train.lock"
CURVES_FILE = "curves.png"


class NotAWorkdirError(FileNotFoundError):
    """The directory has no config.json: no training run wrote it."""


def path(workdir: str, name: str) -> str:
    """WORKDIR/name for one of the names above."""
    return os.path.join(workdir, name)


def read_rows(workdir: str) -> list[dict]:
    """The complete rows of WORKDIR/metrics.jsonl in order ([] without the file); a line cut short
    by a kill is skipped."""
    return [row for _, row in _lines(workdir)]


def _lines(workdir: str) -> list[tuple[str, dict]]:
    """(line as written, row) of every complete line of metrics.jsonl: the one parser."""
    file, out = path(workdir, METRICS_FILE), []
    if not os.path.exists(file):
        return out
    with open(file, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(row, dict) and line.endswith("\n"):
                out.append((line, row))
    return out


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "train_loss" in r]


def eval_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval_top1" in r]


def truncate_after(workdir: str, step: int) -> None:
    """Keeps only the rows of metrics.jsonl with row["step"] <= step (and no half-written line), so
    a resumed run reads as one clean run. The caller is the one writing process."""
    if not os.path.exists(path(workdir, METRICS_FILE)):
        return
    kept = [line for line, row in _lines(workdir) if row.get("step", 0) <= step]
    tmp = path(workdir, METRICS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path(workdir, METRICS_FILE))


def write_config(workdir: str, config_dict: dict) -> None:
    """The resolved config as JSON, atomically (the caller is the one writing process)."""
    os.makedirs(workdir, exist_ok=True)
    tmp = path(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path(workdir, CONFIG_FILE))


def read_config(workdir: str) -> dict:
    """WORKDIR/config.json; NotAWorkdirError naming the file when there is none."""
    file = path(workdir, CONFIG_FILE)
    if not os.path.exists(file):
        raise NotAWorkdirError(f"{file} not found: {workdir!r} is not a vgg-flax training workdir")
    with open(file) as f:
        return json.load(f)
