"""Training curves from a workdir's metrics.jsonl, as a PNG people can look at.

Reads only the JSON lines the training loop writes (train rows: step, train_loss, train_accuracy;
eval rows: step, eval_loss, eval_top1, eval_top5), so it works on a finished run, a running one, or a
copy of the file. matplotlib is imported inside `plot_metrics` (the `train` extra installs it).
"""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a metrics.jsonl; a half-written last line is ignored."""
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train_loss" in row:
                train.append(row)
            elif "eval_top1" in row:
                evals.append(row)
    return train, evals


def plot_metrics(workdir: str, out: str | None = None) -> str:
    """Writes loss and accuracy curves of `workdir/metrics.jsonl` to `out` (default workdir/curves.png).

    Returns the path written. Raises FileNotFoundError / ValueError for a workdir without metrics.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, "metrics.jsonl")
    train, evals = read_metrics(path)
    if not train and not evals:
        raise ValueError(f"{path} holds no training or evaluation rows")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["train_loss"] for r in train], label="train loss")
        ax_acc.plot(steps, [100 * r["train_accuracy"] for r in train], label="train top-1")
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["eval_loss"] for r in evals], "o-", label="eval loss")
        ax_acc.plot(steps, [100 * r["eval_top1"] for r in evals], "o-", label="eval top-1")
        ax_acc.plot(steps, [100 * r["eval_top5"] for r in evals], "s--", label="eval top-5")
        last = evals[-1]
        ax_acc.set_title(f"eval top-1 {100 * last['eval_top1']:.2f}% at step {last['step']}")
    ax_loss.set_yscale("log")
    for ax, ylabel in ((ax_loss, "loss (log)"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = out or os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
