"""vgg_flax.perceptual against the `lpips` package and direct PyTorch computations of the definitions."""

import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vgg_flax import perceptual, vgg11

torch = pytest.importorskip("torch")
lpips = pytest.importorskip("lpips")

SIZES = [(32, 32), (64, 48)]


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference():
    """lpips' VGG with a random trunk (pnet_rand: no download) and its shipped linear layers, and
    that same trunk as a torchvision `features.*` state dict (slice{s}.{i} -> features.{i})."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        ref = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    trunk = {}
    for key, value in ref.net.state_dict().items():
        _, index, name = key.split(".")
        trunk[f"features.{index}.{name}"] = value.detach().clone()
    return ref, trunk


@pytest.fixture(scope="module")
def ours(reference):
    return perceptual.load_lpips(reference[1])


def _pair(seed, h, w, n=2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, h, w, 3)).astype(dtype), rng.uniform(-1, 1, (n, h, w, 3)).astype(dtype))


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("size", SIZES)
def test_lpips_equals_the_lpips_package(reference, ours, size):
    ref, _ = reference
    fn, variables = ours
    x, y = _pair(1, *size)
    want = ref(_nchw(x), _nchw(y)).detach().numpy().reshape(-1)
    got = jax.jit(fn)(variables, x, y)
    assert got.shape == (2,) and got.dtype == jnp.float32
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("size", SIZES + [(50, 38)])
def test_lpips_spatial_map_equals_the_lpips_package(reference, ours, size):
    ref, _ = reference
    fn, variables = ours
    x, y = _pair(2, *size)
    ref.spatial = True
    try:
        want = ref(_nchw(x), _nchw(y)).detach().numpy()[:, 0]
    finally:
        ref.spatial = False
    got = jax.jit(fn, static_argnames="spatial")(variables, x, y, spatial=True)
    assert got.shape == (2, *size)
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("size", SIZES[-1:])  # the non-square size (each float64 run is ~30 s here)
def test_lpips_gradient_equals_torch_autograd(reference, size):
    """In float64 on both sides: in float32 a few ReLU / max-pool decisions flip on rounding and move
    single pixels of the gradient (torch's own float32 and float64 gradients differ by ~1e-2 there),
    which says nothing about the backward pass; float64 compares the same function exactly."""
    ref, trunk = reference
    x, y = _pair(3, *size, dtype=np.float64)
    ref64 = ref.double()
    try:
        tx = _nchw(x).requires_grad_(True)
        ref64(tx, _nchw(y)).sum().backward()
    finally:
        ref.float()
    want = tx.grad.numpy().transpose(0, 2, 3, 1)
    jax.config.update("jax_enable_x64", True)
    try:
        fn, variables = perceptual.load_lpips(trunk, conv_impl="xla", dtype=jnp.float64,
                                              param_dtype=jnp.float64)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        got = jax.jit(jax.grad(lambda a: fn(variables, a, y).sum()))(x)
        assert got.dtype == jnp.float64
        got = np.asarray(got)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert np.isfinite(got).all()
    assert _rel(got, want) <= 1e-4


def test_lpips_float32_gradient_is_finite_also_for_identical_and_flat_images(ours):
    fn, variables = ours
    x, _ = _pair(4, 32, 32)
    flat = np.full_like(x, -1.0)  # zero features in whole pixels: sqrt(0) in the norm
    grad = jax.jit(jax.grad(lambda a, b: fn(variables, a, b).sum()))
    for a, b in [(x, x), (flat, x), (x, flat)]:
        g = np.asarray(grad(a, b))
        assert np.isfinite(g).all()
    assert np.abs(np.asarray(grad(x, _pair(5, 32, 32)[0]))).max() > 0


def test_lpips_is_zero_for_identical_images_and_symmetric(ours):
    fn, variables = ours
    x, y = _pair(6, 32, 32)
    assert np.abs(np.asarray(fn(variables, x, x))).max() == 0
    np.testing.assert_allclose(fn(variables, x, y), fn(variables, y, x), rtol=1e-6)


def test_unit_normalize_matches_lpips_normalize_tensor():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(2, 5, 4, 16)).astype(np.float32) * 1e-3
    f[0, 0, 0] = 0.0
    want = lpips.normalize_tensor(_nchw(f)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(perceptual.unit_normalize(jnp.asarray(f)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_read_linear_errors_name_the_key(tmp_path):
    good = perceptual.read_linear()
    assert [w.shape for w in good.values()] == [(64,), (128,), (256,), (512,), (512,)]
    bad = {f"lin{k}.model.1.weight": np.ones((1, 8, 1, 1), np.float32) for k in range(4)}
    with pytest.raises(perceptual.ConversionError, match=r"lin4\.model\.1\.weight: missing"):
        perceptual.read_linear(bad)
    bad["lin4.model.1.weight"] = np.ones((8,), np.float32)
    with pytest.raises(perceptual.ConversionError, match=r"lin4.*shape \(8,\)"):
        perceptual.read_linear(bad)


def test_load_lpips_rejects_linear_layers_of_the_wrong_width(reference):
    linear = {f"lin{k}.model.1.weight": np.ones((1, 64, 1, 1), np.float32) for k in range(5)}
    with pytest.raises(perceptual.ConversionError, match="relu2_2: backbone 128 channels, linear 64"):
        perceptual.load_lpips(reference[1], linear=linear)


# Gram / style / feature losses against the definitions written directly in PyTorch (NCHW).

def _torch_gram(f):  # f: [N, C, H, W]
    n, c, h, w = f.shape
    f = f.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def _maps(seed, shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return {t: (np.maximum(rng.normal(size=s), 0) * scale).astype(np.float32) for t, s in shapes.items()}


SHAPES = {"relu1_2": (2, 12, 10, 8), "relu2_2": (2, 6, 5, 16)}
WEIGHTS = {"relu1_2": 0.7, "relu2_2": 2.5}


def test_gram_matrix_equals_torch():
    f = _maps(8, SHAPES)["relu2_2"]
    want = _torch_gram(_nchw(f).double()).numpy()
    got = perceptual.gram_matrix(jnp.asarray(f))
    assert got.shape == (2, 16, 16) and got.dtype == jnp.float32
    assert _rel(got, want) <= 1e-6


def test_style_loss_equals_torch():
    x, s = _maps(9, SHAPES), _maps(10, {t: (1, *v[1:]) for t, v in SHAPES.items()})
    want = sum(w * ((_torch_gram(_nchw(x[t]).double()) - _torch_gram(_nchw(s[t]).double())) ** 2)
               .mean(dim=(1, 2)) for t, w in WEIGHTS.items()).numpy()
    grams = {t: perceptual.gram_matrix(jnp.asarray(v)) for t, v in s.items()}
    got = perceptual.style_loss({t: jnp.asarray(v) for t, v in x.items()}, grams, WEIGHTS)
    assert got.shape == (2,)
    assert _rel(got, want) <= 1e-5


def test_feature_loss_equals_torch():
    x, y = _maps(11, SHAPES), _maps(12, SHAPES)
    want = sum(w * ((_nchw(x[t]).double() - _nchw(y[t]).double()) ** 2).mean(dim=(1, 2, 3))
               for t, w in WEIGHTS.items()).numpy()
    got = perceptual.feature_loss(x, y, WEIGHTS)
    assert _rel(got, want) <= 1e-6
    unweighted = perceptual.feature_loss(x, y)
    want1 = sum(((_nchw(x[t]).double() - _nchw(y[t]).double()) ** 2).mean(dim=(1, 2, 3)) for t in x)
    assert _rel(unweighted, want1.numpy()) <= 1e-6
    with pytest.raises(KeyError, match="relu3_3"):
        perceptual.feature_loss(x, y, {"relu3_3": 1.0})


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_gram_of_a_224px_relu1_2_map_is_finite_in_low_precision(dtype):
    """Activations of ~300: every product overflows float16's 65504 and the sums over 224*224
    pixels overflow it many times; accumulated in float32 the Gram matrix is finite and right."""
    f = _maps(13, {"relu1_2": (1, 224, 224, 64)}, scale=300.0)["relu1_2"]
    low = jnp.asarray(f, dtype)
    got = jax.jit(perceptual.gram_matrix)(low)
    assert got.dtype == jnp.float32 and bool(jnp.isfinite(got).all())
    want = _torch_gram(_nchw(np.asarray(low.astype(jnp.float32))).double()).numpy()
    assert _rel(got, want) <= 1e-5
    loss = perceptual.style_loss({"relu1_2": low}, {"relu1_2": got * 0.5})
    assert bool(jnp.isfinite(loss).all()) and float(loss[0]) > 0


def test_style_loss_gradient_through_a_low_precision_model_is_finite():
    model = vgg11(head="none", dtype=jnp.float16, conv_impl="xla")
    x = jnp.asarray(np.random.default_rng(14).uniform(0, 255, (1, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    target = {"relu1_1": perceptual.gram_matrix(perceptual.extract(model, variables, x * 0.5, ["relu1_1"])
                                                ["relu1_1"])}

    def loss(img):
        return perceptual.style_loss(perceptual.extract(model, variables, img, ["relu1_1"]), target).sum()

    g = jax.grad(loss)(x)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


def test_style_transfer_example_runs_and_lowers_its_loss(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "styled.png"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "style_transfer.py"),
                          "--size", "32", "--steps", "6", "--lr", "0.05", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"loss (\S+)", run.stdout)]
    assert len(losses) >= 2 and np.isfinite(losses).all() and losses[-1] < losses[0]
    assert Image.open(out).size == (32, 32)


def test_unit_normalize_gradient_is_finite_at_an_all_zero_pixel():
    f = np.random.default_rng(15).normal(size=(1, 3, 3, 8)).astype(np.float32)
    f[0, 1, 1] = 0.0  # a pixel whose ReLU features are all zero: sqrt(0) in the norm
    g = jax.grad(lambda a: jnp.sum(perceptual.unit_normalize(a) * jnp.arange(8.0)))(jnp.asarray(f))
    assert bool(jnp.isfinite(g).all())
