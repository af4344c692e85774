"""Properties a wrong attribution fails, the tap-gradient primitive, the options and the errors.

The trained model is the main job's (configs/default.py's VGG on the digits), trained here for a
few hundred small steps with Adam: enough for the maps to depend on what it learned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vgg_flax
from vgg_flax import explain
from vgg_flax.data.sklearn_digits import split_indices, upsample

CONFIG = (16, "M", 32, "M", 64, "M", 128, "M")  # configs/default.py's model
TRAIN_STEPS = 80


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    parts = split_indices(digits.target)
    pixels = np.stack([upsample(im) for im in digits.images]).astype(np.float32)
    images = vgg_flax.preprocessing.get_preset("symmetric")(pixels)  # the default run's preset
    return {k: (images[i], digits.target[i]) for k, i in parts.items()}


def _spearman(a, b):
    ra, rb = (np.argsort(np.argsort(v.ravel())) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def trained():
    data = _digits()
    model = vgg_flax.VGG(config=CONFIG, batch_norm=True, head="small", num_classes=10,
                         small_head_width=64, dropout_rate=0.2)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    tx = optax.adam(3e-3)

    @jax.jit
    def step(variables, opt_state, x, y, key):
        def loss_fn(params):
            logits, new = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        grads, new = jax.grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state)
        return {"params": optax.apply_updates(variables["params"], updates), **new}, opt_state

    x, y = data["train"]
    opt_state = tx.init(variables["params"])
    rng = np.random.default_rng(0)
    for i in range(TRAIN_STEPS):
        idx = rng.integers(0, len(x), 32)
        variables, opt_state = step(variables, opt_state, x[idx], y[idx], jax.random.key(i))
    test_x, test_y = data["test"][0][:16], data["test"][1][:16]
    accuracy = float((np.argmax(model.apply(variables, test_x), -1) == test_y).mean())
    assert accuracy >= 0.8, accuracy
    print(f"trained: test accuracy {accuracy:.2f}")
    return model, variables, test_x, test_y


def test_model_randomisation_changes_the_maps(trained):
    """Adebayo et al. 2018: maps of the trained and of re-initialised weights must differ."""
    model, variables, x, y = trained
    random = model.init(jax.random.key(7), x[:1])
    for method in (explain.saliency, explain.grad_cam):
        kept = np.asarray(method(model, variables, x, y))
        rand = np.asarray(method(model, random, x, y))
        rho = np.mean([_spearman(a, b) for a, b in zip(kept, rand, strict=True)])
        assert rho < 0.5, (method.__name__, rho)


def test_grad_cam_of_an_unsupported_class_differs_from_the_top1(trained):
    model, variables, x, _ = trained
    logits = np.asarray(model.apply(variables, x))
    top, bottom = logits.argmax(-1), logits.argmin(-1)
    a = np.asarray(explain.grad_cam(model, variables, x, top, upsample=False))
    b = np.asarray(explain.grad_cam(model, variables, x, bottom, upsample=False))
    assert np.array_equal(a, np.asarray(explain.grad_cam(model, variables, x, None, upsample=False)))
    differ = [not np.allclose(p, q, atol=1e-3 * p.max()) for p, q in zip(a, b, strict=True)]
    assert np.mean(differ) >= 0.9
    assert np.mean([_spearman(p, q) for p, q in zip(a, b, strict=True)]) < 0.5


def test_integrated_gradients_completeness_error_shrinks_with_steps(trained):
    """Sundararajan et al. 2017: the attributions sum to S(x) - S(x') up to the quadrature error."""
    model, variables, x, y = trained
    x, y = x[:2], y[:2]
    baseline = jnp.full_like(x, -1.0)  # black digits: the preset maps 0 to -1
    logits = model.apply(variables, jnp.concatenate([x, baseline]))
    gap = np.asarray(logits[:2][np.arange(2), y] - logits[2:][np.arange(2), y])
    errors = []
    for steps in (2, 8, 32):
        attr = explain.integrated_gradients(model, variables, x, y, baseline=baseline, steps=steps,
                                            rule="riemann_trapezoid")
        errors.append(float(np.max(np.abs(np.asarray(attr).sum((1, 2)) - gap)) / np.abs(gap).max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_integrated_gradients_through_the_first_conv_equal_the_sum_of_input_gradients():
    """The path points' gradients are summed at the first conv's output and sent through its
    (affine: conv + bias + eval-mode BatchNorm) map once; that equals summing each point's input
    gradient. float64, so no max-pool tie can flip between the two computations."""
    with jax.enable_x64(True):
        model = vgg_flax.VGG(config=(8, "M", 16, "M"), batch_norm=True, head="small", num_classes=4,
                             dtype=jnp.float64, param_dtype=jnp.float64, conv_impl="xla")
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)))
        variables = model.init(jax.random.key(0), x)
        stats = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape)), variables["batch_stats"])
        variables = {**variables, "batch_stats": stats}  # non-trivial running statistics
        baseline, targets = 0.1 * x[::-1], np.array([1, 3])
        got = explain.integrated_gradients(model, variables, x, targets, baseline=baseline, steps=6,
                                           rule="riemann_trapezoid", per_channel=True)
        alphas, weights = explain.maps.IG_RULES["riemann_trapezoid"](6)
        grads = [explain.tap_gradients(model, variables, baseline + a * (x - baseline), targets).input_grad
                 for a in alphas]
        expected = sum(w * g for w, g in zip(weights, grads, strict=True)) * (x - baseline)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * float(jnp.abs(expected).max()))


def test_tap_gradients_are_the_gradients_of_the_taps(trained):
    """dS_c/d(pre_logits) of the small head is column c of its output kernel, on both conv paths;
    a conv tap's gradient is the same on the XLA and CPU paths, and through the NNX face."""
    model, variables, x, y = trained
    assert set(model.init(jax.random.key(0), x[:1], taps=("relu3_1",))) == {"params", "batch_stats"}
    kernel = np.asarray(variables["params"]["head_out"]["kernel"])
    runs = {}
    for impl in ("xla", "cpu"):
        r = explain.tap_gradients(model.clone(conv_impl=impl), variables, x[:3], y[:3],
                                  taps=("pre_logits", "relu3_1"))
        np.testing.assert_allclose(r.tap_grads["pre_logits"], kernel[:, y[:3]].T, rtol=1e-6)
        runs[impl] = r
        assert np.array_equal(np.asarray(r.targets), y[:3])
        np.testing.assert_allclose(r.scores, np.asarray(model.apply(variables, x[:3]))[np.arange(3), y[:3]],
                                   rtol=1e-5)
    g = runs["xla"].tap_grads["relu3_1"]
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(runs["cpu"].tap_grads["relu3_1"], g, atol=1e-4 * float(jnp.abs(g).max()))
    m = vgg_flax.nnx.from_variables(model, variables, rngs=nnx.Rngs(0))
    r = explain.tap_gradients(m, None, x[:3], y[:3], taps=("pre_logits", "relu3_1"))
    np.testing.assert_allclose(r.tap_grads["relu3_1"], runs["cpu"].tap_grads["relu3_1"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(explain.saliency(m, None, x[:3], y[:3]),
                               explain.saliency(model, variables, x[:3], y[:3]), rtol=1e-6)


def test_smooth_grad_is_the_mean_of_noisy_maps(trained):
    model, variables, x, y = trained
    x, y = x[:2], y[:2]
    plain = explain.saliency(model, variables, x, y)
    np.testing.assert_allclose(explain.smooth_grad(model, variables, x, y, samples=1, noise=0.0),
                               plain, rtol=1e-4)
    smooth = explain.smooth_grad(model, variables, x, y, samples=8, noise=0.15)
    assert smooth.shape == plain.shape and not np.allclose(smooth, plain, rtol=1e-2)
    # By hand: the same keys, each noisy copy's map, averaged.
    span = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
    keys = jax.random.split(jax.random.key(0), 8)
    by_hand = np.mean([explain.saliency(model, variables, x + 0.15 * span * jax.random.normal(k, x.shape), y)
                       for k in keys], axis=0)
    np.testing.assert_allclose(smooth, by_hand, rtol=1e-4, atol=1e-6 * float(np.abs(by_hand).max()))


def test_class_model_raises_the_class_score(trained):
    model, variables, _, _ = trained
    start = jnp.zeros((2, 32, 32, 3))
    images = explain.class_model(model, variables, start, [3, 7], steps=30)
    before, after = model.apply(variables, start), model.apply(variables, images)
    assert images.shape == start.shape
    assert after[0, 3] > before[0, 3] + 1 and after[1, 7] > before[1, 7] + 1
    assert int(jnp.argmax(after[0])) == 3 and int(jnp.argmax(after[1])) == 7


def test_bad_inputs_are_one_clear_error(trained):
    model, variables, x, _ = trained
    with pytest.raises(KeyError, match="valid taps"):
        explain.grad_cam(model, variables, x[:1], None, tap="relu9_9")
    with pytest.raises(KeyError, match="valid taps"):
        explain.grad_cam(model, variables, x[:1], None, tap="pre_logits")
    with pytest.raises(ValueError, match="out of range: the model has 10 classes"):
        explain.saliency(model, variables, x[:2], [1, 10])
    with pytest.raises(ValueError, match=r"targets must be int\[2\]"):
        explain.saliency(model, variables, x[:2], [1, 2, 3])
    with pytest.raises(ValueError, match="images must be float"):
        explain.saliency(model, variables, x[0], [1])
    with pytest.raises(KeyError, match="valid rules"):
        explain.integrated_gradients(model, variables, x[:1], None, rule="simpson")
    with pytest.raises(KeyError, match="valid methods"):
        explain.smooth_grad(model, variables, x[:1], None, method="lime")
    features = model.clone(head="none")
    with pytest.raises(ValueError, match="no class scores"):
        explain.saliency(features, variables, x[:1], None)
