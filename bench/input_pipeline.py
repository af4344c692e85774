"""Input pipeline throughput: training-augmentation images/s, per tf.data thread (= per core).

    .venv/bin/python bench/input_pipeline.py                   # all cases, 1 and 2 threads
    .venv/bin/python bench/input_pipeline.py --threads 1,2,4 --seconds 10
    .venv/bin/python bench/input_pipeline.py --compare torchvision --repeats 5   # one core each side

ImageNet-like input without ImageNet: real photos (scikit-learn's two bundled sample JPEGs, 427x640),
cut into random 375x500 windows and re-encoded as JPEG (quality 90; ImageNet's mean size is about
400x350), held in memory and fed through the public `pipeline.from_encoded` (decoded after the shuffle,
as a TFDS split), so the figure is decode + augmentation + normalisation + batching, without disk
reads. The embedded digits (32x32 PNG, read from TFDS files) go through `create_dataset`.

`--compare torchvision` runs every JPEG case on both sides, each in its own process pinned to one core
(`taskset -c CORE`; torch threads 1, our tf.data private pool 1 thread), alternating the two sides
`--repeats` times, and prints medians as a markdown table. torchvision's side is its transforms on
PIL images decoded from the same bytes (`Image.open(...).convert("RGB")`, as its ImageFolder) and
stacked into batches (its default collate). images/s counts the images of a process's CPU time
(`time.process_time`, all its threads): on a shared machine that is what one dedicated core would
give; the wall-clock figure is printed beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py: machine header)

# name: (source, create_dataset keyword arguments). paper: short side S (or S jittered in [256, 512]),
# random 224 crop, flip, PCA lighting; inception: random-resized crop; eval: Resize(256)+CenterCrop(224).
CASES = {
    "inception-224": ("jpeg", dict(augment="inception", image_size=224, train=True)),
    "paper-S256": ("jpeg", dict(augment="paper", image_size=224, train=True)),
    "paper-S256-512": ("jpeg", dict(augment="paper", image_size=224, train=True, scale_range=(256, 512))),
    "eval-Q256-center224": ("jpeg", dict(image_size=224, train=False)),
    "digits32-shift-tfds": ("digits", dict(augment="shift", image_size=32, train=True)),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEG-encoded 375x500 windows of scikit-learn's bundled sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 375 + 1), rng.integers(0, photo.shape[1] - 500 + 1)
        buffer = io.BytesIO()
        Image.fromarray(photo[top:top + 375, left:left + 500]).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def ours(jpegs: list[bytes], *, batch_size: int, threads: int, train: bool, **kw):
    """Endless batches of our pipeline over the JPEGs (evaluation: one pass after another)."""
    from vgg_flax.data import pipeline

    # Evaluation: passes of 4,096 images. Each pass builds a new pipeline (~0.45 s of CPU: the split's
    # tensor, tracing the map), which passes of 1,024 images charged at ~0.4 ms per image, a fifth of
    # the measured cost; an evaluation of 50,000 images pays it once (the steady state measured here).
    jpegs = jpegs if train else jpegs * 16
    labels = np.arange(len(jpegs)) % 1000
    while True:
        yield from pipeline.from_encoded(jpegs, labels, batch_size=batch_size, train=train,
                                         threads=threads, **kw)


def torchvision_transform(case: str):
    """torchvision's counterpart of a case, on PIL images."""
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(MEAN, STD)]
    flip = T.RandomHorizontalFlip()
    if case == "inception-224":
        return T.Compose([T.RandomResizedCrop(224), flip, *tail])
    if case == "paper-S256":
        return T.Compose([T.Resize(256), T.RandomCrop(224), flip, *tail])
    if case == "paper-S256-512":  # Resize(S), S ~ U{256..512} per image.
        return T.Compose([T.Lambda(lambda im: T.functional.resize(im, random.randint(256, 512))),
                          T.RandomCrop(224), flip, *tail])
    if case == "eval-Q256-center224":
        return T.Compose([T.Resize(256), T.CenterCrop(224), *tail])
    raise KeyError(f"no torchvision counterpart for case {case!r}")


def torchvision_batches(jpegs: list[bytes], case: str, *, batch_size: int):
    """Endless batches as a one-process DataLoader makes them: decode, transform, collate."""
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    transform = torchvision_transform(case)
    i = 0
    while True:
        images = []
        for _ in range(batch_size):
            images.append(transform(Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB")))
            i += 1
        yield {"image": torch.stack(images), "label": torch.zeros(batch_size, dtype=torch.int64)}


def rates(batches, batch_size: int, seconds: float, warmup: int = 3) -> dict[str, float]:
    """Steady-state images per wall second and per CPU second of this process."""
    for _ in range(warmup):
        next(batches)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch_size
    return {"wall": count / (time.perf_counter() - start), "cpu": count / (time.process_time() - cpu)}


def worker(args) -> None:
    """One side of one case in this process; prints its rates as one JSON line."""
    jpegs = photo_jpegs(args.images)
    if args.worker == "torchvision":
        batches = torchvision_batches(jpegs, args.cases, batch_size=args.batch_size)
    else:
        import tensorflow  # noqa: F401  (imported here, after torch could have been: see common.header)

        batches = ours(jpegs, batch_size=args.batch_size, threads=1, **CASES[args.cases][1])
    print(json.dumps(rates(batches, args.batch_size, args.seconds)), flush=True)


def compare(args, argv: list[str]) -> None:
    """Both sides of every JPEG case, one pinned process per run, alternating; a markdown table."""
    cases = [c for c in args.cases.split(",") if CASES[c][0] == "jpeg"]
    print(f"\nmedians of {args.repeats} alternating runs of {args.seconds:g} s, each a process pinned "
          f"to core {args.core}; images/s per CPU second (wall-clock images/s in brackets)\n")
    print("| case | ours images/s | torchvision images/s | ours/torchvision |\n|---|---|---|---|")
    for case in cases:
        got = {"ours": [], "torchvision": []}
        for _ in range(args.repeats):
            for side in got:
                cmd = ["taskset", "-c", str(args.core), sys.executable, argv[0], "--worker", side,
                       "--cases", case, "--seconds", str(args.seconds), "--images", str(args.images),
                       "--batch-size", str(args.batch_size)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                got[side].append(json.loads(out.strip().splitlines()[-1]))
        med = {side: {k: statistics.median(r[k] for r in runs) for k in ("cpu", "wall")}
               for side, runs in got.items()}
        o, t = med["ours"], med["torchvision"]
        print(f"| {case} | {o['cpu']:.0f} ({o['wall']:.0f}) | {t['cpu']:.0f} ({t['wall']:.0f}) | "
              f"{o['cpu'] / t['cpu']:.2f}x ({o['wall'] / t['wall']:.2f}x) |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def run_cases(args, jpegs: list[bytes], digits_dir: str) -> None:
    from vgg_flax.data import pipeline

    print(f"\n{'case':<30} {'threads':>7} {'images/s':>10} {'per thread':>11}")
    for name in args.cases.split(","):
        kind, kw = CASES[name]
        for threads in (int(t) for t in args.threads.split(",")):
            if kind == "jpeg":
                batches = ours(jpegs, batch_size=args.batch_size, threads=threads, **kw)
            else:
                batches = pipeline.create_dataset("sklearn_digits", "train", batch_size=args.batch_size,
                                                  data_dir=digits_dir, normalization="symmetric",
                                                  threads=threads, cache=True, **kw)
            rate = rates(batches, args.batch_size, args.seconds)["wall"]
            print(f"{name:<30} {threads:>7} {rate:>10.1f} {rate / threads:>11.1f}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma list of tf.data thread counts")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs in memory")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of case names")
    parser.add_argument("--compare", choices=["torchvision"], help="side by side, one core each")
    parser.add_argument("--repeats", type=int, default=3, help="--compare: runs per side and case")
    parser.add_argument("--core", type=int, default=0, help="--compare: the core both sides run on")
    parser.add_argument("--worker", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv[1:])
    if args.worker:
        worker(args)
        return 0
    print(common.header(argv))  # Imports torch (if present) before TensorFlow: the other order crashes.
    if args.compare:
        compare(args, argv)
        return 0
    jpegs = photo_jpegs(args.images)
    with tempfile.TemporaryDirectory(prefix="bench_tfds_") as digits_dir:
        run_cases(args, jpegs, digits_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
