"""Test harness for the training program: a tiny in-memory dataset and a subprocess entry point.

The fake dataset follows `vgg_flax.data.pipeline`'s contract (a pure function of (seed, step),
each process reading its contiguous rows of the global batch) so multi-device and multi-process runs
can be compared with one-device runs on exactly the same global batches. Run as a script it trains
one config in a fresh process (so XLA_FLAGS / jax.distributed can be set before JAX starts) and
saves the final parameters to an .npz file:

    python tests/train/train_harness.py WORKDIR OUT.npz '{"num_train_steps": 6, "schedule.name": "plateau"}' \
        [--nan-at 3] [--sleep 0.1] [--stall-at 6] [--data-log PATH] [--entry]

--stall-at N holds back the batch of step N (10 minutes): the run stops after step N-1, to be killed.

--data-log appends the `start_step` the training split is opened at to PATH (one line per opening:
a resumed run asks for its checkpoint's step, a run starting over for 0). --entry runs the training
program's own entry point (`vgg_flax.cli.train_app.run`, what train.py calls: its console, signal
exit statuses and one-line errors) with this file as the config file (`get_config`) and the
overrides as --config.KEY=VALUE flags, the fake datasets in place of the input pipeline; it saves
no .npz.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 32
EVAL_EXAMPLES = 50  # not a multiple of the eval batch: the padded, masked tail is exercised


def load_config_module(name: str):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides):
    """configs/default.py with a tiny BatchNorm VGG and few steps; keys checked by the lock."""
    config = load_config_module("default").get_config()
    config.model.config = "8,M,16,M"
    config.model.small_head_width = 16
    config.model.dropout_rate = 0.1
    config.data.dataset = "fake"
    config.global_batch_size = 8
    config.eval.batch_size = 16
    config.num_train_steps = 6
    config.eval.every_steps = 3
    config.checkpoints.every_steps = 2
    config.log.every_steps = 1
    config.schedule.warmup_steps = 0
    config.schedule.learning_rate = 0.05
    config.log.tensorboard = False
    config.log.progress = "none"
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    return config


@dataclasses.dataclass
class FakeInfo:
    num_classes: int = 3

    def num_examples(self, split: str) -> int:
        if split not in ("train", "test"):
            raise ValueError(f"no split {split!r}")
        return {"train": 10**6, "test": EVAL_EXAMPLES}[split]


def _examples(rng: np.random.Generator, n: int):
    """Images whose class is the brightest third of the image: learnable in a few steps."""
    images = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    for c in range(3):
        images[labels == c, :, c * 10:(c + 1) * 10] += 1.0
    return images, labels


def get_config():
    """The config file protocol of ml_collections (`--entry` passes this file as --config)."""
    return tiny_config()


class FakeDatasets:
    """`create_dataset` / `dataset_info` over generated data; optional NaN and slowness.

    stall_at_step: the batch of that step is held back for 10 minutes (a run to be killed there).
    log_path: a file to which each opening of the training split appends its `start_step`.
    """

    def __init__(self, nan_at_step: int = -1, sleep: float = 0.0, log_path: str | None = None,
                 stall_at_step: int = -1):
        self.nan_at_step, self.sleep, self.log_path = nan_at_step, sleep, log_path
        self.stall_at_step = stall_at_step

    def dataset_info(self, name, data_dir=None):
        if name != "fake":
            raise ValueError(f"dataset {name!r} not found")
        return FakeInfo()

    def create_dataset(self, name, split, *, batch_size, train, image_size, seed=0, start_step=0,
                       process_index=0, process_count=1, **_):
        assert image_size == SIZE
        if train and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"{start_step}\n")
        if train:
            return self._train(batch_size, seed, start_step, process_index, process_count)
        return self._eval(batch_size, process_index, process_count)

    def _train(self, batch_size, seed, start_step, pi, pc):
        step = start_step
        while True:
            images, labels = _examples(np.random.default_rng([seed, step]), batch_size * pc)
            rows = slice(pi * batch_size, (pi + 1) * batch_size)
            images, labels = images[rows], labels[rows]
            if step + 1 == self.nan_at_step:  # the batch of the update that produces step nan_at_step
                images[:] = np.nan
            if self.sleep:
                time.sleep(self.sleep)
            if step + 1 == self.stall_at_step:
                time.sleep(600)
            yield {"image": images, "label": labels, "mask": np.ones(batch_size, bool)}
            step += 1

    def _eval(self, batch_size, pi, pc):
        """The pipeline's evaluation contract: this process's contiguous even share, the last batch
        padded (mask False), then all-masked batches up to the largest share's batch count."""
        from vgg_flax.data.sources import even_shares

        images, labels = _examples(np.random.default_rng(12345), EVAL_EXAMPLES)
        shares = even_shares(EVAL_EXAMPLES, pc)
        rows = slice(sum(shares[:pi]), sum(shares[:pi + 1]))
        images, labels = images[rows], labels[rows]
        for b in range(-(-max(shares) // batch_size)):
            im, lb = images[b * batch_size:(b + 1) * batch_size], labels[b * batch_size:(b + 1) * batch_size]
            pad = batch_size - len(lb)
            yield {"image": np.pad(im, [(0, pad), (0, 0), (0, 0), (0, 0)]),
                   "label": np.pad(lb, (0, pad)), "mask": np.arange(batch_size) < len(lb)}


def train(workdir, datasets=None, optimizer=None, **overrides):
    """`train_and_evaluate` of `tiny_config(**overrides)` in this process, on FakeDatasets by default."""
    from vgg_flax.train import loop as training

    return training.train_and_evaluate(tiny_config(**overrides), str(workdir),
                                       datasets=datasets or FakeDatasets(), optimizer=optimizer)


def flat_params(state) -> dict[str, np.ndarray]:
    """{"params/conv1_1/kernel": array, "batch_stats/...": ...} of a TrainState, as numpy."""
    import jax

    out = {}
    for prefix, tree in (("params", state.params), ("batch_stats", state.batch_stats)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def latest_checkpoint(workdir) -> int | None:
    """The newest step saved in `workdir`'s checkpoints (None without any)."""
    from vgg_flax.train import checkpoints

    saved = checkpoints.Checkpoints(str(workdir), async_save=False)
    try:
        return saved.latest_step()
    finally:
        saved.close()


def read_data_log(path) -> list[int]:
    """The start steps a `--data-log` file recorded, in order ([] when the split was never opened)."""
    return [int(line) for line in open(path)] if os.path.exists(path) else []


def main(argv: list[str]) -> int:
    workdir, out_path, overrides = argv[0], argv[1], json.loads(argv[2])
    option = {k: argv[argv.index(k) + 1] for k in ("--nan-at", "--sleep", "--stall-at", "--data-log")
              if k in argv}
    datasets = FakeDatasets(nan_at_step=int(option.get("--nan-at", -1)),
                            sleep=float(option.get("--sleep", 0.0)), log_path=option.get("--data-log"),
                            stall_at_step=int(option.get("--stall-at", -1)))
    from vgg_flax import parallel
    from vgg_flax.train import loop as training

    if "--entry" in argv:
        training.input_pipeline = datasets  # what train_and_evaluate reads when given no datasets
        flags = [f"--config.{key}={value}" for key, value in overrides.items()]
        sys.argv = ["train.py", "--workdir", workdir, "--config", os.path.abspath(__file__), *flags]
        from vgg_flax.cli import train_app

        train_app.run(sys.argv)
    parallel.initialize_distributed("JAX_COORDINATOR_ADDRESS" in os.environ)
    state = training.train_and_evaluate(tiny_config(**overrides), workdir, datasets=datasets)
    import jax

    if jax.process_index() == 0:
        np.savez(out_path, **flat_params(state))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))
