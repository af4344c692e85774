"""`train_step` called directly on a tiny model: gradient accumulation, frozen features,
rematerialisation and half precision, each at the lowest level that shows it (no training program)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_harness

import vgg_flax
from vgg_flax.train import optim, steps

BATCH = 8


def _setup(*, batch_norm=False, dropout_rate=0.0, dtype=jnp.float32, freeze_features=False):
    model = vgg_flax.VGG(config=(8, "M", 16, "M"), batch_norm=batch_norm, head="small", small_head_width=16,
                         num_classes=3, dropout_rate=dropout_rate, dtype=dtype)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    tx = optim.make_optimizer(learning_rate=0.1, name="sgd", momentum=0.9, freeze_features=freeze_features)
    state = steps.create_state(model=model, tx=tx, variables=variables, rng=jax.random.key(1))
    images, labels = train_harness._examples(np.random.default_rng(0), BATCH)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels), "mask": jnp.ones(BATCH, bool)}
    return model, tx, state, batch


def _step(state, batch, **kw):
    return jax.jit(functools.partial(steps.train_step, **kw))(state, batch)


def _assert_close(a, b, rtol=2e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=2e-6)


def test_two_micro_batches_give_the_full_batch_step():
    """Without BatchNorm and dropout the mean of the micro-batches' gradients is the batch's."""
    model, tx, state, batch = _setup()
    one, m1 = _step(state, batch, model=model, tx=tx)
    two, m2 = _step(state, batch, model=model, tx=tx, grad_accum_steps=2)
    _assert_close(one.params, two.params)
    assert float(m1["train_loss"]) == pytest.approx(float(m2["train_loss"]), rel=1e-5)
    assert not np.allclose(one.params["conv1_1"]["kernel"], state.params["conv1_1"]["kernel"])


def test_frozen_features_train_the_head_only():
    """Conv kernels, biases and BatchNorm scales stay; running statistics still follow the data
    (train-mode forward passes update them, as configs/finetune.py says); the head moves."""
    model, tx, state, batch = _setup(batch_norm=True, freeze_features=True)
    new, _ = _step(state, batch, model=model, tx=tx)
    for name, leaves in new.params.items():
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(leaves),
                                                          jax.tree_util.tree_leaves(state.params[name]),
                                                          strict=True)]
        assert all(moved) if name.startswith("head") else not any(moved), name
    assert not np.array_equal(new.batch_stats["bn1_1"]["mean"], state.batch_stats["bn1_1"]["mean"])


def test_remat_is_the_same_step():
    model, tx, state, batch = _setup(batch_norm=True, dropout_rate=0.1)
    plain, _ = _step(state, batch, model=model, tx=tx)
    remat, _ = _step(state, batch, model=model, tx=tx, remat=True)
    _assert_close(plain.params, remat.params)
    _assert_close(plain.batch_stats, remat.batch_stats)


def test_half_precision_steps_keep_float32_parameters():
    """bfloat16 and float16 compute train with finite losses and float32 parameters; float16 is
    really float16: nearer float32's step than bfloat16 (3 more mantissa bits), not equal to it."""
    model, tx, state, batch = _setup(batch_norm=True)
    full, _ = _step(state, batch, model=model, tx=tx)
    error = {}
    for dtype in (jnp.bfloat16, jnp.float16):
        half_model = model.clone(dtype=dtype)
        half, metrics = _step(state, batch, model=half_model, tx=tx)
        assert np.isfinite(float(metrics["train_loss"]))
        assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(jnp.float32)}
        error[jnp.dtype(dtype).name] = np.sqrt(sum(
            np.sum((np.asarray(a) - np.asarray(b)) ** 2)
            for a, b in zip(jax.tree_util.tree_leaves(half.params), jax.tree_util.tree_leaves(full.params),
                            strict=True)))
    assert 0 < error["float16"] < error["bfloat16"] / 4, error
