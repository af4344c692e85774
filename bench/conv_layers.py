"""VGG16's 3x3 convs one at a time: forward + input gradient, ours vs XLA's conv vs PyTorch eager.

    .venv/bin/python bench/conv_layers.py [--batch 32] [--repeats 3] [--layers 112x128x128,...]

The passes attribution methods run (saliency, Integrated Gradients: no filter gradient). Each layer
is a jitted `jax.vjp` of the conv w.r.t. its input, on the CPU conv path (`vgg_flax.ops.conv`, what a
VGG on the CPU uses) and on plain `lax.conv_general_dilated`, beside torch's `conv2d` with
`autograd.grad` on the input; calls interleaved, medians. Where the time of an IG call goes, layer by
layer (docs/PERFORMANCE.md, "Attribution").
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (map side, channels in, channels out) of VGG16's convs at 224 px, each shape once.
LAYERS = [(224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256),
          (56, 256, 256), (28, 256, 512), (28, 512, 512), (14, 512, 512)]


def _jax_pass(conv):
    import jax

    def f(x, k, g):
        y, vjp = jax.vjp(lambda x_: conv(x_, k, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")), x)
        return y, vjp(g)[0]

    jitted = jax.jit(f)
    return lambda *a: jax.block_until_ready(jitted(*a))


def _layer_fns(side, c, d, batch):
    import jax
    import torch

    from vgg_flax.ops import conv as cpu_conv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, side, side, c)).astype(np.float32)
    k = (0.05 * rng.normal(size=(3, 3, c, d))).astype(np.float32)
    g = rng.normal(size=(batch, side, side, d)).astype(np.float32)
    ours, xla = _jax_pass(cpu_conv.make_conv_general_dilated("cpu")), _jax_pass(jax.lax.conv_general_dilated)
    xj, kj, gj = (jax.numpy.asarray(a) for a in (x, k, g))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    tk = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())

    def torch_pass():
        return torch.autograd.grad(torch.nn.functional.conv2d(tx, tk, padding=1), tx, tg)

    return {"ours": lambda: ours(xj, kj, gj), "xla": lambda: xla(xj, kj, gj), "torch": torch_pass}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", help="comma-separated SIDExCINxCOUT (default: all of VGG16's)")
    args = p.parse_args(argv)
    layers = LAYERS if not args.layers else [tuple(map(int, s.split("x"))) for s in args.layers.split(",")]
    print(common.header(sys.argv))
    rows = [["map, channels", "ours (CPU path)", "XLA conv", "torch", "torch / ours"]]
    for side, c, d in layers:
        times = common.interleaved(_layer_fns(side, c, d, args.batch), warmup=1, repeats=args.repeats)
        med = {name: common.median(t) for name, t in times.items()}
        rows.append([f"{side}, {c} -> {d}", *(f"{med[n] * 1e3:,.0f} ms" for n in ("ours", "xla", "torch")),
                     f"{med['torch'] / med['ours']:.2f}"])
        print(f"  {rows[-1]}", flush=True)
    print(f"VGG16 convs, forward + input gradient, batch {args.batch}, median of {args.repeats}")
    print(common.fmt_table(rows))


if __name__ == "__main__":
    main()
