"""The data room's extension tables: augmentations, eval views and dataset sources are plain dicts,
an unknown name is a KeyError listing the valid ones, and a new row is all a new entry needs."""

import numpy as np
import pytest

from vgg_flax.data import embedded, pipeline, sources

try:  # torch must be imported before TensorFlow initialises, or importing it later segfaults.
    import torchvision  # noqa: F401
except ImportError:
    pass

import tensorflow as tf  # noqa: E402

from vgg_flax.data import transforms  # noqa: E402


def test_an_unknown_augmentation_is_a_key_error_not_a_shift_crop():
    # Before the table, an unknown name fell through to shift_crop silently.
    with pytest.raises(KeyError, match="'mixup'.*valid: \\['flip', 'inception', 'none', 'paper', 'shift'\\]"):
        transforms.train_transform("mixup", image_size=8, options=pipeline.OPTIONS)


def test_an_unknown_eval_view_is_a_key_error_listing_the_views():
    with pytest.raises(KeyError, match="'tiles'.*'center', 'full', 'multicrop', 'whole'"):
        transforms.eval_transform("tiles", image_size=8, resize=8)


def test_an_unknown_embedded_dataset_is_a_key_error():
    with pytest.raises(KeyError, match="sklearn_digits"):
        embedded.builder_class("digits2")


def test_source_kind_reads_the_prefix_only_for_a_row_of_sources():
    assert sources.source_kind("folder:/a:b") == ("folder", "/a:b")
    assert sources.source_kind("tfds:cifar10:3.0.2") == ("tfds", "cifar10:3.0.2")
    assert sources.source_kind("cifar10:3.0.2") == ("tfds", "cifar10:3.0.2")  # a TFDS version
    assert sources.source_kind("sklearn_digits") == ("tfds", "sklearn_digits")


def test_a_new_augmentation_and_a_new_source_are_one_row_each(monkeypatch):
    """A toy augmentation (invert) and a toy source (16 solid 8x8 images in memory) through the real
    pipeline: nothing else is edited."""
    def invert(size, options):
        return lambda im, seed: 255.0 - transforms.resize_center_crop(im, size, size)

    monkeypatch.setitem(transforms.AUGMENTATIONS, "invert", invert)
    pixels = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(16)]

    def info(name, rest, data_dir):
        return sources.DatasetInfo(name=name, num_classes=16, class_names=tuple(map(str, range(16))),
                                   image_shape=(8, 8, 3), _sizes=lambda split: 16)

    def create(rest, split, data_dir, process_index, process_count, download):
        raw = tf.data.Dataset.from_tensor_slices({"raw": np.stack(pixels),
                                                  "label": np.arange(16, dtype=np.int32)})
        return sources.Source(raw, lambda x: (x, tf.constant(True)), [16], 0, image_shape=(8, 8, 3))

    monkeypatch.setitem(sources.SOURCES, "toy", sources.SourceKind(info, create))
    assert pipeline.dataset_info("toy:any").num_examples("train") == 16
    batch = next(pipeline.create_dataset("toy:any", "train", batch_size=16, train=True, image_size=8,
                                         augment="invert", normalization="symmetric", seed=1))
    values = np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5)  # symmetric: [-1, 1] -> [0, 255]
    np.testing.assert_allclose(values, 255 - 10 * batch["label"], atol=0.5)
