"""The routing plan of VGG's stride-1 "same" convs on CPU: which kernel computes each pass.

One pure function, `conv_route`, from (pass, batch and map size, channels, kernel size, dtype,
resolved conv_impl) to the path taken; `vgg_flax.ops.conv` asks it at each of its routing sites and
applies nothing of its own. The rules (the timings behind each threshold are in docs/PERFORMANCE.md,
"Routing thresholds"):

- Winograd F(2x2, 3x3) for fp32 3x3 convs on maps with even sides, from 4x4 up to 56x56 pixels,
  with 64+ channels in and out, forward and input gradient: there its 2.25x fewer multiplies win;
  above 56x56 its memory-bound transforms cost more than they save.
- Its filter gradient also wins up to 112x112 maps, with 128+ input channels.
- Other filter gradients on maps of 56x56 pixels and more: the blocked im2col loop; smaller maps
  keep XLA's own filter gradient, as fast or faster there.
- Maps of at most 4x4 pixels that are not Winograd's (2x2, 1x1, few channels): one im2col matmul.
- Small batches, below 256 pixels in the batch: every pass of a Winograd-sized conv is im2col
  matmuls with their autodiff gradients (too few tiles per matmul for the 16-matmul form).
- An inference forward (no gradient follows) on a Winograd-sized map of at most 4x4 pixels with
  fewer than 1024 pixels in the batch: one im2col matmul (the kernel transform outweighs what it
  saves; under jax.grad the transformed kernel is shared with the input gradient, so Winograd stays).
- impl "xla" (every backend but CPU under "auto"): XLA's convolution for every pass.

`resolve_impl` turns a model's conv_impl ("auto") into "cpu" or "xla" for the platform a program is
traced for; `for_platform` fixes that choice for another platform than the host's, for programs
lowered here and run there (`jax.export`): on a CPU host "auto" would carry the CPU path, Winograd
and elementwise pools, into a GPU or TPU program (tests/ops/test_export.py shows it):

    from jax import export
    model = for_platform(vgg_flax.vgg16(dtype=jnp.bfloat16), ("cuda",))
    step = steps.make_train_step(mesh, sharding, model=model, tx=tx)
    exported = export.export(step, platforms=("cuda",))(state_shapes, batch_shapes)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# The passes a route is asked for. "dispatch": which function the Flax conv calls (a route below,
# or "custom": `conv_same_cpu`, whose own passes are then routed); "forward": its forward under
# jax.grad; "inference": its forward with no gradient following; "input_grad", "filter_grad".
PASSES = ("dispatch", "forward", "inference", "input_grad", "filter_grad")
CONV_IMPLS = ("auto", "xla", "cpu")  # a VGG's conv_impl: "auto" is resolved per platform
ROUTES = ("xla", "im2col", "winograd", "blocked", "custom")

WINOGRAD_MIN_SIDE = 4
WINOGRAD_MAX_PIXELS = 56 * 56
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_DW_MAX_PIXELS = 112 * 112
WINOGRAD_DW_MIN_IN_CHANNELS = 128
WINOGRAD_MIN_BATCH_PIXELS = 256
WINOGRAD_INFER_MIN_PIXELS = 1024
BLOCKED_MIN_PIXELS = 56 * 56
MAX_IM2COL_PIXELS = 4 * 4


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """"auto" -> "cpu" on the CPU, "xla" elsewhere; checks the name. platform: the program's target
    ("cpu", "cuda", "rocm", "tpu" or "gpu"; None: the host's `jax.default_backend()`)."""
    if impl not in CONV_IMPLS:
        raise KeyError(f"unknown conv_impl {impl!r}; valid: {CONV_IMPLS}")
    if impl == "auto":
        return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"
    return impl


def for_platform(model, platforms: str | Sequence[str]):
    """The VGG module with `conv_impl` resolved for the target platform(s) instead of the host.

    Args:
      model: a `vgg_flax.VGG`.
      platforms: "cpu", "cuda", "rocm", "tpu" or several of them (a multi-platform export).
    Returns:
      model.clone(conv_impl=...): "auto" becomes "cpu" only when every target is the CPU, else the
      portable "xla" (the CPU path is a speed choice for the CPU alone); "xla" and "cpu" are kept.
    """
    targets = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    if not targets:
        raise ValueError("for_platform needs at least one platform, e.g. ('cuda',)")
    impls = {resolve_impl(model.conv_impl, platform) for platform in targets}
    return model.clone(conv_impl=impls.pop() if len(impls) == 1 else "xla")


def winograd_fits(shape, c: int, d: int, dtype, *, max_pixels: int) -> bool:
    """True where Winograd F(2x2, 3x3) may be used: fp32, even sides of at least 4, not too large.

    shape: (N, H, W, ...) of the map; c, d: channels in and out.
    """
    _, h, w = shape[:3]
    return (jnp.dtype(dtype) == jnp.float32 and h % 2 == 0 and w % 2 == 0
            and min(h, w) >= WINOGRAD_MIN_SIDE and h * w <= max_pixels
            and min(c, d) >= WINOGRAD_MIN_CHANNELS)


def _winograd_conv(n, h, w, c, d, ksize, dtype) -> bool:
    return ksize == 3 and winograd_fits((n, h, w), c, d, dtype, max_pixels=WINOGRAD_MAX_PIXELS)


def conv_route(pass_: str, n: int, h: int, w: int, c: int, d: int, *, ksize: int = 3,
               dtype=jnp.float32, impl: str = "cpu") -> str:
    """The path one pass of a stride-1 "same" conv takes (see the module docstring for the rules).

    Args:
      pass_: one of `PASSES`.
      n, h, w: batch and map size of the conv's input (= its output); c, d: channels in and out.
      ksize: the square kernel's side; dtype: the compute dtype.
      impl: the resolved conv_impl, "cpu" or "xla" (`resolve_impl`).
    Returns:
      one of `ROUTES`: "xla" (lax.conv_general_dilated or its autodiff), "im2col", "winograd",
      "blocked" (the blocked filter gradient) or, for "dispatch" only, "custom".
    """
    if pass_ not in PASSES:
        raise KeyError(f"unknown conv pass {pass_!r}; valid passes: {PASSES}")
    if impl == "xla":
        return "xla"
    winograd = _winograd_conv(n, h, w, c, d, ksize, dtype)
    tiny_map = h * w <= MAX_IM2COL_PIXELS
    if pass_ == "dispatch":
        small_batch = n * h * w < WINOGRAD_MIN_BATCH_PIXELS
        return "im2col" if (tiny_map and not winograd) or (winograd and small_batch) else "custom"
    if pass_ == "inference" and winograd and tiny_map and n * h * w < WINOGRAD_INFER_MIN_PIXELS:
        return "im2col"
    if pass_ in ("forward", "inference", "input_grad"):
        return "winograd" if winograd else "xla"
    if (ksize == 3 and c >= WINOGRAD_DW_MIN_IN_CHANNELS
            and winograd_fits((n, h, w), c, d, dtype, max_pixels=WINOGRAD_DW_MAX_PIXELS)):
        return "winograd"
    return "blocked" if h * w >= BLOCKED_MIN_PIXELS and ksize > 1 else "xla"
