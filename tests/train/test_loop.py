"""The training loop's guards and options, in this process on tiny runs: frozen features train the
head only, and an Inf loss stops training like a NaN one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_harness import FakeDatasets, tiny_config

from vgg_flax.train import checkpoints, steps
from vgg_flax.train import loop as training

# tiny_config's model, "8,M,16,M" with BatchNorm and the small head, by name.
FEATURES = {"conv1_1", "bn1_1", "conv2_1", "bn2_1"}
HEAD = {"head_hidden", "head_out"}


def _train(workdir, datasets=None, **overrides):
    config = tiny_config(**overrides)
    return config, training.train_and_evaluate(config, str(workdir), datasets=datasets or FakeDatasets())


def test_freeze_features_trains_the_head_only(tmp_path):
    """Every conv kernel and bias and every BatchNorm scale and bias stays at its initial value; the
    BatchNorm running statistics still follow the data (train-mode forward passes update them, as
    configs/finetune.py says); every head parameter moves."""
    config, state = _train(tmp_path, num_train_steps=3, **{"optim.freeze_features": True})
    params, stats = jax.device_get(state.params), jax.device_get(state.batch_stats)
    model = checkpoints.model_from_config(config.model.to_dict(), num_classes=3)
    init = training.initial_variables(model, jax.random.split(jax.random.key(config.seed))[0], image_size=32)
    assert set(params) == FEATURES | HEAD and set(stats) == {"bn1_1", "bn2_1"}
    for name in FEATURES:
        for leaf, value in params[name].items():
            np.testing.assert_array_equal(value, init["params"][name][leaf], err_msg=f"{name} {leaf}")
    for name, layer in stats.items():
        assert set(layer) == {"mean", "var"}
        for leaf, value in layer.items():  # initial mean 0, var 1; three batches later: moved
            assert not np.allclose(value, init["batch_stats"][name][leaf], atol=1e-3), (name, leaf)
    for name in HEAD:
        assert set(params[name]) == {"kernel", "bias"}
        for leaf, value in params[name].items():
            assert np.abs(value - init["params"][name][leaf]).max() > 1e-4, (name, leaf)


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
        _train(tmp_path, **{"log.every_steps": 3})
    assert str(err.value) == "training loss is inf at step 5; the checkpoint of step 4 is intact"
    ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    try:
        assert ckpt.all_steps() == [2, 4]
        state = ckpt.read_state_numpy(4)
    finally:
        ckpt.close()
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))
