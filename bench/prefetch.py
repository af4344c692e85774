"""Device prefetch overlap: train steps/s with a deliberately slow host iterator, with and without
`vgg_flax.train.prefetch.to_device`.

    .venv/bin/python bench/prefetch.py --host-ms 30 --steps 40

The host side sleeps `--host-ms` per batch (a stand-in for decoding); the step is a jitted matmul
chain sized to take about as long. Without prefetch a step waits for its batch; with it the next
batches are built and transferred while the step runs, so steps/s approaches 1 / max(host, step).
Each step is waited for, as a loop that reads every step's loss does (JAX's asynchronous dispatch
alone overlaps one batch with one step only while nothing waits).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py: machine header)


def slow_batches(host_ms: float, batch: int, width: int):
    rng = np.random.default_rng(0)
    while True:
        time.sleep(host_ms / 1000)
        yield {"x": rng.standard_normal((batch, width), dtype=np.float32)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-ms", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8, help="matmuls per step (sets the step time)")
    parser.add_argument("--size", type=int, default=2, help="prefetch queue size")
    args = parser.parse_args(argv[1:])
    print(common.header(argv))
    import jax
    import jax.numpy as jnp

    from vgg_flax.train import prefetch

    w = jnp.eye(args.width) * 0.5

    @jax.jit
    def step(x):
        for _ in range(args.depth):
            x = jnp.tanh(x @ w)
        return x.sum()

    put = lambda b: jax.device_put(b["x"])
    step(put(next(slow_batches(0, 64, args.width)))).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        step(put(next(slow_batches(0, 64, args.width)))).block_until_ready()
    print(f"step alone {1000 * (time.perf_counter() - t) / 10:.1f} ms, host {args.host_ms:.1f} ms per batch")
    for name in ("no prefetch", f"prefetch size {args.size}"):
        source = slow_batches(args.host_ms, 64, args.width)
        plain = name == "no prefetch"
        batches = map(put, source) if plain else prefetch.to_device(source, put, size=args.size)
        step(next(batches)).block_until_ready()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(next(batches)).block_until_ready()  # A loop that reads each step's loss.
        print(f"{name:<18} {args.steps / (time.perf_counter() - start):6.1f} steps/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
