"""Cloud TPU slices known to `vgg-flax compile`: their topology names and each chip's public figures.

Sources (Google Cloud's TPU pages, read 2026-12-06):
  v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, all-reduce
       bandwidth per pod 1.1 PB/s over 4096 chips; two TensorCores per chip.
  v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, 400 GB/s
       bidirectional ICI per chip, all-reduce bandwidth per pod 51.2 TB/s over 256 chips.
  v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s
       bidirectional ICI per chip (no per-pod all-reduce figure: half the bidirectional figure, the
       ratio v5e's and v6e's pages give).
  v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, 800 GB/s
       bidirectional ICI per chip, all-reduce bandwidth per pod 102.4 TB/s over 256 chips.
HBM capacities are taken as binary (GiB), as the chips' stacks are. Topology names are libtpu's
(`jax.experimental.topologies.get_topology_desc`), as MaxText's train_compile uses them; every one
below was checked against libtpu 0.0.42.1.
"""

from __future__ import annotations

import dataclasses
import os

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's public figures. allreduce_gbps: the pod's all-reduce bandwidth per chip (GB/s)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_gbps: float  # GB/s
    ici_bidir_gbps: float | None  # GB/s, bidirectional per chip (None: not published)
    allreduce_gbps: float
    source: str


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200, None, 1.1e6 / 4096,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819, 400, 51.2e3 / 256,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765, 1200, 1200 / 2,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1638, 800, 102.4e3 / 256,
                "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice: its Cloud name (accelerator type), libtpu topology name and chip."""

    name: str  # the accelerator type, e.g. "v5litepod-8" is sold as "v5e-8"
    topology: str
    chip: str  # a key of CHIPS
    accelerator_type: str

    @property
    def spec(self) -> Chip:
        return CHIPS[self.chip]


# Keyed by topology name (what --topology takes); the slice names are Google Cloud's.
SLICES = {s.topology: s for s in (
    Slice("v4-8", "v4:2x2x1", "v4", "v4-8"),
    Slice("v4-16", "v4:2x2x2", "v4", "v4-16"),
    Slice("v5e-4", "v5e:2x2", "v5e", "v5litepod-4"),
    Slice("v5e-8", "v5e:2x4", "v5e", "v5litepod-8"),
    Slice("v5e-16", "v5e:4x4", "v5e", "v5litepod-16"),
    Slice("v5e-256", "v5e:16x16", "v5e", "v5litepod-256"),
    Slice("v5p-8", "v5:2x2x1", "v5p", "v5p-8"),
    Slice("v6e-4", "v6e:2x2", "v6e", "v6e-4"),
    Slice("v6e-8", "v6e:2x4", "v6e", "v6e-8"),
    Slice("v6e-256", "v6e:16x16", "v6e", "v6e-256"),
)}


def get_slice(topology: str) -> Slice:
    """The slice of a topology name ("v5e:2x4") or Cloud name ("v5e-8"); KeyError listing both."""
    if topology in SLICES:
        return SLICES[topology]
    for s in SLICES.values():
        if topology == s.name:
            return s
    valid = ", ".join(f"{s.topology} ({s.name})" for s in SLICES.values())
    raise KeyError(f"unknown TPU topology {topology!r}; valid: {valid}")


def compile_only_environment(tpu_slice: Slice, *, quiet: bool = True) -> dict[str, str]:
    """The environment libtpu needs to compile with no TPU attached.

    ALLOW_MULTIPLE_LIBTPU_LOAD lets several compile-only processes load libtpu at once (there are no
    chips to share; without it a second process fails on /tmp/libtpu_lockfile). quiet: also
    TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES, without which libtpu prints warnings and an
    error line at load. Effective before libtpu loads, i.e. before the process's first topology.
    """
    env = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"}
    if quiet:
        env.update(TPU_ACCELERATOR_TYPE=tpu_slice.accelerator_type, TPU_WORKER_HOSTNAMES="localhost")
    return env


def set_compile_only_environment(tpu_slice: Slice, *, quiet: bool = True) -> None:
    """`compile_only_environment`'s variables, where the environment does not set them already."""
    for key, value in compile_only_environment(tpu_slice, quiet=quiet).items():
        os.environ.setdefault(key, value)
