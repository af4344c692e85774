"""Input pipelines: TFDS datasets, the embedded digits, image folders and in-memory encoded images, as
batches of numpy arrays.

    ds = create_dataset("sklearn_digits", "train", batch_size=128, train=True, image_size=32,
                        augment="shift", normalization="symmetric")
    batch = next(ds)   # {"image": float32[B, 32, 32, 3], "label": int32[B], "mask": bool[B]}
    ds = from_encoded(jpeg_bytes, labels, batch_size=32, train=True, image_size=224)  # same streams

Names: any prepared TFDS image-classification dataset ("imagenet2012", "cifar10", ...; its "image" and
"label" features), an embedded dataset (`vgg_flax.data.embedded.EMBEDDED`, built locally on first use,
no download) or "folder:/path/to/root" (`vgg_flax.data.folder`): the rows of `vgg_flax.data.sources.SOURCES`.

Training streams are infinite, shuffled and augmented, and their order is a pure function of
(seed, process, step): epoch e is the split shuffled with a seed derived from (seed, process, e), and
every example's augmentation draws stateless random numbers keyed by its position in the stream, so a
run restarted with `start_step=s` sees exactly the batches s, s+1, ... of the original run. The
shuffle is uniform over the split when one buffer holds it (the default for cached, decoded splits
and splits up to `shuffle_buffer` = 16,384 records); larger TFRecord splits (ImageNet) are read in
blocks of 16,384 records (~1.8 GB of JPEG bytes), the blocks in an order drawn per epoch and each
shuffled whole (`vgg_flax.data.blocks`), so a resume reads at most one block before its first
batch. Image folders shuffle their file paths, uniformly. Evaluation streams are one pass in a fixed
order; the last batch is padded with `mask` False, and every process yields the same number of batches
(multi-host SPMD needs that) while each real example appears exactly once.

TensorFlow is imported only inside the functions here and is hidden from GPUs/TPUs, so it never takes
accelerator memory from JAX (`vgg_flax.data.sources`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vgg_flax import preprocessing
from vgg_flax.data import sources
from vgg_flax.data.sources import FOLDER_PREFIX, DatasetInfo, Source, dataset_info, even_shares

__all__ = ["FOLDER_PREFIX", "OPTIONS", "DatasetInfo", "create_dataset", "dataset_info", "default_eval_resize",
           "even_shares", "from_encoded"]
AUTO_CACHE_BYTES = 256 * 2**20  # cache=None caches fixed-size datasets up to this size (digits, cifar10)
# Defaults of `create_dataset(**options)`; anything else is a TypeError.
OPTIONS: dict[str, Any] = {
    "scale_range": None,    # paper: (S_min, S_max) short side, jittered; default round(size * 256 / 224)
    "color_pca": 0.1,       # paper: std of AlexNet's PCA lighting coefficients (0 turns it off)
    "area_range": (0.08, 1.0), "aspect_range": (3 / 4, 4 / 3),  # inception crop
    "shift": None,          # shift: max translation in pixels (zero padding); default image_size // 8
    "eval_resize": None,    # eval: short side Q; default image_size for fixed-size datasets, else *256/224
    "eval_views": "center",  # eval: "center" crop, "full" Q x Q square, "multicrop" grid, "whole" image
    "multicrop_grid": 5,    # multicrop: grid x grid crops, each also flipped
    "cache": None,          # keep decoded images in memory; None: when they fit AUTO_CACHE_BYTES
    "shuffle_buffer": None,  # None: the whole split when cached, else 16,384 records
    "download": False,      # let TFDS download a public dataset that is not prepared yet
    "decode_window": True,  # JPEG bytes: decode only the window a crop reads (the same pixels)
    "threads": None,        # tf.data's private thread pool size (None: TF's default, all cores)
}


def create_dataset(name: str, split: str, *, batch_size: int, train: bool, image_size: int,
                   data_dir: str | None = None, seed: int = 0, start_step: int = 0,
                   augment: str = "paper", normalization: str = "torchvision",
                   process_index: int | None = None, process_count: int | None = None,
                   **options) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one process's share of a split: {"image", "label", "mask"} numpy arrays.

    Args:
      name, split, data_dir: see the module docstring; `split` may use TFDS slicing.
      batch_size: per-process batch size.
      train: infinite, shuffled, augmented, `drop_remainder` (mask all True); else one ordered pass
        with the last batch padded (mask False on padding).
      image_size: output size S of the (square) crops.
      seed, start_step: the training order is a function of (seed, process, step); see module doc.
      augment: training augmentation, a key of `transforms.AUGMENTATIONS`.
      normalization: a `vgg_flax.preprocessing.PRESETS` name.
      process_index, process_count: this process's even share of the split (default: JAX's).
      **options: keys of OPTIONS.
    Returns:
      An iterator of {"image": float32[B, S, S, 3] (float32[B, V, S, S, 3] for eval_views="multicrop",
      float32[1, h, w, 3], the whole image with short side Q, for "whole", which needs batch_size 1),
      "label": int32[B], "mask": bool[B]}.
    """
    opts = _check_options(options, augment)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    source = Source.create(name, split, data_dir, process_index, process_count, opts["download"])
    return _batches(source, batch_size=batch_size, train=train, image_size=image_size, seed=seed,
                    start_step=start_step, augment=augment, normalization=normalization, opts=opts)


def from_encoded(images: Sequence[bytes], labels, *, batch_size: int, train: bool, image_size: int,
                 seed: int = 0, start_step: int = 0, augment: str = "paper",
                 normalization: str = "torchvision", process_index: int = 0, process_count: int = 1,
                 **options) -> Iterator[dict[str, np.ndarray]]:
    """`create_dataset`'s batches over in-memory encoded images, decoded after the shuffle as a TFDS split.

    For data that is not a TFDS dataset or folder (a web dataset shard, a benchmark, a test):
    the same order, augmentations, resume and evaluation padding as `create_dataset`.

    Args:
      images: N encoded images (JPEG, PNG, GIF or BMP bytes), in split order.
      labels: int[N] class indices.
      process_index, process_count: this process's even share of the N examples (default: all of them).
      the rest: as `create_dataset`.
    """
    opts = _check_options(options, augment)
    source = Source.from_encoded(images, labels, process_index, process_count)
    return _batches(source, batch_size=batch_size, train=train, image_size=image_size, seed=seed,
                    start_step=start_step, augment=augment, normalization=normalization, opts=opts)


def _batches(source, *, batch_size, train, image_size, seed, start_step, augment, normalization, opts):
    norm = preprocessing.get_preset(normalization)
    if train:
        ds = _train_stream(source, batch_size=batch_size, image_size=image_size, seed=seed,
                           start_step=start_step, augment=augment, norm=norm, opts=opts)
    else:
        ds = _eval_stream(source, batch_size=batch_size, image_size=image_size, norm=norm, opts=opts)
    return ds.as_numpy_iterator()


def _check_options(options: dict, augment: str) -> dict:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown create_dataset options {sorted(unknown)}; valid: {sorted(OPTIONS)}")
    sources.hide_accelerators_from_tensorflow()
    from vgg_flax.data import transforms  # (imports TensorFlow)

    if augment not in transforms.AUGMENTATIONS:
        raise KeyError(f"unknown augment {augment!r}; valid: {sorted(transforms.AUGMENTATIONS)}")
    opts = {**OPTIONS, **options}
    if opts["eval_views"] not in transforms.EVAL_VIEWS:
        raise KeyError(f"unknown eval_views {opts['eval_views']!r}; valid: {sorted(transforms.EVAL_VIEWS)}")
    return opts


def _decoded(source: Source, cache: bool | None):
    """(examples, decoded?): decoding before the shuffle only when caching the decoded images."""
    if cache is None:
        size = source.shares[source.index] * int(np.prod(source.image_shape or (2**40,)))
        cache = size <= AUTO_CACHE_BYTES
    if not cache:
        return source.raw, False
    import tensorflow as tf

    def decode(ex):
        image, ok = source.decode(ex["raw"])
        return {"raw": image, "ok": ok, "label": ex["label"]}

    ds = source.raw.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.cache(), True


def _transformed(source, ex, transform, *, decoded: bool, window: bool):
    """(transform(image), ok) of one example: of its cached image, or of its encoded bytes read one
    window at a time (`vgg_flax.data.regions`: a JPEG decodes only what the transform reads)."""
    if decoded:
        return transform(ex["raw"]), ex["ok"]
    if window and source.decode is sources.decode_bytes:
        import tensorflow as tf

        from vgg_flax.data import regions

        return regions.on_encoded(transform, ex["raw"]), tf.constant(True)
    image, ok = source.decode(ex["raw"])
    return transform(image), ok


def _options(threads: int | None):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    if threads:  # Leave the other cores to JAX, or measure throughput per core.
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
    return options


def _train_stream(source, *, batch_size, image_size, seed, start_step, augment, norm, opts):
    import tensorflow as tf

    from vgg_flax.data import transforms

    n = source.shares[source.index]
    if n < batch_size:
        raise ValueError(f"this process has {n} training examples, fewer than batch_size {batch_size}")
    examples, decoded = _decoded(source, opts["cache"])
    buffer = max(1, min(n, opts["shuffle_buffer"] or (n if decoded or source.paths else 16_384)))
    base = (seed * 1_000_003 + source.index * 7_919) % (2**62)

    def epoch(e):
        return examples.shuffle(buffer, seed=base + e * 104_729, reshuffle_each_iteration=False)

    first = start_step * batch_size
    if source.records is not None and not decoded and n > buffer:  # Large TFRecord split: blocks.
        from vgg_flax.data import blocks

        instructions, parse = source.records
        stream = blocks.record_stream(blocks.cut_blocks(instructions, buffer), key=base, block=buffer,
                                      first=first).map(parse)
    else:  # One shuffle buffer holds the whole split (or its cache): uniform epochs.
        stream = tf.data.Dataset.range(first // n, 2**62).flat_map(epoch).skip(first % n)
    stream = tf.data.Dataset.zip(tf.data.Dataset.range(first, 2**62), stream)
    augment_fn = transforms.train_transform(augment, image_size=image_size, options=opts)
    key = tf.constant([seed % (2**31), source.index], tf.int64)

    always_ok = []  # Whether `ok` is the constant True (bytes decoded by TF), seen when tracing.

    def prepare(position, ex):
        rng = tf.random.experimental.stateless_fold_in(key, position)
        pixels, ok = _transformed(source, ex, lambda image: augment_fn(image, rng), decoded=decoded,
                                  window=opts["decode_window"])
        always_ok.append(tf.get_static_value(ok) is not None and bool(tf.get_static_value(ok)))
        return {"image": transforms.normalize(pixels, norm), "label": ex["label"], "mask": ok}

    ds = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if not all(always_ok):  # A filter between map and batch blocks tf.data's map-and-batch fusion.
        ds = ds.filter(lambda ex: ex["mask"])
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(opts["threads"]))


def default_eval_resize(image_size: int, fixed_size: bool, norm: preprocessing.Normalization) -> int:
    """Q: image_size for fixed-size datasets (no rescale), else the preset's ratio (256/224 * S)."""
    return image_size if fixed_size else int(round(image_size * norm.resize / norm.crop))


def _eval_stream(source, *, batch_size, image_size, norm, opts):
    import tensorflow as tf

    from vgg_flax.data import transforms

    resize = opts["eval_resize"] or default_eval_resize(image_size, source.fixed_size, norm)
    if opts["eval_views"] == "whole" and batch_size != 1:
        raise ValueError(f"eval_views='whole' yields images of different sizes: batch_size must be 1, "
                         f"not {batch_size}")
    view = transforms.eval_transform(opts["eval_views"], image_size=image_size, resize=resize,
                                     grid=opts["multicrop_grid"])
    examples, decoded = _decoded(source, opts["cache"])

    def prepare(ex):
        pixels, ok = _transformed(source, ex, view, decoded=decoded, window=opts["decode_window"])
        return {"image": transforms.normalize(pixels, norm), "label": ex["label"], "mask": ok}

    # map + batch (fused by tf.data), then the last partial batch padded and blank batches appended:
    # padding examples before batching would block the fusion (~10% of the throughput).
    ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    share, num_batches = source.shares[source.index], math.ceil(max(source.shares) / batch_size)
    # ("whole" images have no static size; their batch_size is 1, so never padded.)
    specs = ds.element_spec
    shapes = {k: [batch_size] + [d or resize for d in s.shape[1:]] for k, s in specs.items()}

    def pad(batch):  # zero rows (mask False) up to batch_size, made per batch: no batch-sized constant
        rows = batch_size - tf.shape(batch["label"])[0]
        return {k: tf.ensure_shape(tf.pad(x, [[0, rows]] + [[0, 0]] * (x.shape.rank - 1)), shapes[k])
                for k, x in batch.items()}

    if share % batch_size:
        ds = ds.map(pad)
    extra = num_batches - math.ceil(share / batch_size)
    if extra:  # blank batches, so every process runs the same number of steps
        ds = ds.concatenate(tf.data.Dataset.range(extra).map(
            lambda _: {k: tf.zeros(shapes[k], s.dtype) for k, s in specs.items()}))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(opts["threads"]))
