"""Seconds and peak memory to convert VGG16 (138M parameters) from .pth and from .safetensors.

    .venv/bin/python bench/convert.py [--model vgg16] [--repeats 3]

Random torchvision weights are saved to a temporary directory in both formats; each conversion runs
in a fresh process (so its peak RSS is its own) that imports everything first, records its resident
memory as the baseline, then calls `vgg_flax.load_torchvision(path)` and blocks until the arrays
exist. Reported: median seconds over the repeats, and peak RSS above the baseline (VmHWM - VmRSS
before the call) as a multiple of the weights' size. The file was just written, so it is read from
the page cache: the figures exclude disk speed. The sha256 of the file (done by `vgg-flax convert`
and for hash-prefixed names) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(path: str) -> None:
    """One conversion in this process; prints a JSON line."""
    import jax

    import vgg_flax

    if path.endswith(".pth"):
        import torch  # noqa: F401  (imported before the baseline: it is the reader, not the data)
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    model, variables = vgg_flax.load_torchvision(path)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_mib": baseline / 1024,
                      "peak_above_mib": (_status_kib("VmHWM") - baseline) / 1024,
                      "params": vgg_flax.count_params(variables)}))


def _run_child(path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _header(argv: list[str]) -> str:
    import jax
    import torch

    return (f"command: {' '.join([sys.executable, *argv])}\n"
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}, jax {jax.__version__}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import torch
    import torchvision
    from safetensors.torch import save_file

    from vgg_flax.convert import weights

    print(_header(sys.argv))
    state = getattr(torchvision.models, args.model)().state_dict()
    size_mib = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"pth": os.path.join(tmp, f"{args.model}.pth"),
                 "safetensors": os.path.join(tmp, f"{args.model}.safetensors")}
        torch.save(state, paths["pth"])
        save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
        del state
        print(f"\n{args.model}: weights {size_mib:.0f} MiB (fp32)\n")
        print(f"| source | seconds (median of {args.repeats}) | peak RSS above baseline | x weights |")
        print("|---|---|---|---|")
        for fmt, path in paths.items():
            runs = [_run_child(path) for _ in range(args.repeats)]
            secs = statistics.median(r["seconds"] for r in runs)
            peak = max(r["peak_above_mib"] for r in runs)
            print(f"| .{fmt} | {secs:.2f} | {peak:.0f} MiB | {peak / size_mib:.2f} |")
        start = time.perf_counter()
        weights.file_sha256(paths["pth"])
        print(f"\nsha256 of the .pth (hash-prefix check, `vgg-flax convert`): "
              f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
