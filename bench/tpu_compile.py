r"""docs/PERFORMANCE.md's TPU tables: the paper recipes compiled for TPU slices with no TPU.

    nice -n 5 python bench/tpu_compile.py run --out /tmp/tpu.jsonl [--only recipes,scaling,...]
    python bench/tpu_compile.py table /tmp/tpu.jsonl        # the markdown tables from the results

Every row is one `vgg_flax.train.aot.compile_for_tpu` call (the train step `vgg-flax train` would
run, VGG's paper recipe: configs/imagenet_vgg16.py with the letter set, bf16, SGD momentum, weight
decay), appended to the JSONL file as soon as it is compiled, so an interrupted run keeps what it
did. A VGG16 train step compiles in 85-96 s on a quiet 2-core machine, ~10 min under load 13.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

RECIPES = {"VGG11": "A", "VGG16": "D", "VGG19": "E"}
SLICES8 = ("v5e:2x4", "v4:2x2x1", "v5:2x2x1", "v6e:2x4")


def plan(only: set[str]) -> list[dict]:
    """(stage, model, topology, global batch, config overrides) of every compile, in run order."""
    rows = []

    def add(stage, model, topology, batch, **step):
        if stage in only:
            rows.append(dict(stage=stage, model=model, topology=topology, batch=batch, step=step))

    add("recipes", "VGG16", "v5e:2x4", 256)
    add("pod", "VGG16", "v5e:16x16", 8192)
    add("memory", "VGG16", "v5e:2x4", 256, remat=True)
    add("memory", "VGG16", "v5e:2x4", 256, grad_accum_steps=4)
    add("scaling", "VGG16", "v5e:2x4", 8 * 128)
    for topology in SLICES8[1:]:
        add("recipes", "VGG16", topology, 256)
    for model in ("VGG11", "VGG19"):
        add("recipes", model, "v5e:2x4", 256)
    add("scaling", "VGG16", "v5e:2x4", 8 * 8)
    add("memory", "VGG16", "v5e:2x4", 1024, remat=True)
    add("memory", "VGG16", "v5e:2x4", 1024, grad_accum_steps=4)
    for topology in SLICES8[1:]:
        for model in ("VGG11", "VGG19"):
            add("recipes", model, topology, 256)
    return rows


def config_for(row: dict):
    from vgg_flax.configs import imagenet_vgg16

    c = imagenet_vgg16.get_config(RECIPES[row["model"]])
    c.unlock()
    c.global_batch_size = row["batch"]
    c.eval.batch_size = row["batch"]
    for key, value in row["step"].items():
        c.step[key] = value
    c.data.num_classes = 1000  # ImageNet's, without needing TFDS's metadata
    return c


def measure(row: dict) -> dict:
    from vgg_flax.train import aot

    t0 = time.time()
    report = aot.compile_for_tpu(config_for(row), row["topology"], programs_to_compile=("train_step",))
    p = report.programs[0]
    return {**row, "chip": report.chip, "chips": p.chips, "batch_per_chip": p.batch_per_chip,
            "argument": p.argument_bytes, "output": p.output_bytes, "alias": p.alias_bytes,
            "temp": p.temp_bytes, "total": p.total_bytes, "capacity": p.capacity_bytes,
            "flops": p.flops, "analytic_flops": p.analytic_flops, "bytes_accessed": p.bytes_accessed,
            "allreduce_bytes": p.collective_bytes("all-reduce"),
            "collectives": sorted({c.op for c in p.collectives}),
            "compute_s": p.compute_seconds, "memory_s": p.memory_seconds, "bound_s": p.bound_seconds,
            "images_per_s": p.images_per_second, "peak_fraction": p.peak_fraction,
            "allreduce_s": p.allreduce_seconds, "compile_s": p.compile_seconds,
            "wall_s": time.time() - t0, "versions": report.versions}


def run(out: str, only: set[str]) -> None:
    done = set()
    try:
        with open(out) as f:
            done = {json.dumps({k: r[k] for k in ("stage", "model", "topology", "batch", "step")},
                               sort_keys=True) for r in map(json.loads, f)}
    except FileNotFoundError:
        pass
    for row in plan(only):
        if json.dumps(row, sort_keys=True) in done:
            continue
        result = measure(row)
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{row['model']} {row['topology']} batch {row['batch']} {row['step']}: "
              f"{result['total'] / 2**30:.2f} GiB, compiled in {result['compile_s']:.0f} s", flush=True)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def table(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    print("| model | slice | chips | batch/chip | args GiB | temp GiB | total / capacity GiB | "
          "XLA / analytic TFLOP per chip | roofline img/s | % of peak | all-reduce MB | "
          "all-reduce ms / compute ms | compile s |")
    print("|" + "---|" * 13)
    for r in rows:
        step = ", ".join(f"{k}={v}" for k, v in r["step"].items())
        print(f"| {r['model']}{' (' + step + ')' if step else ''} | {r['topology']} | {r['chips']} | "
              f"{r['batch_per_chip']} | {_gib(r['argument'])} | {_gib(r['temp'])} | "
              f"{_gib(r['total'])} / {_gib(r['capacity'])} | {r['flops'] / 1e12:.2f} / "
              f"{r['analytic_flops'] / 1e12:.2f} | {r['images_per_s']:,.0f} | "
              f"{100 * r['compute_s'] / r['bound_s']:.0f} | {r['allreduce_bytes'] / 1e6:.0f} | "
              f"{1e3 * r['allreduce_s']:.1f} / {1e3 * r['compute_s']:.1f} | {r['compile_s']:.0f} |")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="recipes,pod,memory,scaling,largest")
    p = sub.add_parser("table")
    p.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out, set(args.only.split(",")))
    else:
        table(args.path)


if __name__ == "__main__":
    main(sys.argv[1:])
