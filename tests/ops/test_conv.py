"""vgg_flax.conv: the CPU speed path computes the same outputs and gradients as plain `jax.grad`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_flax
from vgg_flax.ops import conv, routing

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _plain(x, kernel):
    p = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _data(n, h, w, c, d, k, dtype, seed=0):
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, h, w, c), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(kk, (k, k, c, d), jnp.float32) / np.sqrt(k * k * c)).astype(dtype)
    g = jax.random.normal(kg, (n, h, w, d), jnp.float32).astype(dtype)
    return x, kernel, g


# VGG's conv shapes scaled down: the first conv (C=3), square and widening convs, odd sizes after
# pools (7, 14 -> 7), config C's 1x1, and maps at or above routing.BLOCKED_MIN_PIXELS (the blocked path).
# 64+ channels on even maps of 4 to 56 px take Winograd (forward, input gradient; the filter gradient
# from 128 input channels, up to 112 px); odd and 2 px maps with 64 channels keep XLA's conv.
SHAPES = [(2, 64, 64, 3, 8, 3), (2, 56, 56, 16, 16, 3), (1, 60, 60, 8, 16, 3), (3, 57, 57, 4, 8, 3),
          (2, 28, 28, 16, 16, 3),
          (2, 14, 14, 16, 32, 3), (2, 7, 7, 32, 32, 3), (2, 28, 28, 16, 16, 1), (1, 1, 1, 8, 8, 3),
          (2, 8, 8, 64, 64, 3), (1, 16, 12, 64, 128, 3), (1, 14, 14, 128, 64, 3), (1, 112, 112, 128, 64, 3),
          (1, 9, 9, 64, 64, 3), (2, 2, 2, 64, 64, 3), (3, 4, 4, 128, 64, 3)]


def _not_xla_forward(x, kernel):
    """Whether `conv_same_cpu`'s forward is not XLA's conv, read from its jaxpr (no conv op in it)."""
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv.conv_same_cpu(a, b, kernel.shape[0]))(x, kernel))
    return "conv_general_dilated" not in jaxpr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_custom_vjp_matches_plain_grad(shape, dtype):
    n, h, w, c, d, k = shape
    x, kernel, g = _data(n, h, w, c, d, k, dtype)
    y_ref, vjp_ref = jax.vjp(_plain, x, kernel)
    y, vjp = jax.vjp(lambda a, b: conv.conv_same_cpu(a, b, k), x, kernel)
    if _not_xla_forward(x, kernel):  # a different algorithm: equal up to rounding
        assert y.dtype == y_ref.dtype and _rel(y, y_ref) < TOL[dtype]
    else:  # the same XLA op
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for got, want in zip(jax.jit(vjp)(g), jax.jit(vjp_ref)(g), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 1, 1, 8, 8, 3), (4, 2, 2, 16, 16, 3), (2, 4, 4, 8, 16, 3),
                                   (2, 3, 3, 4, 4, 1), (1, 3, 5, 4, 4, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_im2col_matches_plain(shape, dtype):
    """The tiny-map path: same outputs (up to summation order) and same gradients as plain jax.grad."""
    n, h, w, c, d, k = shape
    x, kernel, g = _data(n, h, w, c, d, k, dtype, seed=2)
    y_ref, vjp_ref = jax.vjp(_plain, x, kernel)
    y, vjp = jax.vjp(conv.conv_same_im2col, x, kernel)
    assert y.dtype == y_ref.dtype and _rel(y, y_ref) < TOL[dtype]
    for got, want in zip(jax.jit(vjp)(g), jax.jit(vjp_ref)(g), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3, 4, 3), (1, 9, 5, 2, 3, 3), (2, 6, 6, 4, 4, 5),
                                   (1, 4, 4, 2, 2, 1)])
def test_filter_grad_blocked_equals_definition(shape):
    """Direct definition in float64 numpy: dk[i,j,c,d] = sum x_pad[n,h+i,w+j,c] g[n,h,w,d]."""
    n, h, w, c, d, k = shape
    x, _, g = _data(n, h, w, c, d, k, jnp.float32, seed=1)
    p = k // 2
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
    gn = np.asarray(g, np.float64)
    want = np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + h, j:j + w], gn)
                     for i in range(k) for j in range(k)]).reshape(k, k, c, d)
    got = jax.jit(lambda a, b: conv.filter_grad_blocked(a, b, ksize=k))(x, g)
    assert _rel(got, want) < 1e-5


def _conv64(x, kernel):
    """The direct "same" conv in float64 numpy: y[n,h,w,d] = sum x_pad[n,h+i,w+j,c] k[i,j,c,d]."""
    h, w = x.shape[1:3]
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    kn = np.asarray(kernel, np.float64)
    return sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + h, j:j + w], kn[i, j])
               for i in range(3) for j in range(3))


@pytest.mark.parametrize("shape", [(2, 8, 8, 4, 5), (1, 6, 10, 3, 7), (1, 2, 2, 2, 2)], ids=str)
def test_winograd_equals_definition(shape):
    """Winograd's forward, input gradient and filter gradient against the direct sums in float64."""
    n, h, w, c, d = shape
    x, kernel, g = _data(n, h, w, c, d, 3, jnp.float32, seed=3)
    assert _rel(jax.jit(conv.winograd_conv3x3)(x, kernel), _conv64(x, kernel)) < 2e-6
    flipped = np.asarray(kernel, np.float64)[::-1, ::-1].transpose(0, 1, 3, 2)
    assert _rel(jax.jit(conv.winograd_input_grad)(g, kernel), _conv64(g, flipped)) < 2e-6
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + h, j:j + w], np.asarray(g, np.float64))
                     for i in range(3) for j in range(3)]).reshape(3, 3, c, d)
    assert _rel(jax.jit(conv.winograd_filter_grad)(x, g), want) < 2e-6


def test_winograd_only_where_measured_faster():
    """The routing the speed claims rest on: fp32, even sides >= 4, <= 56x56 px, 64+ channels."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    max_pixels = routing.WINOGRAD_MAX_PIXELS
    fits = lambda shape, c, d, dt=f32: routing.winograd_fits(shape, c, d, dt, max_pixels=max_pixels)
    assert fits((8, 56, 56, 256), 256, 256) and fits((32, 8, 8, 256), 256, 256)
    assert fits((8, 14, 14, 512), 512, 512) and fits((32, 32, 32, 64), 64, 64)
    assert not fits((8, 112, 112, 128), 128, 128)  # transforms cost more than they save
    assert not fits((8, 224, 224, 3), 3, 64)  # 3 input channels
    assert fits((32, 4, 4, 512), 512, 512) and fits((8, 6, 6, 64), 64, 64)
    assert not fits((8, 57, 57, 64), 64, 64) and not fits((8, 2, 2, 512), 512, 512)
    assert not fits((8, 28, 28, 512), 512, 512, bf16)  # fp32 only


def _matmuls(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize("batch", [2, 63, 64])
def test_inference_forward_on_small_4x4_batches_is_one_matmul(batch):
    """Without a gradient, 4x4 maps of < 1024 batch pixels take im2col (one matmul), with the same
    values; under jax.vjp, and from 64 images up, the forward stays Winograd's 16 matmuls."""
    x, kernel, _ = _data(batch, 4, 4, 64, 64, 3, jnp.float32, seed=4)
    infer = lambda a, b: conv.conv_same_cpu(a, b, 3)
    trained = lambda a, b: jax.vjp(infer, a, b)[0]
    assert _matmuls(infer, x, kernel) == (1 if batch < 64 else 16)
    assert _matmuls(trained, x, kernel) == 16
    want = _conv64(x, kernel)
    assert _rel(jax.jit(infer)(x, kernel), want) < 2e-6
    assert _rel(jax.jit(trained)(x, kernel), want) < 2e-6


@pytest.mark.parametrize("batch,want", [(3, "im2col"), (4, "winograd")])
def test_small_batches_take_im2col_for_every_pass(batch, want):
    """The drop-in routes Winograd-sized convs with < 256 pixels in the batch to `conv_same_im2col`
    (plain autodiff, no custom VJP); from 256 pixels on to `conv_same_cpu`."""
    f = conv.make_conv_general_dilated("cpu")
    x, kernel, g = _data(batch, 8, 8, 64, 64, 3, jnp.float32, seed=5)
    fn = lambda a, b: f(a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jaxpr = str(jax.make_jaxpr(fn)(x, kernel))
    assert ("custom_vjp" in jaxpr) == (want == "winograd")
    if want == "im2col":
        assert "conv_general_dilated" not in jaxpr and _matmuls(fn, x, kernel) == 1
    y_ref, vjp_ref = jax.vjp(_plain, x, kernel)
    y, vjp = jax.vjp(fn, x, kernel)
    assert _rel(y, y_ref) < 2e-5
    for got, ref in zip(jax.jit(vjp)(g), jax.jit(vjp_ref)(g), strict=True):
        assert _rel(got, ref) < 2e-5


def test_rows_per_block_divides_height():
    for n, h, w in [(8, 224, 224), (8, 112, 112), (8, 56, 56), (32, 32, 32), (1, 57, 57), (64, 7, 7)]:
        r = conv._rows_per_block(n, h, w)
        assert h % r == 0 and r >= 1
        assert n * r * w <= conv._TARGET_BLOCK_ROWS or r == 1


def test_impl_names_and_backend_choice():
    assert routing.resolve_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(KeyError, match="valid"):
        routing.resolve_impl("fast")


def test_other_convs_fall_back_to_lax():
    """Strided, dilated, VALID and NCHW convs are not VGG's: the drop-in must compute them unchanged."""
    f = conv.make_conv_general_dilated("cpu")
    x, kernel, _ = _data(1, 9, 9, 3, 4, 3, jnp.float32)
    for kwargs in [dict(window_strides=(2, 2), padding=((1, 1), (1, 1))),
                   dict(window_strides=(1, 1), padding="VALID"),
                   dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2))]:
        want = jax.lax.conv_general_dilated(x, kernel, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            **kwargs)
        got = f(x, kernel, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["normal", "relu", "integer"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (2, 64, 64, 4)], ids=str)
def test_max_pool_matches_flax_exactly(shape, kind):
    """Values and gradients bit-equal to nn.max_pool's, ties included (zeros after ReLU, integers):
    the gradient goes to the window's first maximum, as XLA's select-and-scatter does."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), shape)
    x = {"normal": x, "relu": jnp.maximum(x, 0), "integer": jnp.round(x)}[kind]
    ref = lambda a: nn.max_pool(a, (2, 2), strides=(2, 2))
    y_ref, vjp_ref = jax.vjp(ref, x)
    y, vjp = jax.vjp(conv.max_pool_2x2, x)
    g = jax.random.normal(jax.random.key(1), y_ref.shape)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(jax.jit(vjp)(g)[0], jax.jit(vjp_ref)(g)[0])


# At 64x64 the first convs take the blocked filter gradient, the 2x2 ones the im2col path.
TINY = (8, "M", 16, (16, 1), "M", 16, "M", 16, "M", "M", 16, 16)
# At 32x32, batch 16: XLA's conv for 3 channels, Winograd forward / input gradient on the 16, 8 and
# 4 px maps, Winograd filter gradient for the 128-channel inputs, im2col on 2 px; at batch 2 the 8
# and 4 px maps take im2col for every pass instead (fewer than 256 pixels in the batch).
WIDE = (64, "M", 64, 128, "M", 128, 128, "M", 128, "M", 64)


# Winograd and the small-batch route are fp32-only, so bf16 runs the batch-2 cases only.
_WHOLE_MODEL_CASES = [pytest.param(dtype, config, size, batch, id=f"{name}-{dtype_id}")
                      for dtype, dtype_id in [(jnp.float32, "f32"), (jnp.bfloat16, "bf16")]
                      for name, config, size, batch in [("tiny64", TINY, 64, 2), ("wide32", WIDE, 32, 16),
                                                        ("wide32_b2", WIDE, 32, 2)]
                      if batch == 2 or dtype == jnp.float32]


@pytest.mark.parametrize("dtype,config,size,batch", _WHOLE_MODEL_CASES)
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_vgg_train_grads_match_xla(batch_norm, dtype, config, size, batch):
    """The whole model: same logits, BN statistics and parameter gradients under both conv paths."""
    kw = dict(config=config, batch_norm=batch_norm, head="small", num_classes=5, small_head_width=8,
              dtype=dtype)
    fast, plain = vgg_flax.VGG(conv_impl="cpu", **kw), vgg_flax.VGG(conv_impl="xla", **kw)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    labels = jnp.arange(batch) % 5
    variables = plain.init(jax.random.key(1), x)

    def loss(model, params):
        logits, upd = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels]), (logits, upd)

    (l1, (y1, u1)), g1 = jax.jit(jax.value_and_grad(lambda p: loss(fast, p), has_aux=True))(
        variables["params"])
    (l2, (y2, u2)), g2 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(
        variables["params"])
    assert _rel(y1, y2) < TOL[dtype]
    jax.tree_util.tree_map(lambda a, b: _rel(a, b) < TOL[dtype] or pytest.fail("batch_stats"), u1, u2)
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves_with_path(g2)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    # Conv biases before BatchNorm have exactly zero true gradient (BN removes any shift): their
    # float noise is compared against the largest gradient of the model instead, times the dtype's
    # resolution where that is coarser than 1e-3 (bf16: 2^-7; its noise there measured 1.3e-4 of
    # the largest gradient under jax 0.12).
    resolution = max(1e-3, float(jnp.finfo(dtype).eps))
    floor = resolution * max(float(np.abs(np.asarray(b, np.float32)).max()) for _, b in flat2)
    for (path, a), (_, b) in zip(flat1, flat2, strict=True):
        err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
        scale = max(float(np.abs(np.asarray(b, np.float32)).max()), floor)
        assert err / scale < TOL[dtype] * 5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("batch", [3, 16])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_vgg_inference_matches_xla(batch_norm, batch):
    """Inference (no gradient: at batch 16 the 4x4 maps take conv_same_cpu's im2col forward, at batch 3
    every small map takes im2col): same logits as XLA's convs, BN in eval mode with non-trivial running
    statistics."""
    kw = dict(config=WIDE, batch_norm=batch_norm, head="small", num_classes=5, small_head_width=8)
    fast, plain = vgg_flax.VGG(conv_impl="cpu", **kw), vgg_flax.VGG(conv_impl="xla", **kw)
    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    variables = plain.init(jax.random.key(1), x)
    if batch_norm:  # running statistics from one training-mode pass, not the init's 0 / 1
        _, upd = plain.apply(variables, 2.0 * x + 0.5, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(2)})
        variables = {**variables, **upd}
    infer = lambda m: jax.jit(lambda v, a: m.apply(v, a, train=False))(variables, x)
    assert _rel(infer(fast), infer(plain)) < 1e-5


def test_per_example_grads_under_vmap_match_xla():
    """jax.vmap(jax.grad) (per-example gradients) goes through the custom VJPs: same as XLA's convs."""
    kw = dict(config=WIDE, batch_norm=False, head="small", num_classes=5, small_head_width=8)
    fast, plain = vgg_flax.VGG(conv_impl="cpu", **kw), vgg_flax.VGG(conv_impl="xla", **kw)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = plain.init(jax.random.key(1), x)["params"]

    def per_example(model):
        loss = lambda p, xi: model.apply({"params": p}, xi[None], train=False).sum()
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)

    # Per example the 16 px maps have 256 pixels: those two convs stay Winograd (16 matmuls each,
    # forward and input gradient) under vmap; the 8 px and smaller ones take im2col.
    loss = lambda p, xi: fast.apply({"params": p}, xi[None], train=False).sum()
    jaxpr = str(jax.make_jaxpr(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x))
    assert jaxpr.count("dot_general") >= 2 * 16

    got, want = per_example(fast), per_example(plain)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got),
                                 jax.tree_util.tree_leaves_with_path(want), strict=True):
        assert a.shape == b.shape and a.shape[0] == 4, jax.tree_util.keystr(path)
        assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)


def test_forward_mode_needs_the_xla_path():
    """The CPU path defines custom VJPs, which JAX cannot differentiate forward (jax.jvp, jax.hessian):
    conv_impl="xla" can, with the same values."""
    kw = dict(config=(64, "M", 64), head="small", num_classes=3, small_head_width=8)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = vgg_flax.VGG(conv_impl="xla", **kw).init(jax.random.key(1), x)
    f = lambda impl: lambda a: vgg_flax.VGG(conv_impl=impl, **kw).apply(variables, a, train=False)
    t = jax.random.normal(jax.random.key(2), x.shape)
    y, dy = jax.jvp(f("xla"), (x,), (t,))
    # Forward mode agrees with reverse mode (of the CPU path): <J t, g> == <t, J^T g>.
    g = jax.random.normal(jax.random.key(3), y.shape)
    _, vjp = jax.vjp(f("cpu"), x)
    lhs, rhs = float(jnp.vdot(dy, g)), float(jnp.vdot(t, vjp(g)[0]))
    assert abs(lhs - rhs) < 1e-4 * max(abs(lhs), 1.0)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f("cpu"), (x,), (jnp.ones_like(x),))
