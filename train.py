r"""Trains a VGG: parses flags and calls `vgg_flax.training.train_and_evaluate`, nothing more.

    python train.py --workdir /tmp/vgg_digits                         # configs/default.py
    python train.py --config configs/imagenet_vgg16.py --workdir DIR --config.global_batch_size=512
    python train.py --distributed ...                                  # one process per host

Re-running the same command resumes from the newest checkpoint in --workdir. `vgg-flax train` is
the same program.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (also on when JAX_COORDINATOR_ADDRESS is set).")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vgg_flax import training  # after flag parsing: importing JAX is slow

    training.initialize_distributed(FLAGS.distributed or "JAX_COORDINATOR_ADDRESS" in os.environ)
    logging.info("config:\n%s", FLAGS.config)
    try:
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except training.Interrupted as stop:
        logging.warning("%s", stop)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    app.run(main)
