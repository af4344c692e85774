"""Source pixels for the transforms, read one window at a time, so a JPEG decodes only what a crop needs.

A transform first draws its geometry from the image's shape, then asks its `Region` for the window
its resampling filter reads. A decoded image (`whole`) answers with all of itself, which keeps the
transforms exactly what they were on decoded images. A JPEG (`jpeg`) has its shape in its header
(`tf.io.extract_jpeg_shape`), so the random crop is drawn from the same shape as after decoding (the
same distribution, the same window), and `tf.io.decode_and_crop_jpeg` decodes just that window plus
MARGIN pixels on each side: libjpeg-turbo upsamples subsampled chroma at a crop's edge from the crop
alone, which changes the outer row and column of a 4:2:0 JPEG; with the margin, the window's pixels
are those of the whole decoded image (tests/data/test_regions.py checks this for 4:4:4, 4:2:2,
4:2:0, progressive and grayscale JPEGs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

MARGIN = 2  # pixels decoded around a JPEG window (one suffices for 2x chroma upsampling)


@dataclasses.dataclass(frozen=True)
class Region:
    """An image's (height, width) int32 scalars and read(top, left, height, width) -> (uint8[h', w', 3],
    top', left'): pixels covering at least that window, and where they start in the image."""

    height: tf.Tensor
    width: tf.Tensor
    read: Callable


def whole(image: tf.Tensor) -> Region:
    """A decoded uint8[H, W, 3] image: every read returns all of it."""
    shape = tf.shape(image)
    zero = tf.constant(0, tf.int32)
    return Region(shape[0], shape[1], lambda top, left, height, width: (image, zero, zero))


def jpeg(raw: tf.Tensor) -> Region:
    """Encoded JPEG bytes (a string scalar): reads decode only the window, plus MARGIN pixels."""
    shape = tf.io.extract_jpeg_shape(raw)
    h, w = shape[0], shape[1]

    def read(top, left, height, width):
        y0, x0 = tf.maximum(top - MARGIN, 0), tf.maximum(left - MARGIN, 0)
        y1, x1 = tf.minimum(top + height + MARGIN, h), tf.minimum(left + width + MARGIN, w)
        window = tf.io.decode_and_crop_jpeg(raw, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3)
        return tf.ensure_shape(window, [None, None, 3]), y0, x0

    return Region(h, w, read)


def region(image) -> Region:
    """`image` as a Region: a Region as it is, a decoded uint8[H, W, 3] tensor or array via `whole`."""
    return image if isinstance(image, Region) else whole(tf.convert_to_tensor(image))


def crop(region_: Region, top, left, height, width) -> tf.Tensor:
    """uint8[height, width, 3]: exactly the image's pixels in that window."""
    pixels, y0, x0 = region_.read(top, left, height, width)
    return tf.slice(pixels, tf.stack([top - y0, left - x0, 0]), tf.stack([height, width, 3]))


def on_encoded(fn: Callable[[Region], tf.Tensor], raw: tf.Tensor) -> tf.Tensor:
    """fn(jpeg(raw)) for JPEG bytes, else fn of the whole decoded image (PNG, GIF, BMP)."""
    def decoded():
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        return fn(whole(tf.ensure_shape(image, [None, None, 3])))

    return tf.cond(tf.io.is_jpeg(raw), lambda: fn(jpeg(raw)), decoded)
