"""Where examples come from: TFDS splits, image folders and in-memory encoded images, as one process's
share of undecoded examples plus a decoder (`Source`), and what a pipeline knows before reading
(`DatasetInfo`). TensorFlow is imported only inside the functions here and is hidden from GPUs/TPUs,
so it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vgg_flax.data import folder
from vgg_flax.data.embedded import EMBEDDED, builder_class

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
    """The `DatasetInfo` of a dataset name (see `SOURCES`)."""
    kind, rest = source_kind(name)
    return SOURCES[kind].info(name, rest, data_dir)


def _folder_info(name: str, root: str, data_dir: str | None) -> DatasetInfo:
    # Class names from the first usual split folder (they are the same in every split), or root.
    index, _ = folder.folder_split(root, (folder.split_folders(root) or ["all"])[0])
    return DatasetInfo(name=name, num_classes=len(index.class_names), class_names=index.class_names,
                       image_shape=None, _sizes=lambda split: _folder_size(root, split),
                       _skipped=lambda split: folder.folder_split(root, split)[0].skipped)


def _tfds_info(name: str, rest: str, data_dir: str | None) -> DatasetInfo:
    builder = tfds_builder(rest, data_dir, download=False)
    label, image = builder.info.features["label"], builder.info.features["image"]
    shape = tuple(image.shape)
    return DatasetInfo(name=name, num_classes=label.num_classes, class_names=tuple(label.names),
                       image_shape=shape if None not in shape else None,
                       _sizes=lambda split: builder.info.splits[split].num_examples)


def _folder_size(root: str, split: str) -> int:
    _, part = folder.folder_split(root, split)
    return part.stop - part.start


def tfds_builder(name: str, data_dir: str | None, *, download: bool):
    """A prepared TFDS builder; embedded datasets (`embedded.EMBEDDED`) are built locally (offline)
    on first use."""
    hide_accelerators_from_tensorflow()
    import tensorflow_datasets as tfds

    if name in EMBEDDED:
        return _embedded_builder(name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it with `tfds build "
                f"{name} --data_dir=...` (ImageNet needs its manual download), or pass download=True")
        builder.download_and_prepare()
    return builder


def _embedded_builder(name: str, data_dir: str | None):
    cls = builder_class(name)
    builder = cls(data_dir=data_dir)
    try:
        builder.download_and_prepare()  # No download: a no-op once built.
    except Exception:  # Another process (a test, another host) may have built it meanwhile.
        builder = cls(data_dir=data_dir)
        if not builder.is_prepared():
            raise
    return builder


def hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (used only for input) off GPUs/TPUs, before it initialises them."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as error:  # Already initialised, or no such device type.
            logger.debug("tf.config.set_visible_devices([], %r): %s", kind, error)


def even_shares(n: int, count: int) -> list[int]:
    """Sizes of `count` contiguous shares of n examples, the first n % count one larger (as TFDS)."""
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


@dataclasses.dataclass
class Source:
    """One process's undecoded examples {"raw", "label"}, a decoder (raw -> (uint8[H, W, 3], ok)) and
    every process's share size."""

    raw: Any  # tf.data.Dataset
    decode: Callable
    shares: list[int]
    index: int
    image_shape: tuple[int, int, int] | None  # every image's (H, W, 3), or None when sizes vary
    # TFRecord splits: ([(file, skip, take)], parse: serialized record -> {"raw", "label"}), which
    # lets training shuffle in blocks (vgg_flax.data.blocks) and resume without replaying.
    records: tuple[list[tuple[str, int, int]], Callable] | None = None
    paths: bool = False  # raw examples are file paths: cheap to hold in a shuffle buffer

    @property
    def fixed_size(self) -> bool:
        return self.image_shape is not None

    @classmethod
    def create(cls, name, split, data_dir, process_index, process_count, download):
        """This process's share of a split of a dataset name (see `SOURCES`)."""
        _check_process(process_index, process_count)
        hide_accelerators_from_tensorflow()
        kind, rest = source_kind(name)
        return SOURCES[kind].create(rest, split, data_dir, process_index, process_count, download)

    @classmethod
    def from_encoded(cls, images: Sequence[bytes], labels, process_index: int, process_count: int):
        """This process's even share of in-memory encoded images and their int labels."""
        _check_process(process_index, process_count)
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {len(images)} integers, one per image; got {labels.dtype} "
                             f"of shape {labels.shape}")
        shares, sel = _share(range(len(images)), process_index, process_count)
        hide_accelerators_from_tensorflow()
        import tensorflow as tf

        raw = tf.data.Dataset.from_tensor_slices(
            {"raw": np.array(list(images[sel]), dtype=object), "label": labels[sel].astype(np.int32)})
        return cls(raw, decode_bytes, shares, process_index, image_shape=None)


def _folder_source(root, split, data_dir, process_index, process_count, download) -> Source:
    import tensorflow as tf

    index, part = folder.folder_split(root, split)
    shares, sel = _share(part, process_index, process_count)
    raw = tf.data.Dataset.from_tensor_slices(
        {"raw": np.array(index.files[sel], dtype=str), "label": index.labels[sel]})
    return Source(raw, _decode_file, shares, process_index, image_shape=None, paths=True)


def _tfds_source(name, split, data_dir, process_index, process_count, download) -> Source:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir, download=download)
    parts = tfds.even_splits(split, n=process_count)
    shares = [builder.info.splits[p].num_examples for p in parts]
    raw = builder.as_dataset(split=parts[process_index], shuffle_files=False,
                             decoders={"image": tfds.decode.SkipDecoding()},
                             read_config=tfds.ReadConfig(try_autocache=False))  # cache= decides
    raw = raw.map(lambda ex: {"raw": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
    shape = tuple(builder.info.features["image"].shape)
    return Source(raw, decode_bytes, shares, process_index, image_shape=None if None in shape else shape,
                  records=_tfrecord_reading(builder, parts[process_index]))


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """Where one kind of dataset name reads from.

    info: fn(name, rest, data_dir) -> DatasetInfo; create: fn(rest, split, data_dir, process_index,
    process_count, download) -> Source, `rest` being the name without its "kind:" prefix.
    """

    info: Callable[[str, str, str | None], DatasetInfo]
    create: Callable[..., Source]


# The dataset sources: "kind:rest" selects a kind ("folder:/data/pets"); a bare name is an embedded
# dataset (`embedded.EMBEDDED`, a TFDS builder built locally) or else a TFDS name ("imagenet2012",
# "cifar10:3.0.2"). A new source is a row here.
SOURCES: dict[str, SourceKind] = {
    "folder": SourceKind(_folder_info, _folder_source),  # an image folder (`vgg_flax.data.folder`)
    "tfds": SourceKind(_tfds_info, _tfds_source),        # TFDS, embedded datasets included
}
FOLDER_PREFIX = "folder:"


def source_kind(name: str) -> tuple[str, str]:
    """(SOURCES key, the name without its prefix) of a dataset name."""
    kind, sep, rest = name.partition(":")
    if sep and kind in SOURCES:
        return kind, rest
    return "tfds", name


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def _share(part: range | slice, process_index: int, process_count: int) -> tuple[list[int], slice]:
    """(every process's share size, this process's slice) of the examples `part`."""
    shares = even_shares(part.stop - part.start, process_count)
    start = part.start + sum(shares[:process_index])
    return shares, slice(start, start + shares[process_index])


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


def decode_bytes(raw):
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
