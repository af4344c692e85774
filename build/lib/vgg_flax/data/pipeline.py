"""Input pipelines: TFDS datasets, the embedded digits and image folders, as batches of numpy arrays.

    ds = create_dataset("sklearn_digits", "train", batch_size=128, train=True, image_size=32,
                        augment="shift", normalization="symmetric")
    batch = next(ds)   # {"image": float32[B, 32, 32, 3], "label": int32[B], "mask": bool[B]}

Names: any prepared TFDS image-classification dataset ("imagenet2012", "cifar10", ...; its "image" and
"label" features), an embedded dataset (`vgg_flax.datasets.EMBEDDED`, built locally on first use, no
download) or "folder:/path/to/root" (`vgg_flax.datasets.folder`).

Training streams are infinite, shuffled and augmented, and their order is a pure function of
(seed, process, step): epoch e is the split shuffled with a seed derived from (seed, process, e), and
every example's augmentation draws stateless random numbers keyed by its position in the stream, so a
run restarted with `start_step=s` sees exactly the batches s, s+1, ... of the original run. The
shuffle is uniform over the split when one buffer holds it (the default for cached, decoded splits
and splits up to `shuffle_buffer` = 16,384 records); larger TFRecord splits (ImageNet) are read in
blocks of 16,384 records (~1.8 GB of JPEG bytes), the blocks in an order drawn per epoch and each
shuffled whole (`vgg_flax.datasets.blocks`), so a resume reads at most one block before its first
batch. Image folders shuffle their file paths, uniformly. Evaluation streams are one pass in a fixed
order; the last batch is padded with `mask` False, and every process yields the same number of batches
(multi-host SPMD needs that) while each real example appears exactly once.

TensorFlow is imported only inside the functions here and is hidden from GPUs/TPUs, so it never takes
accelerator memory from JAX.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vgg_flax import preprocessing
from vgg_flax.data import folder
from vgg_flax.data.embedded import EMBEDDED

AUGMENTATIONS = ("paper", "inception", "shift", "flip", "none")
EVAL_VIEWS = ("center", "full", "multicrop", "whole")
FOLDER_PREFIX = "folder:"
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
    "threads": None,        # tf.data's private thread pool size (None: TF's default, all cores)
}
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a pipeline needs to know about a dataset before reading it.

    Attributes:
      name: as passed to `dataset_info`.
      num_classes, class_names: the label space.
      image_shape: (H, W, 3) when every image has that size (cifar10, the digits), else None.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int] | None
    _sizes: Callable[[str], int] = dataclasses.field(repr=False)
    _skipped: Callable[[str], tuple] = dataclasses.field(repr=False, default=lambda split: ())

    def num_examples(self, split: str) -> int:
        """Exact number of (readable) examples in a split, TFDS slicing such as "train[:10%]" allowed."""
        return self._sizes(split)

    def skipped(self, split: str) -> tuple[tuple[str, str], ...]:
        """(path, reason) of the unreadable files the folder reader skipped in a split; () for TFDS."""
        return self._skipped(split)


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """The `DatasetInfo` of a TFDS name, an embedded dataset or "folder:/root"."""
    if name.startswith(FOLDER_PREFIX):
        root = name[len(FOLDER_PREFIX):]
        # Class names from the first usual split folder (they are the same in every split), or root.
        index, _ = folder.folder_split(root, (folder.split_folders(root) or ["all"])[0])
        return DatasetInfo(name=name, num_classes=len(index.class_names), class_names=index.class_names,
                           image_shape=None, _sizes=lambda split: _folder_size(root, split),
                           _skipped=lambda split: folder.folder_split(root, split)[0].skipped)
    builder = _tfds_builder(name, data_dir, download=False)
    label, image = builder.info.features["label"], builder.info.features["image"]
    shape = tuple(image.shape)
    return DatasetInfo(name=name, num_classes=label.num_classes, class_names=tuple(label.names),
                       image_shape=shape if None not in shape else None,
                       _sizes=lambda split: builder.info.splits[split].num_examples)


def _folder_size(root: str, split: str) -> int:
    _, part = folder.folder_split(root, split)
    return part.stop - part.start


def _tfds_builder(name: str, data_dir: str | None, *, download: bool):
    """A prepared TFDS builder; embedded datasets are built locally (offline) on first use."""
    _hide_accelerators_from_tensorflow()
    import tensorflow_datasets as tfds

    if name in EMBEDDED:
        from vgg_flax.data.embedded import get_builder_class

        cls = get_builder_class(name)
        builder = cls(data_dir=data_dir)
        try:
            builder.download_and_prepare()  # No download: a no-op once built.
        except Exception:  # Another process (a test, another host) may have built it meanwhile.
            builder = cls(data_dir=data_dir)
            if not builder.is_prepared():
                raise
        return builder
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it with `tfds build "
                f"{name} --data_dir=...` (ImageNet needs its manual download), or pass download=True")
        builder.download_and_prepare()
    return builder


def _hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (used only for input) off GPUs/TPUs, before it initialises them."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as error:  # Already initialised, or no such device type.
            logger.debug("tf.config.set_visible_devices([], %r): %s", kind, error)


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
      augment: training augmentation, one of AUGMENTATIONS (see `train_transform`).
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
    source = _Source.create(name, split, data_dir, process_index, process_count, opts["download"])
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
    if augment not in AUGMENTATIONS:
        raise KeyError(f"unknown augment {augment!r}; valid: {AUGMENTATIONS}")
    opts = {**OPTIONS, **options}
    if opts["eval_views"] not in EVAL_VIEWS:
        raise KeyError(f"unknown eval_views {opts['eval_views']!r}; valid: {EVAL_VIEWS}")
    return opts


def even_shares(n: int, count: int) -> list[int]:
    """Sizes of `count` contiguous shares of n examples, the first n % count one larger (as TFDS)."""
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


@dataclasses.dataclass
class _Source:
    """One process's undecoded examples {"raw", "label"}, a decoder (raw -> (uint8[H, W, 3], ok)) and
    every process's share size."""

    raw: Any  # tf.data.Dataset
    decode: Callable
    shares: list[int]
    index: int
    image_shape: tuple[int, int, int] | None  # every image's (H, W, 3), or None when sizes vary
    # TFRecord splits: ([(file, skip, take)], parse: serialized record -> {"raw", "label"}), which
    # lets training shuffle in blocks (vgg_flax.datasets.blocks) and resume without replaying.
    records: tuple[list[tuple[str, int, int]], Callable] | None = None
    paths: bool = False  # raw examples are file paths: cheap to hold in a shuffle buffer

    @property
    def fixed_size(self) -> bool:
        return self.image_shape is not None

    @classmethod
    def create(cls, name, split, data_dir, process_index, process_count, download):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        _hide_accelerators_from_tensorflow()
        import tensorflow as tf

        if name.startswith(FOLDER_PREFIX):
            index, part = folder.folder_split(name[len(FOLDER_PREFIX):], split)
            shares = even_shares(part.stop - part.start, process_count)
            start = part.start + sum(shares[:process_index])
            sel = slice(start, start + shares[process_index])
            raw = tf.data.Dataset.from_tensor_slices(
                {"raw": np.array(index.files[sel], dtype=str), "label": index.labels[sel]})
            return cls(raw, _decode_file, shares, process_index, image_shape=None, paths=True)
        import tensorflow_datasets as tfds

        builder = _tfds_builder(name, data_dir, download=download)
        parts = tfds.even_splits(split, n=process_count)
        shares = [builder.info.splits[p].num_examples for p in parts]
        raw = builder.as_dataset(split=parts[process_index], shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()},
                                 read_config=tfds.ReadConfig(try_autocache=False))  # cache= decides
        raw = raw.map(lambda ex: {"raw": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
        shape = tuple(builder.info.features["image"].shape)
        return cls(raw, _decode_bytes, shares, process_index, image_shape=None if None in shape else shape,
                   records=_tfrecord_reading(builder, parts[process_index]))


def _tfrecord_reading(builder, split):
    """(file instructions, record parser) of a TFRecord split, or None for other file formats."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        return None
    instructions = [(fi.filename, fi.skip, fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip)
                    for fi in builder.info.splits[split].file_instructions]

    def parse(record):
        ex = builder.info.features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
        return {"raw": ex["image"], "label": tf.cast(ex["label"], tf.int32)}

    return instructions, parse


def _decode_bytes(raw):
    import tensorflow as tf

    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3]), tf.constant(True)


def _load_or_blank(path: bytes) -> tuple[np.ndarray, bool]:
    """A file that passed the scan but fails now (changed on disk) must not kill a long run."""
    try:
        return folder.load_rgb(path.decode()), True
    except Exception as error:  # Any PIL failure.
        logger.warning("skipping unreadable image %s: %s", path.decode(), error)
        return np.zeros((1, 1, 3), np.uint8), False


def _decode_file(path):
    """Training drops a file that fails here; evaluation masks it (it is then not counted)."""
    import tensorflow as tf

    image, ok = tf.numpy_function(_load_or_blank, [path], [tf.uint8, tf.bool], stateful=False)
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(ok, [])


def _decoded(source: _Source, cache: bool | None):
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

    def prepare(position, ex):
        image, ok = (ex["raw"], ex["ok"]) if decoded else source.decode(ex["raw"])
        rng = tf.random.experimental.stateless_fold_in(key, position)
        pixels = augment_fn(image, rng)
        return {"image": transforms.normalize(pixels, norm), "label": ex["label"], "mask": ok}

    ds = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).filter(lambda ex: ex["mask"])
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
        image, ok = (ex["raw"], ex["ok"]) if decoded else source.decode(ex["raw"])
        return {"image": transforms.normalize(view(image), norm), "label": ex["label"], "mask": ok}

    ds = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    num_batches = math.ceil(max(source.shares) / batch_size)
    padding = num_batches * batch_size - source.shares[source.index]
    blank = tf.nest.map_structure(lambda s: tf.zeros([d or resize for d in s.shape], s.dtype),
                                  ds.element_spec)  # ("whole" images have no static size.)
    blank["mask"] = tf.constant(False)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(opts["threads"]))
