"""Input pipeline throughput: training-augmentation images/s, per tf.data thread (= per core).

    .venv/bin/python bench/input_pipeline.py                   # all cases, 1 and 2 threads
    .venv/bin/python bench/input_pipeline.py --threads 1,2,4 --seconds 10

ImageNet-like input without ImageNet: real photos (scikit-learn's two bundled sample JPEGs, 427x640),
cut into random 375x500 windows and re-encoded as JPEG (quality 90; ImageNet's mean size is about
400x350), held in memory and fed through the same code path as a TFDS dataset (`_train_stream`
with `tf.io.decode_image`), so the figure is decode + augmentation + normalisation + batching, without
disk reads. The embedded digits (32x32 PNG, read from TFDS files) are measured through the public API.
Each case runs `--seconds` after a warm-up of a few batches; images/s is the steady state.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py: machine header)

# name: (source, create_dataset keyword arguments). paper: short side S (or S jittered in [256, 512]),
# random 224 crop, flip, PCA lighting; inception: random-resized crop; eval: Resize(256)+CenterCrop(224).
CASES = {
    "paper-S256": ("jpeg", dict(augment="paper", image_size=224, train=True)),
    "paper-S256-512": ("jpeg", dict(augment="paper", image_size=224, train=True, scale_range=(256, 512))),
    "inception-224": ("jpeg", dict(augment="inception", image_size=224, train=True)),
    "eval-Q256-center224": ("jpeg", dict(image_size=224, train=False)),
    "digits32-shift-tfds": ("digits", dict(augment="shift", image_size=32, train=True)),
}


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


def jpeg_stream(jpegs: list[bytes], *, batch_size: int, threads: int, train: bool, image_size: int,
                augment: str = "paper", **options):
    """The pipeline over in-memory JPEG bytes, exactly as for a TFDS split (decode after shuffle)."""
    import tensorflow as tf

    from vgg_flax.data import pipeline as ip
    from vgg_flax import preprocessing

    raw = tf.data.Dataset.from_tensor_slices({"raw": jpegs, "label": np.zeros(len(jpegs), np.int32)})
    source = ip._Source(raw, ip._decode_bytes, [len(jpegs)], 0, image_shape=None)
    opts = ip._check_options({**options, "threads": threads}, augment)
    norm = preprocessing.get_preset("torchvision")
    if train:
        ds = ip._train_stream(source, batch_size=batch_size, image_size=image_size, seed=0, start_step=0,
                              augment=augment, norm=norm, opts=opts)
    else:
        ds = ip._eval_stream(source, batch_size=batch_size, image_size=image_size, norm=norm, opts=opts)
        ds = ds.repeat()
    return ds.as_numpy_iterator()


def images_per_second(batches, batch_size: int, seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch_size
    return count / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma list of tf.data thread counts")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs in memory")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of case names")
    args = parser.parse_args(argv[1:])
    print(common.header(argv))  # Imports torch (if present) before TensorFlow: the other order crashes.
    jpegs = photo_jpegs(args.images)
    with tempfile.TemporaryDirectory(prefix="bench_tfds_") as digits_dir:
        run_cases(args, jpegs, digits_dir)
    return 0


def run_cases(args, jpegs: list[bytes], digits_dir: str) -> None:
    from vgg_flax.data import pipeline as ip

    print(f"\n{'case':<30} {'threads':>7} {'images/s':>10} {'per thread':>11}")
    for name in args.cases.split(","):
        kind, kw = CASES[name]
        for threads in (int(t) for t in args.threads.split(",")):
            if kind == "jpeg":
                batches = jpeg_stream(jpegs, batch_size=args.batch_size, threads=threads, **kw)
            else:
                batches = ip.create_dataset("sklearn_digits", "train", batch_size=args.batch_size,
                                            data_dir=digits_dir, normalization="symmetric",
                                            threads=threads, cache=True, **kw)
            rate = images_per_second(batches, args.batch_size, args.seconds)
            print(f"{name:<30} {threads:>7} {rate:>10.1f} {rate / threads:>11.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
