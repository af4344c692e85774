r"""The training program's command line (absl flags + ml_collections config files).

`python train.py ...` and `vgg-flax train ...` both run `run()`: parse flags, quiet the console,
initialise jax.distributed when asked (`vgg_flax.parallel`), call `loop.train_and_evaluate(config,
workdir)`.

    python train.py --workdir /tmp/vgg_digits                       # the packaged `default` config
    python train.py --config imagenet_vgg16 --workdir DIR --config.global_batch_size=512
    python train.py --config path/to/my_config.py --workdir DIR     # any config file
    python train.py --distributed ...                                # one process per host

`--config` takes a name from vgg_flax.configs (the repository's configs/, shipped in the wheel) or a
path. Re-running the same command resumes from the newest checkpoint in --workdir. On SIGTERM/SIGINT
the run checkpoints the step it is at, says so in one line and exits with 128 + the signal number
(143, 130; a Ctrl-C before the first step or after the last save has nothing to save: one line,
130); with several processes all of them stop at one step, each saying so (143 on a process the
signal reached through another host). Processes other than 0 print errors only. A mistake (bad
config value, unknown dataset, a workdir another program is training in, a NaN loss) ends in one
line and exit status 2 (`--debug`: the traceback).
"""

from __future__ import annotations

import logging as py_logging
import os
import signal
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from vgg_flax import configs as packaged_configs
from vgg_flax import parallel
from vgg_flax.cli import errors
from vgg_flax.train import compilation_cache
from vgg_flax.train import loop as training

CONFIG_DIR = os.path.dirname(os.path.abspath(packaged_configs.__file__))
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
# TensorFlow prints C++ INFO notices at import, so these must be in the environment before the input
# pipeline imports it: the CPU-feature notice goes with the INFO level (warnings and errors still
# show); the "oneDNN custom operations are on" notice ignores the level and goes only with oneDNN's
# custom ops, which the input pipeline does not use (they fuse matmuls and convolutions).
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (also on when JAX_COORDINATOR_ADDRESS is set).")
flags.DEFINE_bool("verbose", False, "Show INFO logs (JAX, TensorFlow, orbax) and the resolved config.")
flags.DEFINE_bool("debug", False, "Show the traceback of a configuration or data error.")
flags.mark_flags_as_required(["workdir"])


def define_config_flag(argv: list[str]) -> None:
    """Defines --config once, with the --config.KEY=VALUE overrides of `argv`: ml_collections reads
    them from sys.argv when the flag is defined, so this runs in `run`, not at import. A
    --config.KEY that the config does not have is a KeyError naming it."""
    if "config" in FLAGS:
        return
    saved, sys.argv = sys.argv, list(argv)
    try:
        config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "default.py"),
                                        f"A config name ({', '.join(CONFIG_NAMES)}) or a config file path.",
                                        lock_config=True)
    except (AttributeError, KeyError) as err:
        raise KeyError(f"unknown config key: {err}") from err
    finally:
        sys.argv = saved


def config_path(value: str) -> str:
    """A `--config` value with a packaged config's name replaced by its file (":ARGS" kept)."""
    name, sep, rest = value.partition(":")
    if os.sep in name or name.endswith(".py") or os.path.exists(name):
        return value
    if name not in CONFIG_NAMES:
        raise app.UsageError(f"--config {value!r}: no config named {name!r} (valid: "
                             f"{', '.join(CONFIG_NAMES)}) and no such file")
    return os.path.join(CONFIG_DIR, f"{name}.py") + sep + rest


def resolve_config_names(argv: list[str]) -> list[str]:
    """argv with every `--config NAME` / `--config=NAME` turned into the packaged file's path."""
    out, args = [], iter(argv)
    for arg in args:
        if arg in ("--config", "-config"):
            out += [arg, config_path(next(args, ""))]
        elif arg.startswith(("--config=", "-config=")):
            flag, _, value = arg.partition("=")
            out.append(f"{flag}={config_path(value)}")
        else:
            out.append(arg)
    return out


def quiet_console(verbose: bool) -> None:
    """Warnings and errors only (the run prints its own header, progress and summary); all with --verbose."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger().setLevel(py_logging.WARNING)


def quiet_distributed(verbose: bool) -> None:
    """After `jax.distributed.initialize`: processes other than 0 show errors only (process 0
    prints the run's console for all), and the CPU collectives' connection line ("[Gloo] Rank N is
    connected to ...", printed by the C++ library on stdout) goes nowhere: its one connection is
    made here, on an all-device barrier, with file descriptor 1 on /dev/null."""
    if verbose or jax.process_count() == 1:
        return
    if jax.process_index() != 0:
        logging.set_verbosity(logging.ERROR)
        py_logging.getLogger().setLevel(py_logging.ERROR)
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        multihost_utils.sync_global_devices("vgg_flax_connect")
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _say(message: str) -> None:
    """`message` as a warning on every process, also where only errors show (`quiet_distributed`):
    each host's log names the step its run stopped at."""
    logging.set_verbosity(max(logging.get_verbosity(), logging.WARNING))
    logging.warning("%s", message)


def _train() -> int:
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    return 0


def exit_status(train: Callable[[], int], *, debug: bool = False) -> int:
    """`train()`'s exit status: 2 for a mistake (one line), 128 + the signal for a stop by SIGTERM
    or SIGINT (one line: the step saved)."""
    try:
        return errors.run_command("train", train, debug=debug)
    except training.Interrupted as stop:
        _say(str(stop))
        return 128 + stop.signum
    except KeyboardInterrupt:  # outside the training steps (setup, compilation, the final save's end)
        _say(f"stopped by signal {signal.SIGINT:d} outside the training steps: nothing unsaved")
        return 128 + signal.SIGINT


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_console(FLAGS.verbose)
    cache = compilation_cache.enable_compilation_cache()  # a restarted run loads its compiled steps from disk
    logging.info("compilation cache: %s", cache or "off")
    parallel.initialize_distributed(FLAGS.distributed or "JAX_COORDINATOR_ADDRESS" in os.environ)
    quiet_distributed(FLAGS.verbose)
    logging.info("config:\n%s", FLAGS.config)
    sys.exit(exit_status(_train, debug=FLAGS.debug))


def run(argv: list[str] | None = None) -> None:
    """Runs the program on `argv` (program name first; default sys.argv)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        argv = argv[:1] + resolve_config_names(argv[1:])
        define_config_flag(argv)
    except (app.UsageError, KeyError) as err:
        sys.exit(errors.report(os.path.basename(argv[0]), err))
    app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a bad flag or config value (`--config.num_train_steps=ten`) as one
    line and exit status 2, like every other mistake (absl prints two lines and exits 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        sys.exit(errors.report(os.path.basename(argv[0]), err))
