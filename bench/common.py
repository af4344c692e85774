"""Shared benchmark helpers: machine facts, the fp32 matmul ceiling, timing and FLOP counts.

Everything here blocks until results are ready and reports medians, so that one slow repeat (another
process on the machine, a page fault) does not decide a figure.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable


def block_imports(names: list[str]) -> None:
    """From now on each of `names` is absent: `import name` raises ModuleNotFoundError and
    `importlib.util.find_spec(name)` returns None, as on a machine without it (`sys.modules[name]`
    set to None, Python's documented way to halt an import).

    Why: the GPU machine has no tensorflow and no ml_collections; the dry run on a machine that has
    them proves that nothing the benchmark touches needs them. Raises if one is already imported.
    """
    loaded = sorted(n for n in names if sys.modules.get(n) is not None)
    if loaded:
        raise RuntimeError(f"already imported before blocking: {loaded}")
    for name in names:
        sys.modules[name] = None


def header(argv: list[str]) -> str:
    """The machine, the library versions and the command that reproduces this run."""
    import jax
    import jaxlib

    lines = [f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *argv])}",
             f"machine: {platform.node()} {platform.machine()} {cpu_model()}, "
             f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f}",
             f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
             f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})",
             f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
             f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"]
    try:
        import torch
        import torchvision

        lines.append(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                     f"torch threads {torch.get_num_threads()}")
    except ImportError:
        lines.append("torch: not installed")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_call(fn: Callable[[], object]) -> float:
    """Seconds for one call of `fn`, which must block until its results exist."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, list]:
    """Times each function `repeats` times in turn (A B A B ...) after `warmup` untimed calls each.

    Interleaving puts both frameworks under the same background load, so their ratio is fairer than
    that of two separate runs.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return times


def blocked(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, list]:
    """Times each function `repeats` times back to back (A A A B B B), after its own warm-up.

    The counterpart of `interleaved`: on the 2-core VM a VGG16 step right after the other
    framework's ran 1-1.5 s slower (page-fault time of freshly mapped memory; docs/PERFORMANCE.md),
    so each framework alone is measured too.
    """
    times: dict[str, list] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        times[name] = [time_call(fn) for _ in range(repeats)]
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_gflops(*, size: int = 4096, repeats: int = 3, dtype: str = "float32") -> float:
    """The device's practical ceiling: GFLOP/s of one large jitted matmul (median of repeats)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    seconds = median([time_call(lambda: mm(a, b).block_until_ready()) for _ in range(repeats)])
    return 2 * size**3 / seconds / 1e9


def vgg_forward_macs(config, *, image_size: int, num_classes: int, head: str = "torchvision",
                     fc_width: int = 4096, small_head_width: int = 512) -> int:
    """Multiply-accumulates of one image's forward pass (convs and FC layers; pools, ReLU, BN ignored).

    For VGG16 at 224 this gives torchvision's documented 15.47 GMACs.
    """
    from vgg_flax.models import FC_POOL_SIZE, resolve_config

    macs, size, channels = 0, image_size, 3
    for entry in resolve_config(config):
        if entry == "M":
            size //= 2
        elif entry != "LRN":
            width, k = entry if isinstance(entry, tuple) else (entry, 3)
            macs += size * size * k * k * channels * width
            channels = width
    if head == "torchvision":
        fc_in = FC_POOL_SIZE[0] * FC_POOL_SIZE[1] * channels
        macs += fc_in * fc_width + fc_width * fc_width + fc_width * num_classes
    elif head == "small":
        hidden = small_head_width or num_classes
        macs += channels * hidden + (hidden * num_classes if small_head_width else 0)
    return macs


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fmt_table(rows: list[list[str]]) -> str:
    """A Markdown table from rows of strings (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)

