"""The optax chains of vgg_flax.train.optim: each equals optax's own optimizer over several steps,
the learning rate (schedule x plateau scale) lives in the optimizer state, and any optax optimizer
trains through the real train step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vgg_flax
from vgg_flax import parallel
from vgg_flax.train import optim, steps

X = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4)), jnp.float32)
PARAMS = {"k": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.ones(2)}
SCHEDULE = optax.cosine_decay_schedule(0.1, 10)


def _data_loss(p):
    return jnp.sum((p["k"] @ X + p["b"][:, None] - Y) ** 2)


def _trajectory(tx, loss, n=3):
    """The parameters after each of n steps of `tx` on the gradients of `loss`."""
    params, state, out = PARAMS, tx.init(PARAMS), []
    for _ in range(n):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def _assert_same(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_sgd_decay_before_momentum_is_optax_sgd_on_the_penalised_loss():
    """The paper's L2 penalty: wd/2 ||kernels||^2 in the loss, biases not decayed; 3 steps."""
    wd = 0.05  # large enough that decay after the momentum trace would be off by far more than rtol
    ours = _trajectory(optim.make_optimizer(learning_rate=SCHEDULE, name="sgd", momentum=0.9,
                                            weight_decay=wd), _data_loss)
    penalised = lambda p: _data_loss(p) + wd / 2 * jnp.sum(p["k"] ** 2)
    _assert_same(ours, _trajectory(optax.sgd(SCHEDULE, momentum=0.9), penalised))
    assert not np.allclose(ours[-1]["k"], _trajectory(optax.sgd(SCHEDULE, momentum=0.9), _data_loss)[-1]["k"])


def test_adamw_is_optax_adamw_with_kernel_mask():
    kw = dict(b1=0.8, b2=0.99, eps=1e-6)
    ours = _trajectory(optim.make_optimizer(learning_rate=SCHEDULE, name="adamw", weight_decay=0.1, **kw),
                       _data_loss)
    ref = optax.adamw(SCHEDULE, weight_decay=0.1, mask=optim.kernel_mask, **kw)
    _assert_same(ours, _trajectory(ref, _data_loss))


def test_grad_clipping_comes_first():
    assert float(optax.tree.norm(jax.grad(_data_loss)(PARAMS))) > 1.0  # the clip is active
    ours = _trajectory(optim.make_optimizer(learning_rate=0.1, name="sgd", momentum=0.9, grad_clip_norm=1.0),
                       _data_loss)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    _assert_same(ours, _trajectory(ref, _data_loss))


def test_sgd_nesterov_is_optax_sgd_nesterov():
    """optim.nesterov reaches the momentum trace: 3 steps equal optax's Nesterov SGD, not plain momentum."""
    ours = _trajectory(optim.make_optimizer(learning_rate=SCHEDULE, name="sgd", momentum=0.9, nesterov=True),
                       _data_loss)
    _assert_same(ours, _trajectory(optax.sgd(SCHEDULE, momentum=0.9, nesterov=True), _data_loss))
    plain = _trajectory(optax.sgd(SCHEDULE, momentum=0.9), _data_loss)
    assert not np.allclose(ours[-1]["k"], plain[-1]["k"], rtol=1e-3)


def test_frozen_features_get_zero_updates_and_the_head_trains_as_unfrozen():
    """Over 3 steps (momentum and weight decay on): every leaf of every conv and BatchNorm layer gets a
    zero update; every head leaf gets exactly the update it would get unfrozen."""
    shapes = {"conv1_1": {"kernel": (3, 3, 1, 2), "bias": (2,)}, "bn1_1": {"scale": (2,), "bias": (2,)},
              "conv2_1": {"kernel": (3, 3, 2, 2), "bias": (2,)}, "bn2_1": {"scale": (2,), "bias": (2,)},
              "fc1": {"kernel": (8, 2), "bias": (2,)}, "head_out": {"kernel": (2, 3), "bias": (3,)}}
    rng = np.random.default_rng(2)
    params = {n: {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in layer.items()}
              for n, layer in shapes.items()}
    grads = [jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(3)]
    kw = dict(learning_rate=0.1, name="sgd", momentum=0.9, weight_decay=1e-2)
    runs = {}
    for freeze in (True, False):
        tx = optim.make_optimizer(freeze_features=freeze, **kw)
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        runs[freeze] = p
    assert float(optim.learning_rate(state)) == pytest.approx(0.1)
    for name, layer in shapes.items():
        for leaf in layer:
            frozen, plain, start = runs[True][name][leaf], runs[False][name][leaf], params[name][leaf]
            if name[:2] in ("co", "bn"):
                np.testing.assert_array_equal(frozen, start, err_msg=f"{name} {leaf}")
            else:
                np.testing.assert_array_equal(frozen, plain, err_msg=f"{name} {leaf}")
                assert np.abs(np.asarray(frozen) - np.asarray(start)).min() > 0, (name, leaf)


def _tiny_step(tx):
    """(jitted train step, a fresh-state factory, one batch) for a tiny BN-free, dropout-free VGG."""
    model = vgg_flax.VGG(config=(4, "M"), head="small", small_head_width=0, num_classes=3, dropout_rate=0.0)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32),
             "label": jnp.asarray([0, 1, 2, 0]), "mask": jnp.ones(4, bool)}
    variables = model.init(jax.random.key(0), batch["image"])
    new = lambda: steps.create_state(model=model, tx=tx, rng=jax.random.key(1),
                                     variables=jax.tree_util.tree_map(jnp.copy, variables))
    mesh = parallel.create_mesh()
    shardings = steps.state_sharding_like(new(), mesh)
    fresh = lambda: jax.device_put(new(), shardings)  # placed as the training loop places it
    step = steps.make_train_step(mesh, shardings, model=model, tx=tx)
    return step, fresh, batch, variables["params"]


def test_plateau_scale_is_applied_logged_and_needs_no_recompile():
    tx = optim.make_optimizer(learning_rate=0.2, name="sgd", momentum=0.0)
    step, fresh, batch, p0 = _tiny_step(tx)
    full, m_full = step(fresh(), batch)
    state = fresh()
    half, m_half = step(state.replace(opt_state=optim.set_lr_scale(state.opt_state, 0.5)), batch)
    assert step._cache_size() == 1  # a new scale is a new value, not a new program
    assert float(m_full["learning_rate"]) == pytest.approx(0.2)
    assert float(m_half["learning_rate"]) == pytest.approx(0.1)
    for name in p0:
        delta_full = np.asarray(full.params[name]["kernel"]) - np.asarray(p0[name]["kernel"])
        delta_half = np.asarray(half.params[name]["kernel"]) - np.asarray(p0[name]["kernel"])
        ulps = 4 * np.spacing(np.abs(np.asarray(p0[name]["kernel"])).max())  # of the float32 difference
        assert np.abs(delta_full).max() > 100 * ulps
        np.testing.assert_allclose(delta_half, 0.5 * delta_full, rtol=1e-4, atol=ulps, err_msg=name)


def test_the_logged_rate_is_the_one_used_and_any_optax_optimizer_drops_in():
    """Our chain with a cosine schedule == optax.sgd(schedule) through the real train step; the row's
    learning_rate is the schedule at that step; optax.lion trains without an injected rate."""
    ours_step, ours_fresh, batch, _ = _tiny_step(optim.make_optimizer(learning_rate=SCHEDULE, name="sgd"))
    ref_step, ref_fresh, _, p0 = _tiny_step(optax.sgd(SCHEDULE, momentum=0.9))
    ours, ref = ours_fresh(), ref_fresh()
    for t in range(3):
        ours, metrics = ours_step(ours, batch)
        ref, ref_metrics = ref_step(ref, batch)
        assert float(metrics["learning_rate"]) == pytest.approx(float(SCHEDULE(t)))
        assert "learning_rate" not in ref_metrics
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(ours.params), leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    lion_step, lion_fresh, _, _ = _tiny_step(optax.lion(1e-2))
    state, losses = lion_fresh(), []
    for _ in range(5):
        state, metrics = lion_step(state, batch)
        losses.append(float(metrics["train_loss"]))
    assert losses[-1] < losses[0]
    assert not np.array_equal(state.params["conv1_1"]["kernel"], p0["conv1_1"]["kernel"])


def test_set_lr_scale_needs_an_injected_scale():
    with pytest.raises(KeyError, match="no injected 'lr_scale'"):
        optim.set_lr_scale(optax.sgd(0.1).init(PARAMS), 0.1)
    assert optim.learning_rate(optax.sgd(0.1).init(PARAMS)) is None


def test_a_new_optimizer_is_one_row_of_the_table(monkeypatch):
    """A toy row (optax's lion) trains like optax.lion; an unknown name lists the rows."""
    monkeypatch.setitem(optim.OPTIMIZERS, "lion", lambda decay, b1, b2, **_: [optax.scale_by_lion(b1, b2)])
    ours = optim.make_optimizer(learning_rate=SCHEDULE, name="lion", b1=0.9, b2=0.99)
    ref = optax.lion(SCHEDULE, b1=0.9, b2=0.99, weight_decay=0.0)
    _assert_same(_trajectory(ours, _data_loss), _trajectory(ref, _data_loss))
    with pytest.raises(KeyError, match="'lamb'.*valid: \\['adamw', 'lion', 'sgd'\\]"):
        optim.direction(name="lamb")


def test_plateau_divides_by_ten_after_patience_and_at_most_max_times():
    p = optim.Plateau(patience=2, max_reductions=2)
    history = [p.update(a) for a in [0.5, 0.6, 0.6, 0.59, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]]
    assert history == [False, False, False, True, False, False, True, False, False, False, False]
    assert p.scale == pytest.approx(0.01) and p.reductions == 2
    p.update(np.float32(0.5))  # numpy scalars (what evaluation returns) keep the state JSON-able
    json.dumps(p.state_dict())
    q = optim.Plateau()
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedules(name):
    s, plateau = optim.make_schedule(name=name, learning_rate=1.0, num_steps=100, warmup_steps=10,
                                     boundaries=(50,))
    assert (plateau is not None) == (name == "plateau")
    steps = (0, 5, 10, 40, 60, 100)
    lr = [float(s(jnp.asarray(t))) for t in steps]
    assert lr[:3] == [0.0, pytest.approx(0.5), pytest.approx(1.0)]  # linear warmup over 10 steps
    # After the warmup, by hand: cosine 0.5 * (1 + cos(pi * (t - 10) / 90)) down to 0 at step 100;
    # "step" x0.1 from its boundary at 50; the flat ones stay at 1 (the plateau acts via lr_scale).
    cosine = [0.5 * (1 + np.cos(np.pi * (t - 10) / 90)) for t in steps[3:]]
    expected = {"constant": [1.0] * 3, "plateau": [1.0] * 3, "step": [1.0, 0.1, 0.1],
                "cosine": cosine}[name]
    np.testing.assert_allclose(lr[3:], expected, rtol=1e-6, atol=1e-7)
