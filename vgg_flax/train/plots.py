"""Training curves from a workdir's metrics.jsonl, as a PNG people can look at.

Reads metrics.jsonl through `vgg_flax.train.workdir.read_rows`, so it works on a finished run, a
running one (a half-written last line is skipped), or a copy of the file. matplotlib is imported
inside `plot_metrics` (the `train` extra installs it).
"""

from __future__ import annotations

import os

from vgg_flax.train import workdir as workdir_lib


def plot_metrics(workdir: str, out: str | None = None) -> str:
    """Writes loss and accuracy curves of `workdir/metrics.jsonl` to `out` (default workdir/curves.png).

    Returns the path written. Raises FileNotFoundError / ValueError for a workdir without metrics.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = workdir_lib.read_rows(workdir)
    train, evals = workdir_lib.train_rows(rows), workdir_lib.eval_rows(rows)
    if not train and not evals:
        path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {workdir!r} has no training metrics")
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
    out = out or workdir_lib.path(workdir, workdir_lib.CURVES_FILE)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
