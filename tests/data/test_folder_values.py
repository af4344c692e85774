"""The folder reader's colour conversions on values: every mode equals PIL's `convert("RGB")` (what
torchvision's ImageFolder loader does), read directly and through the pipeline."""

import numpy as np
import pytest
from PIL import Image

from vgg_flax import preprocessing
from vgg_flax.data import folder
from vgg_flax.data import pipeline as ip


def _modes(rng):
    """{file name: PIL image} in modes whose naive array is not RGB: alpha, CMYK, palettes, 1-bit, LA."""
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    alpha[:4] = 0  # fully transparent rows keep their colour under convert("RGB")
    palette = Image.fromarray(rgb).quantize(colors=37)
    return {
        "rgba.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "palette.png": palette,
        "palette_alpha.png": palette.copy(),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "la.png": Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), "LA"),
        "bilevel.png": Image.fromarray(rgb[:, :, 1] > 127),
    }


def test_every_mode_equals_pil_convert_rgb_directly_and_through_the_pipeline(tmp_path):
    images = _modes(np.random.default_rng(0))
    (tmp_path / "train" / "x").mkdir(parents=True)
    for file_name, image in images.items():
        extra = {"transparency": 3} if file_name in ("palette_alpha.png", "palette.gif") else {}
        image.save(tmp_path / "train" / "x" / file_name, **extra)
    paths = sorted((tmp_path / "train" / "x").iterdir())
    expected = {}
    for path in paths:
        with Image.open(path) as image:
            assert image.mode != "RGB", path.name
            expected[path.name] = np.asarray(image.convert("RGB"))
        got = folder.load_rgb(str(path))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected[path.name], err_msg=path.name)
    # The pipeline (eval at the native size: no resampling) yields the same pixels, in file order.
    batch = next(ip.create_dataset(f"folder:{tmp_path}", "train", batch_size=len(paths), train=False,
                                   image_size=24, eval_resize=24, normalization="symmetric"))
    assert batch["mask"].all()
    pixels = np.round(preprocessing.get_preset("symmetric").invert(batch["image"])).astype(np.uint8)
    for path, got in zip(paths, pixels, strict=True):
        np.testing.assert_array_equal(got, expected[path.name], err_msg=path.name)
    # Not a vacuous comparison: the modes' raw arrays are not their RGB conversions.
    for name in ("rgba.png", "cmyk.tif", "palette.png"):
        raw = np.asarray(Image.open(tmp_path / "train" / "x" / name))
        assert raw.shape != expected[name].shape or not np.array_equal(raw, expected[name])


@pytest.mark.parametrize("mode", ["RGBA", "CMYK"])
def test_four_channel_modes_are_not_their_first_three_channels(tmp_path, mode):
    """RGBA drops alpha (no compositing) but CMYK is converted: slicing channels is right for one only."""
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(np.dstack([rgb, np.full((8, 8), 9, np.uint8)]), "RGBA") if mode == "RGBA" \
        else Image.fromarray(rgb).convert("CMYK")
    path = tmp_path / "im.tif"
    image.save(path)
    got = folder.load_rgb(str(path))
    np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(got, rgb if mode == "RGBA" else np.asarray(image.convert("RGB")))
    if mode == "CMYK":
        assert not np.array_equal(got, np.asarray(image)[:, :, :3])
