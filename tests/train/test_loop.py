"""The training loop in this process on tiny runs: its guards (NaN and Inf losses, bad configs,
another class count or architecture in the workdir, a damaged checkpoint), SIGINT, a user's optax
optimizer, and evaluation through `vgg_flax.evaluation`. Fresh-process runs (devices, processes,
kill -9, SIGTERM): test_loop_processes.py."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_harness
from train_harness import FakeDatasets, flat_params, tiny_config, train

import vgg_flax
from vgg_flax import parallel
from vgg_flax.train import checkpoints, optim, steps, warm_start
from vgg_flax.train import loop as training
from vgg_flax.train import workdir as workdir_lib

PLATEAU = {"schedule.name": "plateau", "schedule.patience": 1, "schedule.min_delta": 2.0}


def _inf_loss_at(step_number: int):
    """make_train_step whose metrics say the loss is +Inf at one step (parameters stay finite)."""
    real = steps.make_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) == step_number:
                metrics = {**metrics, "train_loss": jnp.float32(np.inf)}
            return state, metrics

        return wrapped

    return make


def test_inf_loss_stops_like_nan_naming_the_step(tmp_path, monkeypatch):
    """Metrics rows every 3 steps: the Inf of step 5 is found at step 6's flush, before step 6's
    checkpoint; the error names step 5, not the step it was noticed at, and step 4's checkpoint stays."""
    monkeypatch.setattr(steps, "make_train_step", _inf_loss_at(5))
    with pytest.raises(training.NonFiniteLossError) as err:
        train(tmp_path, **{"log.every_steps": 3})
    assert str(err.value) == "training loss is inf at step 5; the checkpoint of step 4 is intact"
    ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    try:
        assert ckpt.all_steps() == [2, 4]
        state = ckpt.read_state_numpy(4)
    finally:
        ckpt.close()
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


@pytest.mark.parametrize("process_count", [1, 3])
def test_training_evaluates_every_example_once_through_the_evaluator(process_count):
    """evaluate_run (the "center" protocol of vgg_flax.evaluation) on the fake eval split, whose 50
    examples do not fill the batches: its loss, top-1 and top-5 equal the model's logits over all 50,
    also when the split is shared by 3 processes (each share's rows, summed here by hand)."""
    import types

    import optax
    import train_harness

    from vgg_flax import evaluation, parallel

    config = tiny_config()
    model = vgg_flax.VGG.from_config(config.model.to_dict(), num_classes=3)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    images, labels = train_harness._examples(np.random.default_rng(12345), train_harness.EVAL_EXAMPLES)
    logits = model.apply(variables, images)
    expected = {"eval_loss": float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()),
                "eval_top1": float(np.mean(np.argmax(logits, -1) == labels)), "eval_top5": 1.0}
    evaluator = evaluation.Evaluator(model, image_size=32, mesh=parallel.create_mesh(),
                                     datasets=FakeDatasets())
    state = types.SimpleNamespace(params=variables["params"], batch_stats=variables["batch_stats"])
    if process_count == 1:
        data = types.SimpleNamespace(dataset="fake", eval_split="test", data_dir=None,
                                     normalization="symmetric")
        run = types.SimpleNamespace(data=data, evaluator=evaluator, eval=types.SimpleNamespace(batch_size=16))
        assert training.evaluate_run(run, state) == pytest.approx(expected, rel=1e-5)
    probs, got = [], []
    for index in range(process_count):
        p, lb = evaluator.posteriors(steps.variables(state), "fake", "test", protocol="center",
                                     batch_size=16, process_index=index, process_count=process_count)
        probs.append(p)
        got.append(lb)
    np.testing.assert_array_equal(np.concatenate(got), labels)
    assert evaluation.metrics(np.concatenate(probs), np.concatenate(got))["top1"] == expected["eval_top1"]


class _SignalAt(FakeDatasets):
    """Sends this process `signum` when the training batch of `step` is produced (in the prefetch
    thread: Python runs the handler in the main thread, inside the training loop)."""

    def __init__(self, signum: int, step: int):
        super().__init__()
        self.signum, self.step = signum, step

    def _train(self, batch_size, seed, start_step, pi, pc):
        for step, batch in enumerate(super()._train(batch_size, seed, start_step, pi, pc), start_step + 1):
            if step == self.step:
                os.kill(os.getpid(), self.signum)
            yield batch


def test_sigint_saves_and_stops_like_sigterm(tmp_path):
    """Ctrl-C in the training loop: the step reached is checkpointed, then `Interrupted` (signal 2;
    the entry point exits 130 with its one line, tests/cli/test_cli.py)."""
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(training.Interrupted) as stop:
        train(tmp_path, _SignalAt(signal.SIGINT, 3), **PLATEAU)
    assert stop.value.signum == signal.SIGINT and 1 <= stop.value.step < 6
    assert train_harness.latest_checkpoint(tmp_path) == stop.value.step
    assert max(r["step"] for r in workdir_lib.read_rows(str(tmp_path))) == stop.value.step
    assert signal.getsignal(signal.SIGINT) is handler  # the loop puts the handler back


def test_nan_loss_names_step_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(training.NonFiniteLossError, match="at step 5"):
        train(tmp_path, FakeDatasets(nan_at_step=5))
    ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    assert ckpt.latest_step() == 4
    state = ckpt.read_state_numpy(4)
    ckpt.close()
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


def _corrupt_step(workdir, step):
    step_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    """Step 6 damaged: step 4 (the previous, not an older one) is restored with the plateau rule's
    state, so the eval at step 6 makes the second reduction (scale 0.01, as in an unbroken run)."""
    kw = PLATEAU
    done = train(tmp_path / "a", **kw)
    expected = flat_params(done)
    train(tmp_path / "b", **kw)
    _corrupt_step(tmp_path / "b", 6)
    starts = tmp_path / "starts.txt"
    state = train(tmp_path / "b", FakeDatasets(log_path=str(starts)), **kw)  # restores 4, retrains 5 and 6
    assert train_harness.read_data_log(starts) == [4]
    final = flat_params(state)
    assert "step 6" in caplog.text and "unreadable" in caplog.text
    assert [d.split("-")[0] for d in os.listdir(tmp_path / "b" / "checkpoints_corrupt")] == ["6"]
    for k in expected:
        np.testing.assert_array_equal(final[k], expected[k], err_msg=k)
    scales = [float(optax.tree_utils.tree_get(s.opt_state, optim.LR_SCALE)) for s in (done, state)]
    assert scales[1] == scales[0] == pytest.approx(0.01)  # without the restored rule: 0.1 (one reduction)
    metas = []
    for d in "ab":  # the plateau rule's state came back too: 2 reductions (steps 3 and 6) in both
        ckpt = checkpoints.Checkpoints(str(tmp_path / d), async_save=False)
        metas.append(ckpt.read_meta(6)["plateau"])
        ckpt.close()
    assert metas[0] == metas[1] and metas[0]["reductions"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["learning_rate"] for r in rows if r["step"] in (3, 4) and "learning_rate" in r] == \
        pytest.approx([0.05, 0.005])  # min_delta 2: every eval "stalls", so the eval at 3 divided by 10
    model, variables = checkpoints.load_for_inference(str(tmp_path / "b"))
    np.testing.assert_array_equal(variables["params"]["head_out"]["kernel"],
                                  expected["params['head_out']['kernel']"])
    logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 3)


def test_bad_configs_fail_before_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(train_harness, "FakeDatasets", _OpenCounting)  # what `train` builds
    monkeypatch.setattr(_OpenCounting, "opened", [])
    with pytest.raises(KeyError, match="learning_rat"):
        tiny_config(**{"schedule.learning_rat": 0.1})  # the ConfigDict is locked: typos are errors
    with pytest.raises(KeyError, match="num_train_step"):
        tiny_config(num_train_step=3)
    with pytest.raises(KeyError, match="unknown optimizer"):
        train(tmp_path / "a", **{"optim.name": "adam_typo"})
    with pytest.raises(ValueError, match="does not divide over 8 devices"):
        parallel.check_batch_divides(global_batch_size=12, num_devices=8)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        train(tmp_path / "b", **{"step.grad_accum_steps": 3})
    with pytest.raises(ValueError, match="dataset 'no_such_data'"):
        train(tmp_path / "c", **{"data.dataset": "no_such_data"})
    with pytest.raises(KeyError, match="unknown schedule"):
        train(tmp_path / "d", **{"schedule.name": "cosin"})
    with pytest.raises(ValueError, match="config.eval.batch_size must be positive"):
        train(tmp_path / "e", **{"eval.batch_size": 0})
    with pytest.raises(ValueError, match="config.data.num_classes must be positive, got 0"):
        train(tmp_path / "i", **{"data.num_classes": 0})
    with pytest.raises(ValueError, match="config.checkpoints.keep must be positive"):
        train(tmp_path / "f", **{"checkpoints.keep": 0})
    with pytest.raises(ValueError, match="config.model.dtype must be one of"):
        train(tmp_path / "g", **{"model.dtype": "float64"})
    with pytest.raises(KeyError, match="no injected 'lr_scale'"):  # plateau with a plain optax optimizer
        train(tmp_path / "h", optimizer=optax.sgd(0.1), **{"schedule.name": "plateau"})
    for d in "abcdefghi":
        assert not os.path.exists(tmp_path / d / "checkpoints" / "2")
        assert not os.path.exists(tmp_path / d / "checkpoints"), d  # nothing created, not even empty
        assert not os.path.exists(tmp_path / d / "metrics.jsonl"), d
    assert _OpenCounting.opened == [], _OpenCounting.opened  # the dataset was never opened


class _OpenCounting(FakeDatasets):
    """Records every `create_dataset` call (shared by all instances: `train` builds a fresh one)."""

    opened: list = []

    def create_dataset(self, name, split, **kw):
        _OpenCounting.opened.append((name, split))
        return super().create_dataset(name, split, **kw)


def test_class_count_mismatch_is_one_clear_error(tmp_path):
    train(tmp_path / "a", num_train_steps=2)
    with pytest.raises(warm_start.WeightsMismatchError, match="3 classes but the run has 5"):
        train(tmp_path / "a", num_train_steps=4, **{"data.num_classes": 5})  # another class count
    # A net A workdir with 3 classes warm-starting a 5-class deeper net.
    with pytest.raises(warm_start.WeightsMismatchError, match="has 3 classes but the run has 5"):
        train(tmp_path / "b", warm_start_from=str(tmp_path / "a"), **{"data.num_classes": 5},
               **_fc_model("D"))


def test_another_architecture_is_one_clear_error_never_corrupt(tmp_path, caplog):
    """A workdir of one architecture resumed with another of the same class count: an error naming
    both, and the checkpoints left where they are (treated as "corrupt" they would be moved aside and
    the run would start over). 8,M,8,M and 8,8,M even have the same array shapes (conv2_1 vs conv1_2)."""
    train(tmp_path, num_train_steps=2, **{"model.config": "8,M,8,M"})
    with pytest.raises(checkpoints.CheckpointError, match=r"of model '8,M,8,M, BatchNorm, small head', "
                       r"this run's is '8,8,M, BatchNorm, small head'"):
        train(tmp_path, num_train_steps=4, **{"model.config": "8,8,M"})
    # Checkpoints saved without their model (older runs): the array names tell, still never "corrupt".
    ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    saved = ckpt.read_state_numpy(2)
    saved["params"]["conv1_2"] = saved["params"].pop("conv2_1")  # the same shapes, another name
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
    with pytest.raises(checkpoints.CheckpointError, match="this run has params/conv1_2/bias, they do not"):
        ckpt.restore_latest_good(abstract)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert not os.path.exists(tmp_path / "checkpoints_corrupt") and "unreadable" not in caplog.text
    vgg11 = {"config": "vgg11", "batch_norm": False, "head": "torchvision"}
    with pytest.raises(checkpoints.CheckpointError, match="of model 'vgg11, torchvision head', this "
                       "run's is 'vgg13, torchvision head'"):
        checkpoints.check_same_architecture(vgg11, {**vgg11, "config": "vgg13"}, "d")
    checkpoints.check_same_architecture(vgg11, {**vgg11, "config": "A"}, "d")  # vgg11 is A
    checkpoints.check_same_architecture(None, vgg11, "d")  # no model saved: the arrays decide


def _fc_model(letter: str) -> dict:
    """Tiny stand-ins for the paper's A and D (same layer names), torchvision head."""
    arch = {"A": "8,M,16,M,32,32,M", "D": "8,8,M,16,16,M,32,32,32,M"}[letter]
    return {"model.config": arch, "model.head": "torchvision", "model.fc_width": 16,
            "model.batch_norm": False}


def test_a_user_built_optax_optimizer_trains_through_the_loop(tmp_path):
    """optax's own adamw (rate injected, so it is logged) in place of config.optim/config.schedule."""
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
    state0 = train(tmp_path / "a", num_train_steps=1, **{"schedule.learning_rate": 0.0})
    state = train(tmp_path / "b", optimizer=tx, num_train_steps=3)
    assert isinstance(optax.tree_utils.tree_get(state.opt_state, "mu"), dict)  # Adam's first moment
    p0, p = jax.device_get(state0.params), jax.device_get(state.params)
    assert not np.array_equal(p["conv1_1"]["kernel"], p0["conv1_1"]["kernel"])
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["learning_rate"] for r in rows if "train_loss" in r] == pytest.approx([1e-3] * 3)


def test_float16_is_said_in_a_warning(tmp_path, caplog):
    """float16 has no loss scaling: the run says so (its numbers: test_steps.py)."""
    train(tmp_path, num_train_steps=1, **{"model.dtype": "float16", "eval.every_steps": 100})
    assert training.FLOAT16_WARNING in caplog.text
