"""Seconds and peak memory to convert VGG16 (138M parameters): the torch-free .pth reader against
torch.load, on torch's legacy and zip formats, and from .safetensors.

    .venv/bin/python bench/convert.py [--model vgg16] [--repeats 3] [--dir /tmp]

Random torchvision weights are saved to a temporary directory (under --dir) as a legacy (pre-1.6,
like torchvision's 2017 VGG files) and a zip .pth and a .safetensors; each conversion runs in a
fresh process (so its peak RSS is its own) that imports everything first, records its resident
memory as the baseline, then either calls `vgg_flax.load_torchvision(path)` (the torch-free
reader) or `vgg_flax.load_torchvision(torch.load(path, weights_only=True))` (the torch path) and
blocks until the arrays exist. Reported: median seconds over the repeats, and peak RSS above the
baseline (VmHWM - VmRSS before the call) as a multiple of the weights' size. The file was just
written, so it is read from the page cache: the figures exclude disk speed. The sha256 of the file
(done by `vgg-flax convert` and for hash-prefixed names) is timed apart.
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


def child(path: str, reader: str) -> None:
    """One conversion in this process; prints a JSON line."""
    import jax

    import vgg_flax

    if reader == "torch":
        import torch  # imported before the baseline: it is the reader, not the data
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    source = torch.load(path, map_location="cpu", weights_only=True) if reader == "torch" else path
    model, variables = vgg_flax.load_torchvision(source)
    del source
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_mib": baseline / 1024,
                      "peak_above_mib": (_status_kib("VmHWM") - baseline) / 1024,
                      "params": vgg_flax.count_params(variables)}))


def _run_child(path: str, reader: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path, "--reader", reader],
                         capture_output=True, text=True, check=True)
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
    parser.add_argument("--dir", default=None, help="where the temporary files go (default: $TMPDIR)")
    parser.add_argument("--child")
    parser.add_argument("--reader", default="vgg_flax", choices=("vgg_flax", "torch"))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.reader)

    import torch
    import torchvision
    from safetensors.torch import save_file

    from vgg_flax.convert import hashing

    print(_header(sys.argv))
    state = getattr(torchvision.models, args.model)().state_dict()
    size_mib = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = {"legacy": os.path.join(tmp, f"{args.model}_legacy.pth"),
                 "zip": os.path.join(tmp, f"{args.model}_zip.pth"),
                 "safetensors": os.path.join(tmp, f"{args.model}.safetensors")}
        torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
        torch.save(state, paths["zip"])
        save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
        del state
        print(f"\n{args.model}: weights {size_mib:.0f} MiB (fp32)\n")
        print(f"| source | reader | seconds (median of {args.repeats}) | peak RSS above baseline "
              "| x weights |")
        print("|---|---|---|---|---|")
        cases = [("legacy", "vgg_flax"), ("legacy", "torch"), ("zip", "vgg_flax"), ("zip", "torch"),
                 ("safetensors", "vgg_flax")]
        for fmt, reader in cases:
            runs = [_run_child(paths[fmt], reader) for _ in range(args.repeats)]
            secs = statistics.median(r["seconds"] for r in runs)
            peak = max(r["peak_above_mib"] for r in runs)
            name = "torch.load(weights_only=True)" if reader == "torch" else "vgg_flax (torch-free)"
            print(f"| {fmt} | {name} | {secs:.2f} | {peak:.0f} MiB | {peak / size_mib:.2f} |")
        start = time.perf_counter()
        hashing.file_sha256(paths["zip"])
        print(f"\nsha256 of the .pth (hash-prefix check, `vgg-flax convert`): "
              f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
