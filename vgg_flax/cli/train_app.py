r"""The training program's command line (absl flags + ml_collections config files).

`python train.py ...` and `vgg-flax train ...` both run `run()`: parse flags, initialise
jax.distributed when asked (`vgg_flax.parallel`), call `loop.train_and_evaluate(config, workdir)`.
Nothing else.

    python train.py --workdir /tmp/vgg_digits                         # configs/default.py
    python train.py --config configs/imagenet_vgg16.py --workdir DIR --config.global_batch_size=512
    python train.py --distributed ...                                  # one process per host

Re-running the same command resumes from the newest checkpoint in --workdir. On SIGTERM/SIGINT the
run checkpoints and exits with 128 + the signal number.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# configs/ lives beside the package in the repository (an editable install); config files import
# each other as the `configs` package, so the repository root must be importable (it is for
# `python train.py`, not for the `vgg-flax` entry point).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")
if os.path.isdir(os.path.join(REPO_ROOT, "configs")) and REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (also on when JAX_COORDINATOR_ADDRESS is set).")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def _quiet_orbax(record) -> bool:
    """Drops orbax's and TFDS's INFO chatter (lines per save and per eval); warnings stay."""
    noisy = "/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    from vgg_flax import parallel, perf
    from vgg_flax.train import loop as training  # after flag parsing: importing JAX is slow

    cache = perf.enable_compilation_cache()  # a restarted run loads its compiled steps from disk
    logging.info("compilation cache: %s", cache or "off")
    parallel.initialize_distributed(FLAGS.distributed or "JAX_COORDINATOR_ADDRESS" in os.environ)
    logging.info("config:\n%s", FLAGS.config)
    try:
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except training.Interrupted as stop:
        logging.warning("%s", stop)
        sys.exit(128 + stop.signum)


def run(argv: list[str] | None = None) -> None:
    """Runs the program on `argv` (program name first; default sys.argv)."""
    app.run(main, argv=argv)
