"""Image transforms as TensorFlow ops, for tf.data (imported lazily by `vgg_flax.data.pipeline`).

Images enter as uint8[H, W, 3] RGB of any size, or as a `vgg_flax.data.regions.Region` (encoded
JPEG bytes decoded one window at a time, with the same result), and leave as float32 pixels in
[0, 255] (normalised last, by `normalize`). Training transforms take a stateless seed int64[2], so
the pipeline can key every example's randomness by its position in the stream (exact resume).
Resizing follows torchvision's `Resize(short)`: the short side becomes `short`, the long side
int(short * long / short_in), bilinear with antialiasing (PIL's filter); `CenterCrop` offsets are
round((H - crop) / 2), half to even, as Python's round.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from vgg_flax import preprocessing
from vgg_flax.data import regions, resample

# AlexNet's PCA lighting (Krizhevsky et al., 2012, Sec. 4.1), which VGG's training also used: the
# eigenvalues and eigenvectors (columns) of ImageNet's RGB covariance on [0, 1] pixels, as published
# with fb.resnet.torch. A training image gets rgb += eigvec @ (alpha * eigval), alpha ~ N(0, 0.1).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))

Transform = Callable[..., tf.Tensor]


def short_side_shape(image, short) -> tuple[tf.Tensor, tf.Tensor]:
    """(new_h, new_w) int32 of torchvision's Resize(short) for this image (a tensor or a Region)."""
    src = regions.region(image)
    h, w = src.height, src.width
    short = tf.cast(short, tf.int32)
    return tf.where(h <= w, short, short * h // w), tf.where(h <= w, short * w // h, short)


def _round(pixels: tf.Tensor) -> tf.Tensor:
    """As PIL's uint8 output: evaluation rounds, to match torchvision on PIL images. No clipping is
    needed: the triangle filter's weights are positive and sum to 1, so its outputs stay within
    [0, 255] up to float rounding, which the rounding removes."""
    return tf.round(pixels)


def resize_short_side(image, short, *, round_pixels: bool = False) -> tf.Tensor:
    """float32[h', w', 3]: `image` resized so its short side is `short` (torchvision's Resize(short))."""
    src = regions.region(image)
    pixels, _, _ = src.read(0, 0, src.height, src.width)
    out = resample.resize(pixels, tf.stack(short_side_shape(src, short)))
    return _round(out) if round_pixels else out


def resized_window(image, short, top, left, size: int, *, round_pixels: bool = False):
    """float32[size, size, 3]: resize_short_side(image, short)[top:top + size, left:left + size],
    computing only that window (the same antialiased bilinear filter via scale-and-translate), which
    makes large training scales (S up to 512) several times cheaper than resizing the whole image.
    Of a Region it reads only the source window the filter reaches (`_filter_span`)."""
    src = regions.region(image)
    scale = (tf.cast(tf.stack(short_side_shape(src, short)), tf.float32)
             / tf.cast(tf.stack([src.height, src.width]), tf.float32))
    start = tf.cast(tf.stack([top, left]), tf.float32)
    lo, hi = _filter_span(start, size, scale, tf.stack([src.height, src.width]))
    pixels, y0, x0 = src.read(lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])
    out = resample.scale_and_translate(pixels, [size, size], scale,
                                       tf.cast(tf.stack([y0, x0]), tf.float32) * scale - start)
    out = tf.ensure_shape(out, [size, size, 3])
    return _round(out) if round_pixels else out


def _filter_span(start, size: int, scale, shape):
    """[lo, hi) int32[2] of the source rows and columns that output pixels start..start + size - 1 of
    a triangle filter read: output x samples at (x + 0.5) / scale within max(1 / scale, 1), plus a
    pixel on each side for rounding; clipped to the image."""
    support = tf.maximum(1.0 / scale, 1.0)
    lo = tf.cast(tf.floor((start + 0.5) / scale - support - 0.5), tf.int32) - 1
    hi = tf.cast(tf.math.ceil((start + size - 0.5) / scale + support - 0.5), tf.int32) + 2
    return tf.maximum(lo, 0), tf.minimum(hi, shape)


def center_offsets(image, short, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(top, left) of torchvision's CenterCrop(size) after Resize(short): round((H - size) / 2)."""
    new_h, new_w = short_side_shape(image, short)
    half = lambda n: tf.cast(tf.round(tf.cast(n - size, tf.float32) / 2.0), tf.int32)
    return half(new_h), half(new_w)


def resize_center_crop(image, short, size: int, *, round_pixels: bool = False):
    """torchvision's Resize(short) + CenterCrop(size), float32[size, size, 3]."""
    top, left = center_offsets(image, short, size)
    return resized_window(image, short, top, left, size, round_pixels=round_pixels)


def pca_lighting(image: tf.Tensor, seed: tf.Tensor, std: float) -> tf.Tensor:
    """AlexNet's colour shift on float [0, 255] pixels (see PCA_EIGVAL)."""
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=std)
    shift = tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL)) * 255.0
    return per_channel(image, offset=shift)


def paper_crop(image, seed, *, size: int, scale_range: tuple[int, int], color_pca: float):
    """VGG's training crop: short side S ~ U{S_min..S_max}, random size crop, flip, PCA lighting."""
    s_min, s_max = scale_range
    if s_min < size or s_max < s_min:
        raise ValueError(f"scale_range {scale_range} must satisfy image_size {size} <= S_min <= S_max")
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    short = tf.random.stateless_uniform([], seeds[0], minval=s_min, maxval=s_max + 1, dtype=tf.int32)
    new_h, new_w = short_side_shape(image, short)
    top = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=new_h - size + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[4], minval=0, maxval=new_w - size + 1, dtype=tf.int32)
    x = resized_window(image, short, top, left, size)
    x = tf.image.stateless_random_flip_left_right(x, seed=seeds[2])
    if color_pca:
        x = pca_lighting(x, seeds[3], color_pca)
    return tf.clip_by_value(x, 0.0, 255.0)


def inception_crop(image, seed, *, size: int, area_range, aspect_range):
    """Inception's random-resized crop (area fraction, aspect ratio), resized to size x size, flip.

    After 10 failed draws the whole image is used (TF's rule; torchvision falls back to a center crop).
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    src = regions.region(image)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.stack([src.height, src.width, 3]), bounding_boxes=tf.zeros([1, 0, 4]), seed=seeds[0],
        min_object_covered=area_range[0], aspect_ratio_range=aspect_range, area_range=area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = regions.crop(src, begin[0], begin[1], extent[0], extent[1])
    x = resample.resize(window, [size, size])
    x = tf.image.stateless_random_flip_left_right(tf.clip_by_value(x, 0.0, 255.0), seed=seeds[1])
    return tf.ensure_shape(x, [size, size, 3])


def shift_crop(image, seed, *, size: int, shift: int, flip: bool = False):
    """Small-image augmentation: resize + center crop, zero-pad by `shift`, random crop (a translation
    of up to `shift` pixels), optionally flip. shift=0 and flip=False is the identity on size x size."""
    x = resize_center_crop(image, size, size)
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    if shift:
        x = tf.pad(x, [[shift, shift], [shift, shift], [0, 0]])
        x = tf.image.stateless_random_crop(x, [size, size, 3], seed=seeds[0])
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seed=seeds[1])
    return x


def _paper(size: int, options: dict) -> Transform:
    q = int(round(size * 256 / 224))  # the paper's S = 256 at 224
    return lambda im, seed: paper_crop(im, seed, size=size, scale_range=options["scale_range"] or (q, q),
                                       color_pca=options["color_pca"])


def _inception(size: int, options: dict) -> Transform:
    return lambda im, seed: inception_crop(im, seed, size=size, area_range=options["area_range"],
                                           aspect_range=options["aspect_range"])


def _shift(size: int, options: dict) -> Transform:
    # No flip: digits are not mirror-symmetric.
    shift = size // 8 if options["shift"] is None else options["shift"]
    return lambda im, seed: shift_crop(im, seed, size=size, shift=shift)


def _flip(size: int, options: dict) -> Transform:
    return lambda im, seed: shift_crop(im, seed, size=size, shift=0, flip=True)


def _none(size: int, options: dict) -> Transform:
    return lambda im, seed: shift_crop(im, seed, size=size, shift=0)


# The training augmentations: name -> fn(image_size, options) -> fn(image, seed). A new augmentation
# is a function here and a row of this table (options it reads are keys of pipeline.OPTIONS).
AUGMENTATIONS: dict[str, Callable[[int, dict], Transform]] = {
    "paper": _paper,          # `paper_crop`: S fixed or jittered by options["scale_range"]
    "inception": _inception,  # `inception_crop`: options["area_range"], options["aspect_range"]
    "shift": _shift,          # up to options["shift"] pixels of translation (default S // 8)
    "flip": _flip,            # center crop and flip
    "none": _none,            # resize + center crop only
}


def train_transform(augment: str, *, image_size: int, options: dict) -> Transform:
    """fn(uint8[H, W, 3], seed int64[2]) -> float32[S, S, 3] in [0, 255]: the AUGMENTATIONS row
    `augment`; a KeyError lists the valid names."""
    if augment not in AUGMENTATIONS:
        raise KeyError(f"unknown augment {augment!r}; valid: {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[augment](image_size, options)


def multi_crops(image: tf.Tensor, *, size: int, grid: int) -> tf.Tensor:
    """float32[2 * grid**2, S, S, 3]: a grid x grid of crops spanning the image (rows, then columns),
    followed by their horizontal flips (the paper's multi-crop evaluation, grid 5)."""
    shape = tf.shape(image)
    crops = []
    for i in range(grid):
        for j in range(grid):
            top = _grid_offset(shape[0] - size, i, grid)
            left = _grid_offset(shape[1] - size, j, grid)
            crops.append(image[top:top + size, left:left + size])
    crops = tf.ensure_shape(tf.stack(crops), [grid * grid, size, size, 3])
    return tf.concat([crops, crops[:, :, ::-1]], axis=0)


def _grid_offset(span, i: int, grid: int):
    if grid == 1:
        return tf.cast(tf.round(tf.cast(span, tf.float32) / 2.0), tf.int32)
    return tf.cast(tf.round(tf.cast(span * i, tf.float32) / (grid - 1)), tf.int32)


def _center(image_size: int, resize: int, grid: int) -> Transform:
    return lambda im: resize_center_crop(im, resize, image_size, round_pixels=True)


def _full(image_size: int, resize: int, grid: int) -> Transform:
    return lambda im: resize_center_crop(im, resize, resize, round_pixels=True)


def _multicrop(image_size: int, resize: int, grid: int) -> Transform:
    return lambda im: multi_crops(resize_short_side(im, resize, round_pixels=True), size=image_size,
                                  grid=grid)


def _whole(image_size: int, resize: int, grid: int) -> Transform:
    return lambda im: resize_short_side(im, resize, round_pixels=True)


# The evaluation views: name -> fn(image_size, resize, grid) -> fn(image). The evaluation protocols
# (`vgg_flax.evaluation.PROTOCOLS`) name the view each one reads.
EVAL_VIEWS: dict[str, Callable[[int, int, int], Transform]] = {
    "center": _center,        # the center S crop, float32[S, S, 3] (torchvision's eval preset)
    "full": _full,            # the center Q x Q square, float32[Q, Q, 3] (dense evaluation)
    "multicrop": _multicrop,  # `multi_crops`, float32[2 * grid**2, S, S, 3]
    "whole": _whole,          # the whole resized image, float32[h, w, 3] (the paper's dense input)
}


def eval_transform(views: str, *, image_size: int, resize: int, grid: int = 5) -> Transform:
    """fn(uint8[H, W, 3]) -> float32 pixels: short side `resize` (Q, rounded as PIL), then the
    EVAL_VIEWS row `views`; a KeyError lists the valid names."""
    if views not in EVAL_VIEWS:
        raise KeyError(f"unknown eval views {views!r}; valid: {sorted(EVAL_VIEWS)}")
    if resize < image_size:
        raise ValueError(f"eval resize {resize} is smaller than the crop {image_size}")
    return EVAL_VIEWS[views](image_size, resize, grid)


def normalize(pixels: tf.Tensor, norm: preprocessing.Normalization) -> tf.Tensor:
    """`norm` (a preprocessing preset) applied to float [0, 255] RGB pixels [..., W, 3], in TensorFlow:
    x * (scale / std) - mean / std per channel (`per_channel`), equal to numpy's up to float rounding."""
    x = tf.cast(pixels, tf.float32)
    if norm.bgr:
        x = x[..., ::-1]
    std = tf.constant(norm.std, tf.float32)
    return per_channel(x, norm.scale / std, -tf.constant(norm.mean, tf.float32) / std)


def per_channel(x: tf.Tensor, scale=None, offset=None) -> tf.Tensor:
    """x * scale + offset for float32 x[..., W, C] and per-channel scale, offset [C] (None: skip).

    TensorFlow's CPU kernels broadcast a [C] vector over an image slowly; over the rows of x seen as
    [-1, W * C], with the vectors tiled W times, the same arithmetic is several times faster
    (docs/PERFORMANCE.md, input pipeline)."""
    shape = tf.shape(x)
    rows = tf.reshape(x, tf.stack([-1, shape[-2] * shape[-1]]))
    if scale is not None:
        rows = rows * tf.tile(tf.cast(scale, tf.float32), shape[-2:-1])
    if offset is not None:
        rows = rows + tf.tile(tf.cast(offset, tf.float32), shape[-2:-1])
    out = tf.reshape(rows, shape)
    out.set_shape(x.shape)
    return out
