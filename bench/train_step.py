"""Images/s of one VGG training step (forward, backward, SGD-momentum update), ours vs PyTorch.

Both frameworks train the same architecture on the same random batch with the same optimizer (SGD,
momentum 0.9, no weight decay), precision and thread count; after warm-up their steps are timed
interleaved (A B A B ...), and the medians and ratios are printed last, with inference images/s,
XLA compile time, memory, and every figure as a fraction of the machine's matmul ceiling measured
in the same run (and of a nominal peak given with --peak-tflops: model FLOPs utilisation).

  python bench/train_step.py --models vgg16 --batch 8 --image-size 224
  python bench/train_step.py --models vgg11,vgg16_bn --batch 32 --image-size 32 --head small --classes 10
  python bench/train_step.py --dtype bfloat16 --batch 256 --channels-last --torch eager,compile \
      --peak-tflops 989    # a GPU (bench/gpu.sh)

Our step is the library's `vgg_flax.train.steps.train_step` (jitted once with the state donated); torch's is
`torchvision.models.<name>` with `torch.optim.SGD`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg16", help="comma-separated builder names")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--head", default="torchvision", choices=["torchvision", "small"])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--conv", default="auto", choices=["auto", "xla", "cpu"],
                   help="vgg_flax conv implementation (auto: the per-backend default)")
    p.add_argument("--step", default="library", choices=["library", "plain"],
                   help="library: vgg_flax.train.steps.train_step; plain: model.apply + optax.sgd here")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (params stay fp32; torch uses autocast)")
    p.add_argument("--torch", default="eager", help="torch variants: eager, compile (torch.compile)")
    p.add_argument("--channels-last", action="store_true", help="torch activations in NHWC")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="nominal dense peak of the device for MFU (e.g. 989 for H100 SXM bf16)")
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--schedule", choices=["interleaved", "blocked"], default="interleaved",
                   help="interleaved: A B A B after warm-up (default); blocked: all of A, then all of B")
    p.add_argument("--matmul-size", type=int, default=0,
                   help="side of the ceiling matmul (default: 4096 on CPU, 8192 elsewhere)")
    p.add_argument("--block-imports", default="",
                   help="comma-separated packages whose import must fail (e.g. tensorflow,ml_collections)")
    p.add_argument("--cache-dir", default=None,
                   help="persistent compilation cache directory (a second run then measures a restart)")
    return p.parse_args(argv)


def jax_runner(name, args):
    """(train_fn, infer_fn, info) for our model; each fn runs one step and blocks."""
    import jax
    import jax.numpy as jnp

    import vgg_flax
    from vgg_flax import parallel
    from vgg_flax.train import optim, steps

    model = vgg_flax.get_model(name, num_classes=args.classes, head=args.head, conv_impl=args.conv,
                               dtype=jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.image_size, args.image_size, 3),
                                             np.float32))
    labels = jnp.asarray(rng.integers(0, args.classes, args.batch, np.int32))
    batch = {"image": images, "label": labels, "mask": jnp.ones(args.batch, bool)}
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
    # The step donates its state: give it its own copy so `variables` stays alive for inference.
    own = jax.tree_util.tree_map(jnp.copy, variables)
    if args.step == "plain":
        step, state = plain_step(model, own)
    else:
        tx = optim.make_optimizer(name="sgd", momentum=0.9, learning_rate=0.01)
        state = steps.create_state(model=model, tx=tx, variables=own, rng=jax.random.key(1))
        mesh = parallel.create_mesh()
        step = steps.make_train_step(mesh, steps.state_sharding_like(state, mesh), model=model, tx=tx)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    footprint = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes) / 2**30 if mem is not None else float("nan")
    holder = {"state": state}

    def train():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    infer_jit = jax.jit(lambda v, x: model.apply(v, x, train=False))
    infer_compiled = infer_jit.lower(variables, images).compile()
    infer = lambda: infer_compiled(variables, images).block_until_ready()
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    info = {"trace_s": t1 - t0, "compile_s": t2 - t1, "xla_gib": footprint,
            "device_peak": f"{peak / 2**30:.2f} GiB" if peak else "n/a (CPU)"}
    return train, infer, info


def plain_step(model, variables):
    """(jitted step, state): the textbook step, model.apply + cross-entropy + optax.sgd(momentum)."""
    import jax
    import optax

    tx = optax.sgd(0.01, momentum=0.9)
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
             "opt": tx.init(variables["params"]), "key": jax.random.key(1)}

    def step(state, batch):
        key, dropout = jax.random.split(state["key"])

        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                      batch["image"], train=True, mutable=["batch_stats"],
                                      rngs={"dropout": dropout})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, upd.get("batch_stats", state["batch_stats"])

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "batch_stats": stats, "opt": opt, "key": key}, {"loss": loss}

    return jax.jit(step, donate_argnums=0), state


def torch_model(name, args):
    import torch
    import torchvision

    model = getattr(torchvision.models, name.replace("_lrn", ""))(num_classes=args.classes)
    if args.head == "small":  # vgg_flax's "small" head: global average pool, hidden layer, classifier
        hidden = 512
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        model.classifier = torch.nn.Sequential(torch.nn.Linear(512, hidden), torch.nn.ReLU(True),
                                               torch.nn.Dropout(0.5), torch.nn.Linear(hidden, args.classes))
    return model


def torch_runner(name, args, variant):
    """(train_fn, infer_fn) for torchvision's model; variant "eager" or "compile" (torch.compile).

    bf16 is autocast (fp32 weights, bf16 matmuls/convs), the counterpart of our dtype=bfloat16 with
    fp32 params; --channels-last stores activations NHWC as ours are.
    """
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch_model(name, args).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((args.batch, 3, args.image_size, args.image_size),
                                                  np.float32)).to(device).to(memory_format=fmt)
    labels = torch.from_numpy(rng.integers(0, args.classes, args.batch).astype(np.int64)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if variant == "compile" else model
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                      enabled=args.dtype == "bfloat16")

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        opt.step()
        loss.item()  # synchronises (GPU) and matches our block_until_ready

    def infer():
        model.eval()
        with torch.inference_mode(), autocast():
            forward(images).float().sum().item()

    return train, infer


def torch_peak_gib():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return float("nan")


def bench_model(name, args, peak_gflops, matmul_gflops):
    """Times one model; returns the rows of the result table."""
    macs = model_macs(name, args)
    rss0 = common.peak_rss_gib()
    jtrain, jinfer, info = jax_runner(name, args)
    rss_jax = common.peak_rss_gib()
    variants = [] if args.no_torch else [v for v in args.torch.split(",") if v]
    tfns = {f"torch {v}": torch_runner(name, args, v) for v in variants}
    schedule = common.blocked if args.schedule == "blocked" else common.interleaved
    train_t = schedule({"ours": jtrain} | {k: f[0] for k, f in tfns.items()},
                       warmup=args.warmup, repeats=args.repeats)
    rss_all = common.peak_rss_gib()
    infer_t = {}
    if not args.no_inference:
        infer_t = schedule({"ours": jinfer} | {k: f[1] for k, f in tfns.items()},
                           warmup=args.warmup, repeats=args.repeats)
    print(f"{name}: XLA compile {info['compile_s']:.1f} s (trace+lower {info['trace_s']:.1f} s), "
          f"XLA train step footprint {info['xla_gib']:.2f} GiB, device peak {info['device_peak']}, "
          f"host peak RSS {rss0:.2f} -> {rss_jax:.2f} GiB after ours, {rss_all:.2f} GiB after training steps "
          f"(torch device peak {torch_peak_gib() if tfns else float('nan'):.2f} GiB)", flush=True)
    for label, times in [("train", train_t), ("infer", infer_t)]:
        for fw, ts in times.items():
            print(f"  {label} {fw:13s} step seconds: {' '.join(f'{t:.3f}' for t in ts)}", flush=True)
    rows = []
    for label, times, flop in [("train", train_t, 6 * macs), ("infer", infer_t, 2 * macs)]:
        if not times:
            continue
        ips = {fw: args.batch / common.median(ts) for fw, ts in times.items()}
        pct = {fw: f"{100 * v * flop / 1e9 / peak_gflops:.0f}%" for fw, v in ips.items()}
        of_matmul = f"{100 * ips['ours'] * flop / 1e9 / matmul_gflops:.0f}%"
        for other in [k for k in ips if k != "ours"] or [None]:
            rows.append([name, label, f"{ips['ours']:.2f}", pct["ours"], of_matmul, other or "-",
                         f"{ips[other]:.2f}" if other else "-", pct[other] if other else "-",
                         f"{ips['ours'] / ips[other]:.2f}" if other else "-"])
    return rows


def model_macs(name, args):
    from vgg_flax.models import MODELS

    return common.vgg_forward_macs(MODELS[name].keywords["config"], image_size=args.image_size,
                                   num_classes=args.classes, head=args.head)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.block_imports:
        common.block_imports(args.block_imports.split(","))
    import jax

    if args.cache_dir:
        from vgg_flax.train import compilation_cache

        compilation_cache.enable_compilation_cache(args.cache_dir)
    print(common.header([sys.argv[0], *argv]), flush=True)
    print(f"batch {args.batch}, image {args.image_size}, head {args.head}, classes {args.classes}, "
          f"{args.dtype}, warmup {args.warmup}, repeats {args.repeats} ({args.schedule}), conv {args.conv}, "
          f"step {args.step}, torch {args.torch}{' channels_last' if args.channels_last else ''}, "
          f"devices {jax.devices()}",
          flush=True)
    size = args.matmul_size or (4096 if jax.default_backend() == "cpu" else 8192)
    measured = common.matmul_gflops(size=size, dtype=args.dtype)
    print(f"{args.dtype} ceiling: {size}^3 matmul {measured:.1f} GFLOP/s", flush=True)
    peak = args.peak_tflops * 1e3 if args.peak_tflops else measured
    what = f"nominal {args.peak_tflops} TFLOP/s (MFU)" if args.peak_tflops else "the measured matmul"
    rows = [["model", "step", "ours img/s", "ours % peak", "ours % matmul", "vs", "their img/s",
             "their % peak", "ours/theirs"]]
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args, peak, measured)
    after = common.matmul_gflops(size=size, dtype=args.dtype)
    print(f"{args.dtype} ceiling after: {after:.1f} GFLOP/s; load average {os.getloadavg()[0]:.2f}; "
          f"% peak is of {what}, % matmul of the {size}^3 matmul before ({measured:.1f} GFLOP/s)")
    print(common.fmt_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
