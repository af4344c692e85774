"""Antialiased bilinear resampling as TensorFlow's ScaleAndTranslate computes it, about twice as fast.

`tf.raw_ops.ScaleAndTranslate` (behind `tf.image.resize(..., antialias=True)`) filters the rows of
an image by adding whole weighted rows (a vectorised loop), then its columns pixel by pixel with an
inner loop over the 3 channels (scalar code), several times the row pass and, after decoding, the
largest cost of a training image (docs/PERFORMANCE.md, input pipeline). `scale_and_translate`
runs both passes as row passes, each one ScaleAndTranslate of a [1, n, 1, m] "image" (its width-1
column pass is an exact copy), the second on the transposed intermediate: the same weights, sums in
the same order, so the result equals ScaleAndTranslate bit for bit (tests/data/test_resample.py).
"""

from __future__ import annotations

import tensorflow as tf


def rows(x: tf.Tensor, size, scale, translation) -> tf.Tensor:
    """float32[size, m]: the rows of x[n, m] (any real dtype) resampled, as ScaleAndTranslate along
    its height with the triangle kernel, antialiased: output row i samples at (i + 0.5 - t) / s."""
    n, m = tf.shape(x)[0], tf.shape(x)[1]
    one = tf.constant(1, tf.int32)
    out = tf.raw_ops.ScaleAndTranslate(
        images=tf.reshape(x, tf.stack([one, n, one, m])), size=tf.stack([tf.cast(size, tf.int32), one]),
        scale=tf.stack([tf.cast(scale, tf.float32), 1.0]),
        translation=tf.stack([tf.cast(translation, tf.float32), 0.0]), kernel_type="triangle",
        antialias=True)
    return tf.reshape(out, tf.stack([tf.cast(size, tf.int32), m]))


def scale_and_translate(image: tf.Tensor, size, scale, translation, *, flip=None) -> tf.Tensor:
    """float32[h', w', C] = tf.raw_ops.ScaleAndTranslate(image[None], size, scale, translation,
    kernel_type="triangle", antialias=True)[0] for image[h, w, C] (uint8 or float); `flip` (a bool
    tensor or None) mirrors the output left-right, at the cost of a copy of rows."""
    shape = tf.shape(image)
    h, w, c = shape[0], shape[1], shape[2]
    size = tf.cast(size, tf.int32)
    scale, translation = tf.cast(scale, tf.float32), tf.cast(translation, tf.float32)
    y = rows(tf.reshape(image, tf.stack([h, w * c])), size[0], scale[0], translation[0])  # [h', w*C]
    y = tf.transpose(tf.reshape(y, tf.stack([size[0], w, c])), [1, 0, 2])  # [w, h', C]
    y = rows(tf.reshape(y, tf.stack([w, size[0] * c])), size[1], scale[1], translation[1])  # [w', h'*C]
    if flip is not None:
        y = tf.cond(flip, lambda: tf.reverse(y, [0]), lambda: y)
    return tf.transpose(tf.reshape(y, tf.stack([size[1], size[0], c])), [1, 0, 2])


def resize(image: tf.Tensor, size) -> tf.Tensor:
    """float32: tf.image.resize(image[h, w, C], size, "bilinear", antialias=True), the same values."""
    size = tf.cast(size, tf.int32)
    scale = tf.cast(size, tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)
    return scale_and_translate(image, size, scale, tf.zeros([2]))
