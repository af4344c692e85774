"""The training room's own errors: what a user can cause and the CLI reports in one line.

They live here, apart from the modules that raise them, so that `vgg_flax.cli.errors` can name them
without importing the training loop (orbax, optax, the input pipeline) for every `vgg-flax` command.
"""


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required, or a workdir of another model."""


class WorkdirLockedError(RuntimeError):
    """Another training program owns the workdir."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the last checkpoint written is still good."""


USER_ERRORS = (CheckpointError, WorkdirLockedError, NonFiniteLossError)
