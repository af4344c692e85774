"""LPIPS throughput on this machine: vgg_flax.perceptual vs the `lpips` package in PyTorch eager.

    .venv/bin/python bench/lpips_speed.py [--batch 4] [--size 64] [--repeats 10]

Both get the same random VGG16 trunk (lpips' pnet_rand, handed to ours as torchvision weights), the
package's linear layers and the same image pairs. Timed: the forward distance, and forward + the
gradient w.r.t. the first image (torch: autograd with the trunk frozen, as lpips builds it). Ours
is jitted once (compile time reported apart); calls are interleaved (A B A B) so both run under the
same background load; medians of the repeats, images per second = batch / median seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    import jax
    import lpips
    import torch

    from vgg_flax import perceptual

    print(common.header(sys.argv))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    trunk = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in ref.net.state_dict().items()}
    fn, variables = perceptual.load_lpips(trunk)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, 3)
    x, y = (rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(2))
    tx, ty = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, y))

    fwd = jax.jit(fn)
    grad = jax.jit(jax.value_and_grad(lambda a, b: fn(variables, a, b).sum()))
    for name, f in (("forward", lambda: fwd(variables, x, y)), ("forward+grad", lambda: grad(x, y))):
        start = time.perf_counter()
        jax.block_until_ready(f())
        print(f"ours {name}: compile + first call {time.perf_counter() - start:.2f} s")

    def torch_fwd():
        with torch.no_grad():
            return ref(tx, ty)

    def torch_grad():
        a = tx.clone().requires_grad_(True)
        ref(a, ty).sum().backward()
        return a.grad

    fns = {"ours forward": lambda: jax.block_until_ready(fwd(variables, x, y)),
           "lpips forward": torch_fwd,
           "ours forward+grad": lambda: jax.block_until_ready(grad(x, y)),
           "lpips forward+grad": torch_grad}
    times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    print(f"batch {args.batch} pairs of {args.size}x{args.size}, {args.repeats} repeats (median)")
    for name, t in times.items():
        m = common.median(t)
        print(f"  {name:20s} {m * 1e3:8.1f} ms  {args.batch / m:8.1f} pairs/s")
    for what in ("forward", "forward+grad"):
        ratio = common.median(times[f"lpips {what}"]) / common.median(times[f"ours {what}"])
        print(f"  {what}: ours is {ratio:.2f}x the lpips package's throughput")


if __name__ == "__main__":
    main()
