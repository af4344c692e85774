"""Data parallelism over all devices of all processes: the mesh, shardings, process-local data.

One 1-D mesh with a "data" axis (jit over a `Mesh`, not pmap): a batch is sharded on "data", parameters
and optimizer state are replicated, and XLA inserts the collectives. Each process feeds its own
contiguous rows of every global batch, and every process must run the same number of steps of a
collective program: the input pipeline's evaluation streams give every process the same number of
batches (all-masked ones after a shorter share), so evaluation never deadlocks. Training
(`vgg_flax.train`) and evaluation (`vgg_flax.evaluation`) share these helpers; a "model" axis would be
added to `create_mesh` and `replicated` here.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
    """`jax.distributed.initialize()` for multi-process runs (before any other JAX call).

    With no arguments JAX finds the cluster itself (Cloud TPU, SLURM, Open MPI, Kubernetes) or reads
    JAX_COORDINATOR_ADDRESS; JAX_NUM_PROCESSES and JAX_PROCESS_ID complete a hand-made cluster.
    """
    if not enabled:
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or `devices`), axis "data"."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divides(*, global_batch_size: int, num_devices: int, grad_accum_steps: int = 1,
                        num_processes: int = 1) -> None:
    """Raises a ValueError, before any compute, when the global batch cannot be split evenly."""
    for what, n in [("devices", num_devices), ("processes", num_processes)]:
        if global_batch_size % n:
            raise ValueError(f"global batch size {global_batch_size} does not divide over {n} {what}; "
                             f"use a multiple of {n}")
    per_device = global_batch_size // num_devices
    if grad_accum_steps < 1 or per_device % grad_accum_steps:
        raise ValueError(f"per-device batch {per_device} (global {global_batch_size} / {num_devices} "
                         f"devices) does not divide into grad_accum_steps={grad_accum_steps} micro-batches")


def global_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global array, sharded on "data", whose rows of this process are `local` (each process
    holds a contiguous, equal slice: the global batch is `local.shape[0] * process_count` rows)."""
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, shape)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """`global_array` of every entry of a batch dict ({"image", "label", "mask"})."""
    return {k: global_array(v, mesh) for k, v in local.items()}


def local_rows(out: jax.Array, mesh: Mesh | None) -> np.ndarray:
    """This process's rows of an output sharded on "data" (the inverse of `global_array`), as numpy."""
    if mesh is None or jax.process_count() == 1:
        return np.asarray(out)
    return np.asarray(multihost_utils.global_array_to_host_local_array(out, mesh, P(DATA_AXIS)))


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Elementwise sum of `values` (the same shape on every process) over all processes."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
