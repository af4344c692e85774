"""vgg_flax.nnx: the same numbers, names and training step as the linen module it wraps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

import vgg_flax
import vgg_flax.nnx as vnnx

SMALL = dict(num_classes=5, head="small", small_head_width=8, conv_impl="xla")


def _bn_model(**kwargs):
    """A linen VGG11-BN with random weights and non-trivial running statistics."""
    model = vgg_flax.vgg11_bn(**{**SMALL, **kwargs})
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    stats = jax.tree.map(lambda a: jax.random.uniform(next(keys), a.shape, minval=0.5, maxval=2.0),
                         variables["batch_stats"])
    stats = {k: {"mean": v["mean"] - 1.0, "var": v["var"]} for k, v in stats.items()}
    return model, {"params": variables["params"], "batch_stats": stats}


def _images(n=4, seed=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 32, 32, 3)), jnp.float32)


def test_logits_equal_linen_for_converted_weights():
    torchvision = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torchvision.models.vgg11_bn(num_classes=7)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model, variables = vgg_flax.load_torchvision(net.state_dict(), conv_impl="xla")
    m = vnnx.from_variables(model, variables)
    x = _images(2)
    want = model.apply(variables, x)
    np.testing.assert_array_equal(m(x), want)
    np.testing.assert_array_equal(jax.jit(lambda v, a: model.apply(v, a))(variables, x),
                                  nnx.jit(lambda mod, a: mod(a))(m, x))
    ref = net.eval()(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())).detach().numpy()
    assert np.abs(np.asarray(m(x)) - ref).max() / np.abs(ref).max() <= 1e-5


def test_state_names_are_the_converter_contract_and_attributes_read_the_same():
    model, variables = _bn_model()
    m = vnnx.from_variables(model, variables)
    for collection, var_type in vnnx.COLLECTIONS.items():
        want = set(flatten_dict(variables[collection]))
        got = {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(m, var_type))}
        assert got == want
    assert isinstance(m.conv1_1["kernel"], nnx.Param)
    assert isinstance(m.bn1_1["mean"], nnx.BatchStat) and isinstance(m.bn1_1["scale"], nnx.Param)
    np.testing.assert_array_equal(m.conv1_1["kernel"][...], variables["params"]["conv1_1"]["kernel"])
    np.testing.assert_array_equal(m.bn3_1["var"][...], variables["batch_stats"]["bn3_1"]["var"])
    assert m.tap_names() == model.tap_names()


def test_round_trip_to_linen_variables_is_exact():
    model, variables = _bn_model()
    back = vnnx.to_variables(vnnx.from_variables(model, variables))
    flat_in, flat_out = flatten_dict(variables), flatten_dict(back)
    assert set(flat_in) == set(flat_out)
    for k, v in flat_in.items():
        assert flat_out[k].dtype == v.dtype
        np.testing.assert_array_equal(flat_out[k], v)


def test_taps_as_in_linen():
    model, variables = _bn_model()
    m = vnnx.from_variables(model, variables)
    taps = ("relu1_1", "stage2", "pre_logits")
    x = _images(2)
    out, feats = m(x, taps=taps)
    want_out, want = model.apply(variables, x, taps=taps)
    np.testing.assert_array_equal(out, want_out)
    assert set(feats) == set(taps)
    for t in taps:
        np.testing.assert_array_equal(feats[t], want[t])
    with pytest.raises(KeyError, match="unknown taps"):
        m(x, taps=("relu9_9",))


def _linen_step(model, variables, x, y, tx):
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    u, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    return loss, {"params": optax.apply_updates(variables["params"], u), **updates}


@nnx.jit
def _nnx_step(m, optimizer, x, y):
    def loss_fn(mod):
        return optax.softmax_cross_entropy_with_integer_labels(mod(x, train=True), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(m)
    optimizer.update(m, grads)
    return loss


def test_one_optimizer_step_equals_the_linen_step():
    model, variables = _bn_model(dropout_rate=0.0)
    x, y = _images(4), jnp.arange(4) % 5
    tx = optax.sgd(0.5, momentum=0.9)
    want_loss, want = jax.jit(_linen_step, static_argnums=(0, 4))(model, variables, x, y, tx)
    m = vnnx.from_variables(model, variables)
    optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)
    loss = _nnx_step(m, optimizer, x, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    got, before = flatten_dict(vnnx.to_variables(m)), flatten_dict(variables)
    assert set(got) == set(before)
    for k, w in flatten_dict(want).items():
        want_change = np.asarray(w) - before[k]
        got_change = np.asarray(got[k]) - before[k]
        assert np.abs(want_change).max() > 0, f"{k} did not change in the linen step"
        assert np.abs(got_change - want_change).max() <= 1e-5 * np.abs(want_change).max(), k


def test_train_mode_updates_batch_statistics_and_eval_mode_does_not():
    model, variables = _bn_model()
    m = vnnx.from_variables(model, variables)
    x = _images(4)
    m(x)
    np.testing.assert_array_equal(m.bn1_1["mean"][...], variables["batch_stats"]["bn1_1"]["mean"])
    nnx.jit(lambda mod, a: mod(a, train=True))(m, x)
    _, want = model.apply(variables, x, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(0)})
    for layer in ("bn1_1", "bn5_2"):
        assert np.abs(getattr(m, layer)["mean"][...] - variables["batch_stats"][layer]["mean"]
                      ).max() > 0
        np.testing.assert_allclose(getattr(m, layer)["var"][...],
                                   want["batch_stats"][layer]["var"], rtol=1e-5)


def test_dropout_is_keyed_by_nnx_rngs():
    model = vgg_flax.vgg11(**{**SMALL, "dropout_rate": 0.5})
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x = _images(2)
    a = vnnx.from_variables(model, variables, rngs=nnx.Rngs(dropout=3))
    b = vnnx.from_variables(model, variables, rngs=nnx.Rngs(dropout=3))
    first, again = a(x, train=True), a(x, train=True)
    np.testing.assert_array_equal(first, b(x, train=True))  # same stream, same keys
    assert np.abs(np.asarray(first - again)).max() > 0  # the stream advances
    np.testing.assert_array_equal(a(x), model.apply(variables, x))  # eval: no dropout
    other = vnnx.from_variables(model, variables, rngs=nnx.Rngs(dropout=4))
    assert np.abs(np.asarray(other(x, train=True) - first)).max() > 0  # another seed, other keys
    keyed = a(x, train=True, rngs=nnx.Rngs(dropout=9))
    assert np.abs(np.asarray(keyed - first)).max() > 0


@pytest.mark.parametrize("name", sorted(vgg_flax.MODELS))
def test_every_builder_is_an_nnx_module_with_the_linen_names(name):
    build = getattr(vnnx, name)
    m = build(num_classes=3, head="small", small_head_width=0, fc_width=16, conv_impl="xla",
              rngs=nnx.Rngs(0))
    assert isinstance(m, nnx.Module) and isinstance(m.linen, vgg_flax.VGG)
    linen = vgg_flax.get_model(name, num_classes=3, head="small", small_head_width=0, conv_impl="xla")
    shapes = jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = vnnx.to_variables(m)
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)
    np.testing.assert_array_equal(m(_images(1)), linen.apply(variables, _images(1)))


def test_from_pretrained_takes_a_state_dict_and_a_path(tmp_path):
    model, variables = _bn_model(head="torchvision", fc_width=16)
    state = vgg_flax.to_torchvision(model, variables)
    m = vnnx.from_pretrained(state, conv_impl="xla")
    np.testing.assert_array_equal(m(_images(1)), model.apply(variables, _images(1)))
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.pth"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    m = vnnx.from_pretrained(path, head="none", conv_impl="xla")
    assert not any(k.startswith("fc") for k in vnnx.to_variables(m)["params"])
    if not hasattr(vgg_flax, "from_pretrained"):
        with pytest.raises(FileNotFoundError, match="vgg_flax.from_pretrained"):
            vnnx.from_pretrained("vgg16")


def test_unknown_collection_is_one_clear_error():
    model, variables = _bn_model()
    with pytest.raises(ValueError, match=r"collections \['intermediates'\]"):
        vnnx.from_variables(model, {**variables, "intermediates": {}})
