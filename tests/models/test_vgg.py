"""Models: parameter counts, every head at awkward sizes, pooling and LRN against PyTorch, taps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_flax
from vgg_flax import models

# torchvision's documented parameter counts (docs of torchvision.models.vgg*).
TORCHVISION_PARAMS = {
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}
# A narrow net with all five pools, an LRN and a 1x1 conv: every code path, fast on CPU.
TINY = (8, "LRN", "M", 16, "M", 16, (16, 1), "M", 32, "M", 32, 32, "M")
TINY_KW = dict(config=TINY, fc_width=32, num_classes=10, small_head_width=16)


def _param_count(model, size=224):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return vgg_flax.count_params(shapes)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_equals_torchvision(name):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)()
    torch_count = sum(p.numel() for p in reference.parameters())
    assert torch_count == TORCHVISION_PARAMS[name]
    assert _param_count(vgg_flax.get_model(name)) == torch_count
    # The dense head shares fc1's weights through a reshape: the same count.
    assert _param_count(vgg_flax.get_model(name, head="dense")) == torch_count


def test_param_count_paper_only_configs():
    # A-LRN: LRN has no parameters, so exactly A's count (the paper's Table 2: 133M).
    assert _param_count(vgg_flax.vgg11_lrn()) == TORCHVISION_PARAMS["vgg11"]
    # C: D with the third conv of blocks 3-5 as 1x1 (Table 2: 134M).
    saved = (9 - 1) * (256 * 256 + 2 * 512 * 512)
    count_c = _param_count(vgg_flax.vgg16_c())
    assert count_c == TORCHVISION_PARAMS["vgg16"] - saved == 133_638_952


@pytest.mark.parametrize("head", vgg_flax.HEADS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_head_jits_at_awkward_sizes(head, batch_norm):
    model = vgg_flax.VGG(head=head, batch_norm=batch_norm, **TINY_KW)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    apply = jax.jit(functools.partial(model.apply, train=False))
    for h, w in [(32, 32), (224, 224), (257, 193)]:
        x = jax.random.normal(jax.random.key(h), (2, h, w, 3))
        out = apply(variables, x)
        expected = (2, h // 32, w // 32, 32) if head == "none" else (2, 10)
        assert out.shape == expected
        assert out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))
        assert float(jnp.std(out)) > 0
        # The two samples differ, so the network is not collapsing its input.
        assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 0


def test_dense_head_equals_torchvision_head_at_224():
    """At 224 the 7x7 VALID conv sees exactly the 7x7 map: the paper's equivalence."""
    fc = vgg_flax.VGG(head="torchvision", **TINY_KW)
    dense = vgg_flax.VGG(head="dense", **TINY_KW)
    x = jax.random.normal(jax.random.key(1), (2, 224, 224, 3))
    variables = fc.init(jax.random.key(0), x)
    a = fc.apply(variables, x)
    b = dense.apply(variables, x)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(jnp.abs(a).max()))


def test_dense_head_averages_sliding_fc_scores():
    """On a 288 input the dense head's score map is the FC head applied to every 7x7 window."""
    dense = vgg_flax.VGG(head="dense", **TINY_KW)
    x = jax.random.normal(jax.random.key(2), (1, 288, 256, 3))
    variables = dense.init(jax.random.key(0), x)
    feats = vgg_flax.VGG(head="none", **TINY_KW).apply(variables, x)  # (1, 9, 8, 32)
    scores = []
    for i in range(feats.shape[1] - 6):
        for j in range(feats.shape[2] - 6):
            window = feats[:, i:i + 7, j:j + 7, :]
            scores.append(_fc_head(variables["params"], window))
    expected = jnp.mean(jnp.stack(scores), axis=0)
    got = dense.apply(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(got).max()))


def _fc_head(p, fmap):
    """torchvision's classifier written out by hand on a 7x7 NHWC map (eval mode)."""
    x = fmap.reshape(fmap.shape[0], -1)
    x = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    x = jax.nn.relu(x @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    return x @ p["fc3"]["kernel"] + p["fc3"]["bias"]


@pytest.mark.parametrize("in_hw,out_hw", [((13, 10), (7, 7)), ((8, 6), (7, 7)),
                                          ((5, 3), (7, 7)), ((1, 1), (7, 7)),
                                          ((20, 31), (3, 5)), ((7, 7), (7, 7))])
def test_adaptive_avg_pool_matches_pytorch(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 4)).astype(np.float32)
    got = vgg_flax.adaptive_avg_pool(jnp.asarray(x), out_hw)
    ref = torch.nn.AdaptiveAvgPool2d(out_hw)(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3, 7, 64])
def test_lrn_matches_pytorch(channels):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(channels).normal(scale=30.0, size=(2, 5, 6, channels))
    x = x.astype(np.float32)
    got = vgg_flax.local_response_norm(jnp.asarray(x))
    lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    ref = lrn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    assert not np.allclose(ref, x / 2.0 ** 0.75, rtol=1e-3)  # the input was large enough to matter


def test_taps_return_what_they_name():
    model = vgg_flax.VGG(head="torchvision", batch_norm=True, **TINY_KW)
    x = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
    variables = model.init(jax.random.key(0), x)
    # Non-trivial BN statistics, so the manual path must apply them correctly.
    stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    logits, t = model.apply(variables, x, taps=model.tap_names())
    p, s = variables["params"], variables["batch_stats"]

    conv = jax.lax.conv_general_dilated(x, p["conv1_1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv + p["conv1_1"]["bias"]
    bn = ((conv - s["bn1_1"]["mean"]) / jnp.sqrt(s["bn1_1"]["var"] + 1e-5)
          * p["bn1_1"]["scale"] + p["bn1_1"]["bias"])
    np.testing.assert_allclose(t["conv1_1"], bn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["relu1_1"], jnp.maximum(bn, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["lrn1"], vgg_flax.local_response_norm(t["relu1_1"]))
    np.testing.assert_array_equal(t["stage1"], t["lrn1"])
    pooled = t["stage2"].reshape(2, 16, 2, 16, 2, 16).max(axis=(2, 4))
    np.testing.assert_array_equal(t["pool2"], pooled)
    # conv3_2 is config's 1x1 conv: a matmul over channels.
    c32 = t["relu3_1"] @ p["conv3_2"]["kernel"][0, 0] + p["conv3_2"]["bias"]
    bn32 = ((c32 - s["bn3_2"]["mean"]) / jnp.sqrt(s["bn3_2"]["var"] + 1e-5)
            * p["bn3_2"]["scale"] + p["bn3_2"]["bias"])
    np.testing.assert_allclose(t["conv3_2"], bn32, rtol=1e-4, atol=1e-5)
    # The pyramid: reductions 1..32, and pool5 is what the headless model returns.
    sizes = [t[name].shape[1] for name in vgg_flax.PYRAMID_TAPS]
    assert sizes == [64, 32, 16, 8, 4, 2]
    headless = vgg_flax.VGG(head="none", batch_norm=True, **TINY_KW).apply(variables, x)
    np.testing.assert_array_equal(t["pool5"], headless)
    np.testing.assert_allclose(logits, t["pre_logits"] @ p["fc3"]["kernel"] + p["fc3"]["bias"],
                               rtol=1e-5, atol=1e-6)


def test_unknown_names_are_clear_errors():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(KeyError, match="valid names"):
        vgg_flax.VGG(config="F").init(jax.random.key(0), x)
    with pytest.raises(KeyError, match="valid heads"):
        vgg_flax.VGG(config=TINY, head="fancy").init(jax.random.key(0), x)
    model = vgg_flax.VGG(**TINY_KW)
    with pytest.raises(KeyError, match="relu1_1"):
        model.init(jax.random.key(0), x, taps=("relu9_9",))
    with pytest.raises(ValueError, match="bad config entry"):
        vgg_flax.VGG(config=(64, "X")).init(jax.random.key(0), x)
    with pytest.raises(KeyError, match="valid names"):
        vgg_flax.get_model("vgg17")


def test_full_vgg11_at_224_runs_under_jit():
    model = vgg_flax.vgg11(num_classes=1000)
    x = jax.random.normal(jax.random.key(7), (1, 224, 224, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    assert out.shape == (1, 1000) and bool(jnp.all(jnp.isfinite(out)))
    assert models.count_params(variables) == TORCHVISION_PARAMS["vgg11"]


def test_remat_blocks_same_values_gradients_and_names():
    kw = dict(TINY_KW, batch_norm=True, head="torchvision")
    plain, remat = vgg_flax.VGG(**kw), vgg_flax.VGG(remat_blocks=True, **kw)
    x = jax.random.normal(jax.random.key(8), (2, 64, 64, 3))
    variables = plain.init(jax.random.key(0), x)
    assert (jax.tree.map(jnp.shape, remat.init(jax.random.key(0), x))
            == jax.tree.map(jnp.shape, variables))

    def loss(model, params):
        out, upd = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)})
        return jnp.sum(out ** 2), upd

    # Under jit, as in a train step (op by op it is twice as slow here and proves no more).
    (a, upd_a), ga = jax.jit(jax.value_and_grad(functools.partial(loss, plain), has_aux=True))(
        variables["params"])
    (b, upd_b), gb = jax.jit(jax.value_and_grad(functools.partial(loss, remat), has_aux=True))(
        variables["params"])
    np.testing.assert_allclose(b, a, rtol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-7), upd_a, upd_b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6), ga, gb)
    with pytest.raises(ValueError, match="remat_blocks"):
        remat.apply(variables, x, taps=("relu1_1",))
