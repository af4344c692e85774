r"""`vgg-flax compile`: a training run compiled ahead of time for a TPU slice, on a machine with no TPU.

    vgg-flax compile --config imagenet_vgg16 --topology v5e:2x4
    vgg-flax compile --config imagenet_vgg16 --topology v5e-256 --config.global_batch_size=8192
    vgg-flax compile --config vgg19 --topology v6e:2x4 --config.step.remat=True --out vgg19.exe

`--config NAME|FILE` and `--config.KEY=VALUE` are `vgg-flax train`'s (the same resolution,
`vgg_flax.cli.train_app`). Prints, per program (train step, eval step), what XLA's TPU compiler says
(`vgg_flax.train.aot.compile_for_tpu`). Exit status 2 with one line when the run would not fit in
the chips' HBM, when the batch does not divide over the chips, or for an unknown topology (the line
lists the valid ones). Needs the `tpu` extra (`pip install 'vgg-flax[tpu]'`: jax[tpu], libtpu).
"""

from __future__ import annotations

import argparse
import os
import pickle

from vgg_flax.cli import errors
from vgg_flax.train import aot

PROG = "vgg-flax compile"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog="--config NAME|FILE and --config.KEY=VALUE as for `vgg-flax train`")
    p.add_argument("--topology", required=True,
                   help="libtpu topology (v5e:2x4, v4:2x2x1, v5:2x2x1, v6e:2x4, v5e:16x16...) or "
                        "Cloud slice name (v5e-8)")
    p.add_argument("--num-slices", type=int, default=1, help="multislice: copies of the slice")
    p.add_argument("--out", help="save the compiled train step here (pickle: the serialized "
                                 "executable and the jax/jaxlib/libtpu versions it needs)")
    p.add_argument("--verbose", action="store_true", help="show libtpu's and XLA's logs")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def load_config(config_args: list[str]):
    """The locked ConfigDict that `vgg-flax train` would run with these --config arguments."""
    from absl import flags
    from ml_collections import config_flags

    from vgg_flax.cli import train_app

    argv = [PROG, *train_app.resolve_config_names(config_args)]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file("config", os.path.join(train_app.CONFIG_DIR, "default.py"),
                                        flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
    except (AttributeError, KeyError) as err:
        raise KeyError(f"unknown config key: {err}") from err
    except flags.Error as err:
        raise ValueError(str(err)) from err
    return values.config


def _mib(b: float) -> str:
    """Bytes in GiB, MiB, KiB or B."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if b >= scale:
            return f"{b / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{b:.0f} B"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g} ms"


def _si(x: float, unit: str) -> str:
    """x in T, G, M or k of `unit` (FLOPs, B), 3 significant digits."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _collective_summary(p, op: str) -> str:
    """e.g. "all-reduce x14: 264 MiB (bf16 263.5 MiB, f32 0.6 MiB)": count, bytes, bytes per dtype."""
    found = [c for c in p.collectives if c.op == op]
    by_dtype: dict[str, int] = {}
    for c in found:
        for shape in c.shapes:
            dtype, dims = shape.rstrip("]").split("[")
            size = aot.array_bytes(dtype, dims)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    parts = ", ".join(f"{d} {_mib(b)}" for d, b in sorted(by_dtype.items(), key=lambda kv: -kv[1]))
    return f"{op} x{len(found)}: {_mib(sum(c.bytes for c in found))} ({parts})"


def format_program(p) -> list[str]:
    """One program's rows of the printed table."""
    coll = "; ".join(_collective_summary(p, op) for op in dict.fromkeys(c.op for c in p.collectives))
    return [
        f"{p.name}: {p.chips} chips, batch {p.batch_per_chip} per chip, "
        f"compiled in {p.compile_seconds:.0f} s",
        f"  HBM per chip    arguments {_mib(p.argument_bytes)}, outputs {_mib(p.output_bytes)} "
        f"(aliased {_mib(p.alias_bytes)}), temporaries {_mib(p.temp_bytes)}",
        f"                  total {p.total_bytes / 2**30:.2f} GiB of {p.capacity_bytes / 2**30:.0f} GiB "
        f"({100 * p.total_bytes / p.capacity_bytes:.0f}%)",
        f"  FLOPs per chip  XLA {_si(p.flops, 'FLOP')}, analytic {_si(p.analytic_flops, 'FLOP')} "
        f"(XLA / analytic {p.flops / p.analytic_flops:.3f}); HBM accessed {_si(p.bytes_accessed, 'B')}",
        f"  collectives     {coll or 'none'}",
        f"  roofline        at peak bf16 {_ms(p.compute_seconds)}, at HBM bandwidth {_ms(p.memory_seconds)}"
        f" -> {_ms(p.bound_seconds)} per step, {p.images_per_second:,.0f} images/s "
        f"({100 * p.peak_fraction:.0f}% of peak)",
        f"  all-reduce      {_si(p.collective_bytes('all-reduce'), 'B')} in {_ms(p.allreduce_seconds)} "
        "at the slice's all-reduce bandwidth (ring)",
    ]


def format_report(report) -> str:
    """The report as printed: the slice's chip, then each program's rows, then the versions."""
    from vgg_flax.train import tpu_slices

    spec = next(s.spec for s in tpu_slices.SLICES.values() if s.topology == report.topology)
    slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
    lines = [f"{report.slice_name} ({report.topology}{slices}): {spec.name}, "
             f"{spec.hbm_bytes / 2**30:.0f} GiB HBM at {spec.hbm_gbps:.0f} GB/s, "
             f"{spec.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip ({spec.source})"]
    for p in report.programs:
        lines += format_program(p)
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    return "\n".join(lines)


def save_executable(path: str, compiled, versions: dict) -> None:
    """The serialized train step and the versions a TPU VM must have to load it
    (`jax.experimental.serialize_executable.deserialize_and_load`)."""
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    with open(path, "wb") as f:
        pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree,
                     "versions": versions}, f)


def _compile(args, config_args: list[str]) -> int:
    from vgg_flax.cli import train_app
    from vgg_flax.train import aot

    train_app.quiet_console(args.verbose)
    config = load_config(config_args)
    report, executables = aot.compile_for_tpu(config, args.topology, num_slices=args.num_slices,
                                              quiet=not args.verbose, keep_executables=True)
    report.check_fits()  # a run that does not fit: one line, exit status 2
    print(format_report(report), flush=True)
    if args.out:
        save_executable(args.out, executables["train_step"], report.versions)
        print(f"saved {args.out}")
    return 0


def main(argv: list[str]) -> int:
    """`vgg-flax compile ARGS`: exit status 0, or 2 with one line (see the module docstring)."""
    args, rest = build_parser().parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") and not a.startswith(("--config", "-config"))]
    if unknown:
        return errors.report(PROG, ValueError(f"unrecognized arguments: {' '.join(unknown)}"))
    try:
        return errors.run_command(PROG, lambda: _compile(args, rest), debug=args.debug)
    except aot.NoTpuCompilerError as err:
        if args.debug:
            raise
        return errors.report(PROG, err)
