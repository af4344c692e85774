"""vgg_flax.data.resample: TF's antialiased ScaleAndTranslate computed as two row passes, the same bits."""

import numpy as np
import pytest

try:  # torch must be imported before TensorFlow initialises, or importing it later segfaults.
    import torchvision  # noqa: F401
except ImportError:
    pass
import tensorflow as tf  # noqa: E402

from vgg_flax.data import resample  # noqa: E402


def _reference(image, size, scale, translation):
    return tf.raw_ops.ScaleAndTranslate(images=image[None], size=size, scale=scale, translation=translation,
                                        kernel_type="triangle", antialias=True)[0].numpy()


# (input h, w), (output h, w), scale, translation: downscaling (antialiased), upscaling, mixed, shifted
# windows that sample outside the image (zero rows), and a 1-pixel input.
CASES = [((31, 45), (20, 17), (0.66, 0.37), (0.0, 0.0)),
         ((13, 9), (30, 25), (2.4, 2.9), (0.0, 0.0)),
         ((40, 23), (17, 40), (0.41, 1.8), (-3.7, 2.25)),
         ((50, 50), (32, 32), (0.9, 0.9), (-20.5, 12.0)),
         ((1, 1), (4, 3), (4.0, 3.0), (0.0, 0.0))]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("shape,size,scale,translation", CASES)
def test_scale_and_translate_is_tensorflows_bit_for_bit(shape, size, scale, translation, channels, dtype):
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (*shape, channels)).astype(dtype))
    want = _reference(image, size, scale, translation)
    got = resample.scale_and_translate(image, size, scale, translation).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    flipped = resample.scale_and_translate(image, size, scale, translation, flip=tf.constant(True))
    np.testing.assert_array_equal(flipped.numpy(), want[:, ::-1])


@pytest.mark.parametrize("shape,size",
                         [((375, 500), (224, 224)), ((60, 41), (224, 224)), ((37, 80), (20, 43))])
def test_resize_is_tf_image_resize_antialiased_bit_for_bit(shape, size):
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8))
    want = tf.image.resize(image, size, method="bilinear", antialias=True).numpy()
    np.testing.assert_array_equal(resample.resize(image, size).numpy(), want)


def test_eval_views_of_saturated_pixels_round_into_0_255_without_clipping():
    """transforms._round does not clip: a 0/255 checkerboard's antialiased resize rounds into [0, 255]."""
    from vgg_flax.data import transforms

    image = tf.constant((np.random.default_rng(2).integers(0, 2, (75, 101, 1)) * 255).repeat(3, 2), tf.uint8)
    for short, size in [(64, 56), (150, 140), (75, 75)]:
        out = transforms.eval_transform("center", image_size=size, resize=short)(image).numpy()
        assert out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
        assert out.max() == 255 and out.min() == 0
