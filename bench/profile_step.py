"""Where a VGG training step's time goes, on this backend: the whole step taken apart.

Two views, both timed with the library's model:
  1. whole-program ablation: forward only; forward + every input gradient (grad w.r.t. the image,
     so no filter gradients); forward + input + filter gradients (grad w.r.t. image and params).
     The differences are the backward passes' shares *inside* the fused, jitted step.
  2. per-layer: forward, input gradient and filter gradient of each distinct conv of the network,
     each jitted alone, with GFLOP/s.
Each is run for every `--conv` implementation asked for, interleaved.

  python bench/profile_step.py --model vgg16 --batch 8 --image-size 224 --impls xla,cpu
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--impls", default="xla,cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-ablation", action="store_true")
    return p.parse_args(argv)


def ablation_fns(name, impl, args):
    import jax
    import jax.numpy as jnp

    import vgg_flax

    model = vgg_flax.get_model(name, conv_impl=impl)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (args.batch, args.image_size, args.image_size, 3), np.float32))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    rngs = {"dropout": jax.random.key(1)}

    def loss(params, image):
        out, _ = model.apply({**variables, "params": params}, image, train=True,
                             mutable=["batch_stats"], rngs=rngs)
        return out.sum()

    fwd = jax.jit(loss)
    dx = jax.jit(jax.grad(loss, argnums=1))
    full = jax.jit(jax.grad(loss, argnums=(0, 1)))
    p = variables["params"]
    return {"forward": lambda: jax.block_until_ready(fwd(p, x)),
            "forward+dx": lambda: jax.block_until_ready(dx(p, x)),
            "forward+dx+dW": lambda: jax.block_until_ready(full(p, x))}


def conv_shapes(name, size):
    from vgg_flax.models import MODELS, resolve_config

    shapes, c = [], 3
    for e in resolve_config(MODELS[name].keywords["config"]):
        if e == "M":
            size //= 2
        elif e != "LRN":
            d, k = e if isinstance(e, tuple) else (e, 3)
            shapes.append((size, c, d, k))
            c = d
    return shapes


def layer_fns(shape, impl, batch):
    import jax

    from vgg_flax.ops import conv

    h, c, d, k = shape
    f = conv.make_conv_general_dilated(impl)
    p = k // 2
    apply = lambda x, w: f(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, h, h, c))
    w = jax.random.normal(kw, (k, k, c, d)) * 0.05
    g = jax.random.normal(kg, (batch, h, h, d))
    fwd = jax.jit(apply)
    dx = jax.jit(lambda x, w, g: jax.vjp(apply, x, w)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(apply, x, w)[1](g)[1])
    return {"fwd": lambda: fwd(x, w).block_until_ready(),
            "dx": lambda: dx(x, w, g).block_until_ready(),
            "dW": lambda: dw(x, w, g).block_until_ready()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    print(common.header([sys.argv[0], *argv]), flush=True)
    impls = args.impls.split(",")
    if not args.skip_ablation:
        fns = {}
        for impl in impls:
            for part, fn in ablation_fns(args.model, impl, args).items():
                fns[f"{impl} {part}"] = fn
        times = common.interleaved(fns, warmup=1, repeats=args.repeats)
        print(f"\n{args.model}, batch {args.batch}, {args.image_size}px: whole program (median seconds)")
        for impl in impls:
            t = [common.median(times[f"{impl} {p}"]) for p in ("forward", "forward+dx", "forward+dx+dW")]
            print(f"  conv {impl}: forward {t[0]:.2f}  +input grads {t[1] - t[0]:.2f}  "
                  f"+filter grads {t[2] - t[1]:.2f}  = {t[2]:.2f} s "
                  f"(filter grads {100 * (t[2] - t[1]) / t[2]:.0f}%)")
    if args.skip_layers:
        return 0
    print(f"\nper conv, batch {args.batch}: median ms (GFLOP/s)")
    totals = {impl: np.zeros(3) for impl in impls}
    for shape in conv_shapes(args.model, args.image_size):
        h, c, d, k = shape
        flop = 2 * args.batch * h * h * c * d * k * k / 1e9
        fns = {f"{impl} {p}": fn for impl in impls for p, fn in layer_fns(shape, impl, args.batch).items()}
        times = common.interleaved(fns, warmup=1, repeats=args.repeats)
        line = f"  {h:3d}px {c:4d}->{d:4d} k{k}:"
        for impl in impls:
            t = np.array([common.median(times[f"{impl} {p}"]) for p in ("fwd", "dx", "dW")])
            totals[impl] += t
            line += f"  [{impl}] " + " ".join(f"{p} {1e3 * v:.0f} ({flop / v:.0f})"
                                               for p, v in zip(("fwd", "dx", "dW"), t, strict=True))
        print(line, flush=True)
    for impl in impls:
        t = totals[impl]
        print(f"  sum [{impl}]: fwd {t[0]:.2f} s, dx {t[1]:.2f} s, dW {t[2]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
