"""A training run compiled ahead of time for a TPU slice, on a machine with no TPU (`vgg-flax compile`).

`compile_for_tpu(config, "v5e:2x4")` builds the run's programs exactly as `vgg-flax train` does
(`vgg_flax.train.programs.build_programs`: model, optimizer, shardings, donation, gradient
accumulation, remat), with the conv path resolved for "tpu", over libtpu's compile-only devices of the
slice (`jax.experimental.topologies`), and compiles the train and eval steps from the TrainState's
shapes (nothing is materialised). What XLA's TPU compiler says about each program
(`memory_analysis()`, `cost_analysis()`, the collectives in its HLO) is returned as a
`CompileReport`, beside the model's analytic FLOPs and roofline bounds from the chip's public figures
(`vgg_flax.train.tpu_slices`). Per-chip figures are per JAX device: one per chip, except TPU v4's
compile-only topology, which has one device per TensorCore (two per chip): its capacity, peak and
bandwidths are then per TensorCore (half a chip's).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import parallel
from vgg_flax.models.configs import parse_config, resolve_config
from vgg_flax.train import programs, tpu_slices

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


FIT_HINT = ("use a smaller per-chip batch (more chips or a smaller global_batch_size), "
            "--config.step.grad_accum_steps=N, --config.step.remat=True or --config.model.dtype=bfloat16")
_OOM = re.compile(r"required for ([\w ]+?) \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)")


class NoTpuCompilerError(RuntimeError):
    """libtpu (the `tpu` extra) is not installed."""


class DoesNotFitError(ValueError):
    """A compiled program needs more HBM per chip than the chip has."""


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its HLO op and the bytes of its result arrays."""

    op: str  # all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
    shapes: tuple[str, ...]  # e.g. ("f32[3,3,64,64]", ...)
    bytes: int


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """What the TPU compiler says about one program, per chip (per JAX device), and its bounds."""

    name: str  # "train_step" | "eval_step"
    chips: int  # JAX devices the program runs on
    batch_per_chip: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int
    capacity_bytes: int
    # XLA's counts per chip per step. With grad_accum_steps = k > 1 the micro-batches run in a while
    # loop whose body XLA's cost analysis counts once: its counts are multiplied by k here (the
    # optimizer update outside the loop, ~10 FLOPs per parameter, is then counted k times).
    flops: float
    analytic_flops: float  # from the model's config, per chip per step
    bytes_accessed: float
    collectives: tuple[Collective, ...]
    compile_seconds: float
    peak_flops: float  # FLOP/s per chip, bf16
    hbm_bandwidth: float  # bytes/s per chip
    allreduce_bandwidth: float  # bytes/s per chip (the pod's all-reduce bandwidth per chip)

    @property
    def total_bytes(self) -> int:
        """Peak HBM per chip: arguments + outputs not aliased to them + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def compute_seconds(self) -> float:
        """Step time if the chip ran XLA's FLOPs at its peak bf16 rate."""
        return self.flops / self.peak_flops

    @property
    def memory_seconds(self) -> float:
        """Step time if the chip moved XLA's bytes accessed at its HBM bandwidth."""
        return self.bytes_accessed / self.hbm_bandwidth

    @property
    def bound_seconds(self) -> float:
        """The roofline bound: the larger of the two."""
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def images_per_second(self) -> float:
        """Global images per second at the roofline bound."""
        return self.batch_per_chip * self.chips / self.bound_seconds

    @property
    def peak_fraction(self) -> float:
        """XLA's FLOPs at the bound as a fraction of the chip's peak (1 when compute-bound)."""
        return self.compute_seconds / self.bound_seconds

    def collective_bytes(self, op: str = "all-reduce") -> int:
        return sum(c.bytes for c in self.collectives if c.op == op)

    @property
    def allreduce_seconds(self) -> float:
        """The all-reduce time at the slice's all-reduce bandwidth per chip (ring: each chip sends
        and receives 2 (n - 1) / n times the reduced bytes)."""
        n = self.chips
        return 2 * (n - 1) / n * self.collective_bytes("all-reduce") / self.allreduce_bandwidth


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """A run compiled for a TPU slice: the slice, and one ProgramReport per program."""

    topology: str
    slice_name: str
    chip: str
    num_slices: int
    programs: tuple[ProgramReport, ...]
    versions: dict  # jax, jaxlib, libtpu: what a TPU VM must run to load a serialized executable

    def check_fits(self) -> None:
        """Raises DoesNotFitError (one line: the program, its size, what would make it fit)."""
        for p in self.programs:
            if not p.fits:
                raise DoesNotFitError(
                    f"{p.name} needs {p.total_bytes / 2**30:.2f} GiB per chip on {self.topology} "
                    f"({self.chip}, {p.capacity_bytes / 2**30:.0f} GiB per chip; batch {p.batch_per_chip} "
                    f"per chip): {FIT_HINT}")


def forward_flops(model, image_size: int, params) -> float:
    """Multiply-adds x 2 of one image's forward pass: the convs from the model's config (3x3 or
    KxK "same", the map halved by each max-pool) and the head's layers from their kernels (Dense:
    in x out; a head conv (head "dense"): its kernel over the final map, "valid"). BatchNorm, ReLU,
    LRN, pooling and the loss are not counted (elementwise, < 1% of VGG16's).

    params: the model's parameters (arrays or ShapeDtypeStructs). Returns FLOPs per image.
    """
    side, channels, flops = image_size, 3, 0.0
    for entry in resolve_config(parse_config(model.config)):
        if entry == "M":
            side //= 2
        elif entry != "LRN":
            width, k = entry if isinstance(entry, tuple) else (entry, 3)
            flops += 2.0 * side * side * k * k * channels * width
            channels = width
    for name, layer in params.items():
        kernel = layer.get("kernel") if isinstance(layer, dict) else None
        if kernel is None or name.startswith("conv"):
            continue
        shape = kernel.shape
        positions = 1 if len(shape) == 2 else max(side - shape[0] + 1, 1) * max(side - shape[1] + 1, 1)
        flops += 2.0 * positions * math.prod(shape)
    return flops


def train_flops(model, image_size: int, params) -> float:
    """One training step's FLOPs per image: forward, input gradient and filter gradient (3x the
    forward), less the first conv's input gradient, which nothing needs (the image is no parameter)."""
    entries = resolve_config(parse_config(model.config))
    first = next(e for e in entries if e not in ("M", "LRN"))
    width, k = first if isinstance(first, tuple) else (first, 3)
    return 3 * forward_flops(model, image_size, params) - 2.0 * image_size**2 * k * k * 3 * width


def array_bytes(dtype: str, dims: str) -> int:
    """Bytes of an HLO array type: dtype "bf16", dims "3,3,64" ("" for a scalar)."""
    return _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)


def parse_collectives(hlo_text: str) -> tuple[Collective, ...]:
    """The collectives of a compiled HLO module (`compiled.as_text()`), with their result arrays.

    Async pairs count once (the "-start" op; its tuple result holds the operands too, so for
    all-gather and collective-permute only the last array, the result, is counted).
    """
    found = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shapes = [(dt, dims) for dt, dims in _ARRAY.findall(m.group(1))]
        if m.group(3) and m.group(2) != "all-reduce" and len(shapes) > 1:
            shapes = shapes[-1:]
        size = sum(array_bytes(dt, dims) for dt, dims in shapes)
        found.append(Collective(m.group(2), tuple(f"{dt}[{dims}]" for dt, dims in shapes), size))
    return tuple(found)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def num_classes_of(config) -> int:
    """config.data.num_classes, or the dataset's: from its prepared files, else (a TFDS dataset not
    downloaded here, e.g. imagenet2012 on a laptop) from the TFDS builder's static metadata."""
    if config.data.num_classes:
        return int(config.data.num_classes)
    from vgg_flax.data import sources

    name, data_dir = config.data.dataset, config.data.data_dir or None
    absl_logger = logging.getLogger("absl")  # TFDS warns when the data is not here: expected
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        try:
            return int(sources.dataset_info(name, data_dir=data_dir).num_classes)
        except FileNotFoundError:
            import tensorflow_datasets as tfds

            return int(tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes)
    finally:
        absl_logger.setLevel(level)


def slice_mesh(tpu_slice: tpu_slices.Slice, num_slices: int = 1, *, quiet: bool = True):
    """(the data-parallel mesh over the slice's compile-only devices, the process count)."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise NoTpuCompilerError("compiling for a TPU needs libtpu, the TPU compiler: pip install "
                                 "'vgg-flax[tpu]' (jax[tpu] at the installed jax's version; Linux x86-64)")

    tpu_slices.set_compile_only_environment(tpu_slice, quiet=quiet)
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    topology = topologies.get_topology_desc(topology_name=tpu_slice.topology, platform="tpu", **kwargs)
    devices = topology.devices
    return parallel.create_mesh(devices), len({d.process_index for d in devices})


def _batch_structs(mesh, batch_size: int, image_size: int) -> dict:
    sharding = parallel.batch_sharding(mesh)
    return {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32,
                                          sharding=sharding),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharding)}


def _binary(xla_size: str) -> str:
    """XLA's human-readable size ("52.75G": binary units) as "52.75 GiB"."""
    unit = xla_size[-1] if xla_size[-1].isalpha() else ""
    return f"{xla_size.rstrip(unit)} {unit + 'i' if unit else ''}B"


def _compile(step, args: tuple, *, name: str, where: str):
    """(compiled, seconds); XLA's out-of-memory error as a one-line DoesNotFitError."""
    t0 = time.perf_counter()
    try:
        compiled = step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        m = _OOM.search(str(err))
        need = (f"{_binary(m.group(2))} of {m.group(1)}, {_binary(m.group(3))} available" if m
                else "more HBM than the chip has")
        raise DoesNotFitError(f"{name} does not fit on {where}: XLA needs {need} per chip; "
                              f"{FIT_HINT}") from None
    return compiled, time.perf_counter() - t0


def _program_report(name, compiled, seconds, *, chips, batch, analytic, spec, per_chip, trips):
    mem, cost = compiled.memory_analysis(), _cost(compiled)
    return ProgramReport(
        name=name, chips=chips, batch_per_chip=batch // chips,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        capacity_bytes=int(spec.hbm_bytes / per_chip), flops=trips * float(cost.get("flops", 0.0)),
        analytic_flops=analytic * batch / chips,
        bytes_accessed=trips * float(cost.get("bytes accessed", 0.0)),
        collectives=parse_collectives(compiled.as_text()), compile_seconds=seconds,
        peak_flops=spec.peak_bf16_flops / per_chip, hbm_bandwidth=spec.hbm_gbps * 1e9 / per_chip,
        allreduce_bandwidth=spec.allreduce_gbps * 1e9 / per_chip)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"jax": jax.__version__, "jaxlib": md.version("jaxlib")}
    try:
        out["libtpu"] = md.version("libtpu")
    except md.PackageNotFoundError:
        pass
    return out


def compile_for_tpu(config, topology: str, *, num_slices: int = 1, num_classes: int | None = None,
                    programs_to_compile=("train_step", "eval_step"), keep_executables: bool = False,
                    quiet: bool = True):
    """Compiles the run `config` describes for a TPU slice, with no TPU: a `CompileReport`.

    Args:
      config: a training config (`vgg-flax train`'s: configs/default.py's keys).
      topology: a libtpu topology name ("v5e:2x4") or Cloud slice name ("v5e-8"); see
        `vgg_flax.train.tpu_slices.SLICES`.
      num_slices: a multislice run over this many copies of the slice (data parallel across them).
      num_classes: the classifier width (default: `num_classes_of(config)`).
      programs_to_compile: any of "train_step", "eval_step".
      keep_executables: also return {name: compiled executable} (for serialization).
      quiet: set the environment that keeps libtpu's no-TPU warnings off the console.
    Raises:
      KeyError (unknown topology, listing the valid ones); ValueError (a batch that does not divide
      over the slice's chips: `vgg-flax train`'s message). Does not check the fit: `check_fits`.
    """
    tpu_slice = tpu_slices.get_slice(topology)
    mesh, num_processes = slice_mesh(tpu_slice, num_slices, quiet=quiet)
    programs.check_batches(config, num_devices=mesh.size, num_processes=num_processes)
    built = programs.build_programs(config, mesh, num_classes=num_classes or num_classes_of(config),
                                    platform="tpu", device_memory=int(tpu_slice.spec.hbm_bytes))
    image_size = config.data.image_size
    state = programs.abstract_state(built.model, built.tx, image_size=image_size,
                                    state_sharding=built.state_sharding)
    chips = mesh.size
    per_chip = chips / len({tuple(d.coords) for d in np.ravel(mesh.devices)}) / num_slices
    forward = forward_flops(built.model, image_size, state.params)
    train_batch, eval_batch = config.global_batch_size, config.eval.batch_size
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    plan = {"train_step": (built.train_step, (state, _batch_structs(mesh, train_batch, image_size)),
                           train_batch, train_flops(built.model, image_size, state.params),
                           config.step.grad_accum_steps),
            "eval_step": (built.evaluator.program("center"),
                          (variables, _batch_structs(mesh, eval_batch, image_size)["image"]),
                          eval_batch, forward, 1)}
    reports, executables = [], {}
    for name in programs_to_compile:
        step, args, batch, analytic, trips = plan[name]
        where = f"{tpu_slice.topology} ({tpu_slice.spec.name}, batch {batch // chips} per chip)"
        compiled, seconds = _compile(step, args, name=name, where=where)
        reports.append(_program_report(name, compiled, seconds, chips=chips, batch=batch,
                                       analytic=analytic, spec=tpu_slice.spec, per_chip=per_chip,
                                       trips=trips))
        executables[name] = compiled
    report = CompileReport(topology=tpu_slice.topology, slice_name=tpu_slice.name,
                           chip=tpu_slice.spec.name, num_slices=num_slices, programs=tuple(reports),
                           versions=_versions())
    return (report, executables) if keep_executables else report
