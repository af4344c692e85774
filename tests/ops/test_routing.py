"""The routing plan as a table: each row the inputs of one conv pass and the path it must take.

Rows sit at both sides of every threshold in `vgg_flax.ops.routing`; the expected routes are written
out by hand from the rules in its docstring (docs/PERFORMANCE.md, "Routing thresholds", has the
measurements behind them), so moving a threshold or changing a rule fails here.
"""

import jax.numpy as jnp
import pytest

from vgg_flax.ops import routing

F32, BF16 = jnp.float32, jnp.bfloat16

# (pass, n, h, w, c, d, ksize, dtype, impl) -> route
ROWS = [
    # dispatch: which function the Flax conv calls.
    ("dispatch", 8, 56, 56, 64, 64, 3, F32, "cpu", "custom"),     # Winograd-sized, large batch
    ("dispatch", 8, 58, 58, 64, 64, 3, F32, "cpu", "custom"),     # above 56x56: not tiny either
    ("dispatch", 8, 2, 2, 512, 512, 3, F32, "cpu", "im2col"),     # tiny map, side < 4
    ("dispatch", 8, 1, 1, 512, 512, 3, F32, "cpu", "im2col"),
    ("dispatch", 8, 6, 6, 32, 32, 3, F32, "cpu", "custom"),       # 36 px: not tiny, not Winograd
    ("dispatch", 8, 4, 4, 63, 512, 3, F32, "cpu", "im2col"),      # tiny, too few channels
    ("dispatch", 8, 4, 4, 512, 512, 1, F32, "cpu", "im2col"),     # tiny 1x1 conv
    ("dispatch", 8, 4, 4, 512, 512, 3, BF16, "cpu", "im2col"),    # tiny bf16
    ("dispatch", 8, 8, 8, 512, 512, 3, BF16, "cpu", "custom"),
    ("dispatch", 15, 4, 4, 512, 512, 3, F32, "cpu", "im2col"),    # 240 batch pixels < 256
    ("dispatch", 16, 4, 4, 512, 512, 3, F32, "cpu", "custom"),    # 256: Winograd
    ("dispatch", 1, 14, 14, 64, 64, 3, F32, "cpu", "im2col"),     # 196 < 256 (a vmapped image)
    ("dispatch", 1, 16, 16, 64, 64, 3, F32, "cpu", "custom"),     # 256
    ("dispatch", 8, 4, 4, 512, 512, 3, F32, "xla", "xla"),
    ("dispatch", 8, 56, 56, 64, 64, 3, F32, "xla", "xla"),
    # forward under jax.grad, and the input gradient: Winograd or XLA's.
    ("forward", 8, 56, 56, 256, 256, 3, F32, "cpu", "winograd"),  # 56x56: the largest
    ("forward", 8, 58, 58, 256, 256, 3, F32, "cpu", "xla"),
    ("forward", 8, 57, 57, 64, 64, 3, F32, "cpu", "xla"),         # odd sides
    ("forward", 8, 4, 4, 512, 512, 3, F32, "cpu", "winograd"),    # side 4: the smallest
    ("forward", 8, 2, 2, 512, 512, 3, F32, "cpu", "xla"),
    ("forward", 8, 112, 112, 128, 128, 3, F32, "cpu", "xla"),     # transforms cost more there
    ("forward", 8, 28, 28, 512, 512, 3, BF16, "cpu", "xla"),      # fp32 only
    ("forward", 8, 56, 56, 63, 64, 3, F32, "cpu", "xla"),         # 64+ channels in ...
    ("forward", 8, 56, 56, 64, 63, 3, F32, "cpu", "xla"),         # ... and out
    ("forward", 8, 56, 56, 64, 64, 3, F32, "cpu", "winograd"),
    ("forward", 8, 56, 56, 256, 256, 1, F32, "cpu", "xla"),       # 3x3 only
    ("forward", 8, 28, 28, 512, 512, 3, F32, "xla", "xla"),
    ("input_grad", 8, 56, 56, 256, 256, 3, F32, "cpu", "winograd"),
    ("input_grad", 8, 112, 112, 128, 128, 3, F32, "cpu", "xla"),
    ("input_grad", 8, 28, 28, 64, 512, 3, F32, "cpu", "winograd"),
    ("input_grad", 8, 28, 28, 512, 512, 3, BF16, "cpu", "xla"),
    # inference forward: im2col on 4x4 Winograd maps below 1024 batch pixels.
    ("inference", 63, 4, 4, 512, 512, 3, F32, "cpu", "im2col"),   # 1008 pixels
    ("inference", 64, 4, 4, 512, 512, 3, F32, "cpu", "winograd"),  # 1024
    ("inference", 8, 6, 6, 64, 64, 3, F32, "cpu", "winograd"),    # 36 px: not a tiny map
    ("inference", 8, 8, 8, 512, 512, 3, F32, "cpu", "winograd"),
    ("inference", 8, 4, 4, 63, 512, 3, F32, "cpu", "xla"),        # not Winograd-sized
    ("inference", 8, 56, 56, 256, 256, 3, F32, "cpu", "winograd"),
    ("inference", 8, 224, 224, 3, 64, 3, F32, "cpu", "xla"),
    # filter gradient: Winograd (128+ inputs, <= 112x112), blocked (>= 56x56), else XLA's.
    ("filter_grad", 8, 112, 112, 128, 128, 3, F32, "cpu", "winograd"),
    ("filter_grad", 8, 114, 114, 128, 128, 3, F32, "cpu", "blocked"),  # above 112x112
    ("filter_grad", 8, 112, 112, 127, 128, 3, F32, "cpu", "blocked"),  # < 128 input channels
    ("filter_grad", 8, 112, 112, 128, 63, 3, F32, "cpu", "blocked"),   # < 64 output channels
    ("filter_grad", 8, 28, 28, 512, 512, 3, F32, "cpu", "winograd"),
    ("filter_grad", 8, 4, 4, 512, 512, 3, F32, "cpu", "winograd"),
    ("filter_grad", 8, 2, 2, 512, 512, 3, F32, "cpu", "xla"),
    ("filter_grad", 8, 224, 224, 64, 64, 3, F32, "cpu", "blocked"),
    ("filter_grad", 8, 224, 224, 3, 64, 3, F32, "cpu", "blocked"),
    ("filter_grad", 8, 56, 56, 64, 64, 3, F32, "cpu", "blocked"),     # 56x56: the smallest blocked
    ("filter_grad", 8, 54, 54, 64, 64, 3, F32, "cpu", "xla"),
    ("filter_grad", 8, 28, 28, 64, 64, 3, F32, "cpu", "xla"),
    ("filter_grad", 8, 56, 56, 256, 256, 3, BF16, "cpu", "blocked"),  # fp32 only for Winograd
    ("filter_grad", 8, 28, 28, 512, 512, 3, BF16, "cpu", "xla"),
    ("filter_grad", 8, 56, 56, 256, 256, 1, F32, "cpu", "xla"),       # 1x1: no blocked loop
    ("filter_grad", 8, 56, 56, 256, 256, 5, F32, "cpu", "blocked"),
    ("filter_grad", 8, 112, 112, 128, 128, 3, F32, "xla", "xla"),
]


@pytest.mark.parametrize("pass_,n,h,w,c,d,ksize,dtype,impl,route", ROWS)
def test_route_table(pass_, n, h, w, c, d, ksize, dtype, impl, route):
    assert routing.conv_route(pass_, n, h, w, c, d, ksize=ksize, dtype=dtype, impl=impl) == route


def test_every_pass_and_route_is_in_the_table():
    assert {r[0] for r in ROWS} == set(routing.PASSES)
    assert {r[-1] for r in ROWS} == set(routing.ROUTES)


def test_unknown_pass_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown conv pass 'backward'"):
        routing.conv_route("backward", 8, 8, 8, 64, 64)
