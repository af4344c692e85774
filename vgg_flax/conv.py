"""VGG's 3x3 convolution with a CPU-friendly backward pass (a `jax.custom_vjp`), chosen per backend.

Why: XLA's CPU backend computes a convolution's *filter* gradient as a convolution whose window is
the whole feature map (224x224 for VGG's first block). That runs at 12-35 GFLOP/s on a 2-core AVX-512
machine, 4-10x below its forward pass, and it was the largest term of a VGG16 training step there (see
docs/PERFORMANCE.md). Written instead as a loop over blocks of R image rows, each block one im2col
matmul float[9 C, N R W] x float[N R W, D] whose operands stay in cache, the same gradient runs several
times faster. The forward pass and the input gradient stay XLA's own convolutions: those are already
fast. On GPU/TPU the plain `lax.conv_general_dilated` (cuDNN, TPU convs) is used unchanged.

Also here, for the same reason: maps of at most 4x4 pixels (where XLA:CPU's convolution runs at about
1 GFLOP/s) are one im2col matmul, and the 2x2 max-pool gets an elementwise gradient instead of
select-and-scatter.

`conv_general_dilated` below has `lax.conv_general_dilated`'s signature so it can be handed to
`flax.linen.Conv(conv_general_dilated=...)`: parameters and names stay those of the plain module;
outputs are bit-identical except on tiny maps (equal up to summation order), and gradients equal up to
summation order (tests/test_conv.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "cpu")
_DIMS = ("NHWC", "HWIO", "NHWC")
# Rows of the im2col block (N * R * W) to aim for: small enough for the block's patches to stay in
# the 32 MiB L3, large enough for each matmul to run near peak.
_TARGET_BLOCK_ROWS = 4096
# Below this many output pixels per image XLA's own filter gradient is as fast or faster (measured at
# low load: 28x28 maps at batch 8 even, 115-229 ms either way; 32x32x64 maps at batch 32 29 ms XLA vs
# 72 ms blocked; 14x14 and 16x16 maps XLA faster), so the loop is used from 56x56 maps up.
_MIN_PIXELS = 56 * 56
# At most this many pixels per map the whole conv is one im2col matmul (`conv_same_im2col`).
_MAX_IM2COL_PIXELS = 4 * 4


def resolve_impl(impl: str) -> str:
    """"auto" -> "cpu" on the CPU backend, "xla" elsewhere; checks the name."""
    if impl not in CONV_IMPLS:
        raise KeyError(f"unknown conv_impl {impl!r}; valid: {CONV_IMPLS}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _plain(x, kernel, padding):
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_DIMS)


def _rows_per_block(n: int, h: int, w: int) -> int:
    """The largest divisor R of h with n * R * w <= _TARGET_BLOCK_ROWS (at least 1)."""
    best = 1
    for r in range(1, h + 1):
        if h % r == 0 and n * r * w <= _TARGET_BLOCK_ROWS:
            best = r
    return best


def filter_grad_blocked(x: jax.Array, g: jax.Array, *, ksize: int) -> jax.Array:
    """The filter gradient of a stride-1 "same" ksize x ksize conv, looping over blocks of rows.

    Args:
      x: float[N, H, W, C] the conv's input.
      g: float[N, H, W, D] the gradient of its output.
    Returns:
      float[ksize, ksize, C, D], equal to XLA's filter gradient up to summation order.
    """
    n, h, w, c = x.shape
    d = g.shape[-1]
    p = ksize // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    rows = _rows_per_block(n, h, w)

    def block(acc, b):
        xs = lax.dynamic_slice_in_dim(xp, b * rows, rows + 2 * p, axis=1)
        gs = lax.dynamic_slice_in_dim(g, b * rows, rows, axis=1).reshape(-1, d)
        taps = [xs[:, i:i + rows, j:j + w, :] for i in range(ksize) for j in range(ksize)]
        patches = jnp.concatenate(taps, axis=-1).reshape(-1, ksize * ksize * c)
        return acc + jnp.dot(patches.T, gs, preferred_element_type=jnp.float32), None

    acc = jnp.zeros((ksize * ksize * c, d), jnp.float32)
    acc, _ = lax.scan(block, acc, jnp.arange(h // rows))
    return acc.reshape(ksize, ksize, c, d).astype(x.dtype)


def conv_same_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 "same" conv as one matmul over explicit patches; autodiff gives matmul gradients.

    For tiny maps (a 32x32 image's 2x2 block-5 maps) XLA's CPU convolution falls off a cliff (about
    1 GFLOP/s: 0.8 s for one 32x2x2x512 -> 512 conv), while the same work as a matmul float[N H W,
    9 C] x float[9 C, D] is fast; the patches of such a map are tiny.

    Args:
      x: float[N, H, W, C]; kernel: float[k, k, C, D].
    Returns:
      float[N, H, W, D], equal to `lax.conv_general_dilated` up to summation order.
    """
    n, h, w, c = x.shape
    k, d = kernel.shape[0], kernel.shape[-1]
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
    y = jnp.dot(patches.reshape(n * h * w, k * k * c), kernel.reshape(k * k * c, d))
    return y.reshape(n, h, w, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same_cpu(x: jax.Array, kernel: jax.Array, ksize: int) -> jax.Array:
    """A stride-1 "same" conv (NHWC, HWIO) whose filter gradient is `filter_grad_blocked`.

    Forward value: exactly `lax.conv_general_dilated` (the same XLA op).
    """
    p = ksize // 2
    return _plain(x, kernel, ((p, p), (p, p)))


def _fwd(x, kernel, ksize):
    return conv_same_cpu(x, kernel, ksize), (x, kernel)


def _bwd(ksize, residuals, g):
    x, kernel = residuals
    p = ksize // 2
    # Input gradient: XLA's own transpose (a forward conv with the flipped kernel), already fast.
    _, vjp_x = jax.vjp(lambda x_: _plain(x_, kernel, ((p, p), (p, p))), x)
    (dx,) = vjp_x(g)
    if x.shape[1] * x.shape[2] >= _MIN_PIXELS and ksize > 1:
        dk = filter_grad_blocked(x, g, ksize=ksize)
    else:
        _, vjp_k = jax.vjp(lambda k_: _plain(x, k_, ((p, p), (p, p))), kernel)
        (dk,) = vjp_k(g)
    return dx, dk.astype(kernel.dtype)


conv_same_cpu.defvjp(_fwd, _bwd)


def _is_same_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count) -> bool:
    """True for the convs VGG uses: 2-D NHWC/HWIO, stride 1, odd square kernel, "same" padding."""
    if lhs.ndim != 4 or feature_group_count != 1:
        return False
    kh, kw = rhs.shape[:2]
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS)
    ones = (None, (1, 1))
    return (dn == nhwc and kh == kw and kh % 2 == 1 and tuple(window_strides) == (1, 1)
            and (lhs_dilation if lhs_dilation is None else tuple(lhs_dilation)) in ones
            and (rhs_dilation if rhs_dilation is None else tuple(rhs_dilation)) in ones
            and not isinstance(padding, str)
            and [tuple(p) for p in padding] == [(kh // 2, kh // 2)] * 2)


def make_conv_general_dilated(impl: str = "auto"):
    """A drop-in `lax.conv_general_dilated` for `flax.linen.Conv`, resolved per backend at trace time.

    Convs other than VGG's stride-1 "same" ones, and every conv under impl "xla", go to
    `lax.conv_general_dilated` unchanged.
    """

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None):
        plain = functools.partial(
            lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
        if (resolve_impl(impl) == "xla" or batch_group_count != 1 or precision is not None
                or preferred_element_type is not None
                or not _is_same_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                     dimension_numbers, feature_group_count)):
            return plain()
        if lhs.shape[1] * lhs.shape[2] <= _MAX_IM2COL_PIXELS:
            return conv_same_im2col(lhs, rhs)
        return conv_same_cpu(lhs, rhs, rhs.shape[0])

    return conv_general_dilated


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/2 VALID max-pool (an odd last row/column is dropped, as `nn.max_pool`), same gradient.

    Why: XLA:CPU's gradient of `reduce_window` max (select-and-scatter) took 324 ms for a
    8x224x224x64 map, ~0.6 s of a VGG16 step's 5.6 s, where the same gradient as one elementwise pass
    (mask of the window's first maximum times the upsampled gradient) is memory-bound. Ties go to the
    first maximum in row-major window order, as select-and-scatter does.

    Args:
      x: float[N, H, W, C].
    Returns:
      float[N, H // 2, W // 2, C].
    """
    n, h, w, c = x.shape
    return _pool_even(x[:, :h // 2 * 2, :w // 2 * 2, :])


@jax.custom_vjp
def _pool_even(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_fwd(x):
    y = _pool_even(x)
    return y, (x, y)


def _pool_bwd(residuals, g):
    x, y = residuals
    n, h, w, c = x.shape
    win = x.reshape(n, h // 2, 2, w // 2, 2, c)
    hit = win == y[:, :, None, :, None, :]
    e00, e01, e10, e11 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0], hit[:, :, 1, :, 1]
    first = [e00, e01 & ~e00, e10 & ~(e00 | e01), e11 & ~(e00 | e01 | e10)]
    zero = jnp.zeros((), g.dtype)
    parts = [jnp.where(m, g, zero) for m in first]  # each float[N, H/2, W/2, C]
    top = jnp.stack(parts[:2], axis=3)  # window row 0: [N, H/2, W/2, 2, C]
    bottom = jnp.stack(parts[2:], axis=3)
    dx = jnp.stack([top, bottom], axis=2)  # [N, H/2, 2, W/2, 2, C]
    return (dx.reshape(n, h, w, c),)


_pool_even.defvjp(_pool_fwd, _pool_bwd)
