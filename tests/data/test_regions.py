"""Decoding only a crop's window (vgg_flax.data.regions): the same pixels and the same crops as decoding
the whole image, and `pipeline.from_encoded` as a source with create_dataset's guarantees."""

import io

import numpy as np
import pytest
from PIL import Image

from vgg_flax.data import pipeline

try:  # torch must be imported before TensorFlow initialises, or importing it later segfaults.
    import torchvision  # noqa: F401
except ImportError:
    pass
import tensorflow as tf  # noqa: E402

from vgg_flax.data import regions, transforms  # noqa: E402

# (PIL mode, save options): every chroma layout libjpeg decodes differently at a crop's edge.
JPEG_KINDS = [("RGB", dict(subsampling=0)), ("RGB", dict(subsampling=1)), ("RGB", dict(subsampling=2)),
              ("RGB", dict(progressive=True)), ("L", {})]


def _photo(height, width, seed=0):
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    noise = np.random.default_rng(seed).normal(0, 20, (height, width, 3))
    rgb = np.dstack([128 + 100 * np.sin(x / 7.0 + seed), 128 + 90 * np.cos((x + y) / 11.0),
                     255 * (x / width) * (1 - y / height)]) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _jpeg(array, mode="RGB", **options):
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=85, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,options", JPEG_KINDS)
def test_a_jpeg_window_has_the_pixels_of_the_whole_decoded_image(mode, options):
    raw = _jpeg(_photo(75, 101), mode, **options)
    full = tf.io.decode_jpeg(raw, channels=3).numpy()
    src = regions.jpeg(tf.constant(raw))
    assert (int(src.height), int(src.width)) == full.shape[:2]
    rng = np.random.default_rng(0)
    for _ in range(30):
        top, left = int(rng.integers(0, 74)), int(rng.integers(0, 100))
        h, w = int(rng.integers(1, 76 - top)), int(rng.integers(1, 102 - left))
        window = regions.crop(src, top, left, h, w).numpy()
        np.testing.assert_array_equal(window, full[top:top + h, left:left + w])


def _both(fn, raw):
    """fn of a JPEG read window by window and of the same JPEG decoded whole."""
    image = tf.io.decode_jpeg(raw, channels=3)
    return fn(regions.jpeg(tf.constant(raw))).numpy(), fn(regions.whole(image)).numpy()


@pytest.mark.parametrize("seed", range(6))
def test_inception_crop_of_a_jpeg_is_bit_identical(seed):
    raw = _jpeg(_photo(90, 120, seed), subsampling=2)
    key = tf.constant([seed, 3], tf.int64)
    fn = lambda src: transforms.inception_crop(src, key, size=32, area_range=(0.08, 1.0),
                                               aspect_range=(3 / 4, 4 / 3))
    window, whole = _both(fn, raw)
    np.testing.assert_array_equal(window, whole)


@pytest.mark.parametrize("seed", range(6))
def test_paper_crop_of_a_jpeg_is_the_same_window_up_to_rounding(seed):
    """The source window read covers the filter: up- and downscaling, windows at the image's edges."""
    raw = _jpeg(_photo(90, 120, seed), subsampling=2)
    key = tf.constant([seed, 5], tf.int64)
    fn = lambda src: transforms.paper_crop(src, key, size=32, scale_range=(33, 140), color_pca=0.1)
    window, whole = _both(fn, raw)
    np.testing.assert_allclose(window, whole, atol=0.01)


@pytest.mark.parametrize("shape", [(90, 120), (120, 77)])
def test_eval_center_crop_of_a_jpeg_is_the_same_up_to_rounding(shape):
    raw = _jpeg(_photo(*shape), subsampling=2)
    for short, size in [(64, 56), (40, 40), (200, 180)]:
        view = transforms.eval_transform("center", image_size=size, resize=short)
        window, whole = _both(view, raw)
        diff = np.abs(window - whole)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # A rounding tie may land one level away.


def _encoded(n=24, fmt="JPEG"):
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(_photo(40 + i % 3, 52, seed=i)).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


def test_from_encoded_evaluates_each_image_once_and_resumes_training_exactly():
    images, labels = _encoded(), np.arange(24)
    got = []
    for index in range(2):
        for b in pipeline.from_encoded(images, labels, batch_size=5, train=False, image_size=32,
                                       process_index=index, process_count=2):
            got += b["label"][b["mask"]].tolist()
    assert sorted(got) == list(range(24))
    kw = dict(batch_size=8, train=True, image_size=32, augment="inception", seed=3)
    run = pipeline.from_encoded(images, labels, **kw)
    batches = [next(run) for _ in range(5)]
    assert sorted(np.concatenate([b["label"] for b in batches[:3]]).tolist()) == list(range(24))
    resumed = next(pipeline.from_encoded(images, labels, start_step=4, **kw))
    np.testing.assert_array_equal(resumed["image"], batches[4]["image"])
    whole = next(pipeline.from_encoded(images, labels, start_step=4, decode_window=False, **kw))
    np.testing.assert_array_equal(whole["image"], batches[4]["image"])


def test_from_encoded_decodes_png_whole_and_checks_labels():
    images, labels = _encoded(8, "PNG"), np.arange(8)
    kw = dict(batch_size=8, train=True, image_size=32, augment="paper", scale_range=(40, 60))
    window = next(pipeline.from_encoded(images, labels, **kw))
    whole = next(pipeline.from_encoded(images, labels, decode_window=False, **kw))
    np.testing.assert_array_equal(window["image"], whole["image"])
    with pytest.raises(ValueError, match="labels must be 8 integers"):
        pipeline.from_encoded(images, labels[:7], **kw)
