"""Augmentations and evaluation views checked on values: identity, exact mirrors, translations up to
S/8 with zero padding, the paper's scale jitter and crop window, inception crops' area and aspect,
AlexNet's PCA lighting, eval masks and each process's contiguous share, the normalisation presets.

Images are read back in [0, 255] through the "symmetric" preset's `invert`; crop geometry is measured on
a coordinate image (R = x, G = y), whose bilinear resize stays linear away from the borders.
"""

import collections

import numpy as np
import pytest
from PIL import Image

from vgg_flax import preprocessing
from vgg_flax.data import pipeline as ip

SYM = preprocessing.get_preset("symmetric")
RAMP_HW = (160, 200)


def _write(root, images, classes=("a",)):
    """PNGs root/train/<class>/<i>.png, images dealt round-robin over the classes; returns the
    (path, label) list in the reader's order (sorted by class, then name)."""
    out = []
    for i, image in enumerate(images):
        label = i % len(classes)
        folder_path = root / "train" / classes[label]
        folder_path.mkdir(parents=True, exist_ok=True)
        path = folder_path / f"{i:03d}.png"
        Image.fromarray(image).save(path)
        out.append((str(path), label))
    return sorted(out, key=lambda pl: (pl[1], pl[0]))


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """25 noise images 32x32, no zero pixel (so zero padding shows), in classes a (13) and b (12)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    files = _write(root, [rng.integers(1, 256, (32, 32, 3), dtype=np.uint8) for _ in range(25)], ("a", "b"))
    return f"folder:{root}", [(np.asarray(Image.open(p)), label) for p, label in files]


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ramp")
    y, x = np.mgrid[0:RAMP_HW[0], 0:RAMP_HW[1]]
    image = np.dstack([x, y, np.full_like(x, 128)]).astype(np.uint8)
    _write(root, [image] * 8)
    return f"folder:{root}"


def _train_pixels(name, batches, **kw):
    kw = {"batch_size": 8, "train": True, "image_size": 32, "normalization": "symmetric", **kw}
    stream = ip.create_dataset(name, "train", **kw)
    out = [next(stream) for _ in range(batches)]
    return SYM.invert(np.concatenate([b["image"] for b in out])), np.concatenate([b["label"] for b in out])


def test_none_is_the_identity_and_flip_an_exact_mirror(noise):
    name, sources = noise
    pixels, labels = _train_pixels(name, 1, batch_size=25, augment="none")  # one epoch
    np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)  # no resampling happened
    got = collections.Counter((np.round(p).astype(np.uint8).tobytes(), int(lb))
                              for p, lb in zip(pixels, labels, strict=True))
    assert got == collections.Counter((s.tobytes(), lb) for s, lb in sources)
    flipped, labels = _train_pixels(name, 1, batch_size=25, augment="flip")
    by_bytes = {s.tobytes(): lb for s, lb in sources}
    mirrors = 0
    for p, lb in zip(np.round(flipped).astype(np.uint8), labels, strict=True):
        plain, mirror = by_bytes.get(p.tobytes()), by_bytes.get(p[:, ::-1].tobytes())
        assert lb in (plain, mirror)  # the source itself or its exact left-right mirror
        mirrors += plain is None
    assert 0 < mirrors < 25


def _find_translation(pixels, sources, reach=8):
    """(source index, dy, dx) with pixels[i, j] = source[i + dy, j + dx] (zero outside), or None."""
    size = pixels.shape[0]
    for k, (source, _) in enumerate(sources):
        padded = np.pad(source.astype(np.float32), ((reach, reach), (reach, reach), (0, 0)))
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                window = padded[reach + dy:reach + dy + size, reach + dx:reach + dx + size]
                if np.abs(window - pixels).max() < 2e-3:
                    return k, dy, dx
    return None


@pytest.mark.parametrize("shift,bound", [(None, 4), (2, 2)])  # default S // 8 = 4 at S = 32
def test_shift_translates_by_at_most_its_bound_with_zero_padding(noise, shift, bound):
    name, sources = noise
    pixels, labels = _train_pixels(name, 1, batch_size=25, augment="shift", shift=shift)
    moves = []
    for p, lb in zip(pixels, labels, strict=True):
        found = _find_translation(p, sources)
        assert found is not None  # a pure translation of a source, the uncovered border exactly 0
        k, dy, dx = found
        assert sources[k][1] == lb
        moves.append((dy, dx))
    reach = np.abs(np.asarray(moves))
    assert reach.max() == bound and len(set(moves)) > 5  # random, and the full range is reached


def _ramp_fit(channel, margin=3):
    """(slope, intercept) of a least-squares line through the mean interior profile of one channel."""
    profile = channel[margin:-margin, margin:-margin]
    j = np.arange(margin, channel.shape[1] - margin)
    return np.polyfit(j, profile.mean(axis=0), 1)


def _geometry(pixels):
    """(flipped, slope_x, x0, slope_y, y0): output pixel (i, j) samples the source at
    (y0 + i * slope_y, x0 + j * slope_x) (pixel centres), read off the coordinate image."""
    flipped = _ramp_fit(pixels[..., 0])[0] < 0
    if flipped:
        pixels = pixels[:, ::-1]
    sx, x0 = _ramp_fit(pixels[..., 0])
    sy, y0 = _ramp_fit(np.swapaxes(pixels[..., 1], 0, 1))
    return flipped, sx, x0, sy, y0


@pytest.mark.parametrize("scale_range,expected", [((40, 80), None), (None, (37, 37))])
def test_paper_crop_scale_jitter_and_window(ramp, scale_range, expected):
    """Short side S ~ U{S_min..S_max} (default round(32 * 256 / 224) = 37 for both), a 32x32 window
    inside the resized image, flipped half of the time."""
    s_min, s_max = expected or scale_range
    pixels, _ = _train_pixels(ramp, 4, augment="paper", scale_range=scale_range, color_pca=0.0)
    shorts, flips, offsets = [], 0, set()
    for p in pixels:
        flipped, sx, x0, sy, y0 = _geometry(p)
        short = RAMP_HW[0] / sy  # the short side is the height: resized pixel k sits at (k + .5) sy - .5
        assert abs(short - round(short)) < 0.05, short
        short = round(short)
        new_w = int(short * RAMP_HW[1] / RAMP_HW[0])
        assert abs(sx - RAMP_HW[1] / new_w) < 1e-3  # torchvision's long side: int(S * long / short)
        top, left = (y0 + 0.5) / sy - 0.5, (x0 + 0.5) / sx - 0.5
        assert abs(top - round(top)) < 0.05 and abs(left - round(left)) < 0.05, (top, left)
        assert 0 <= round(top) <= short - 32 and 0 <= round(left) <= new_w - 32
        shorts.append(short)
        flips += flipped
        offsets.add((round(top), round(left)))
    assert s_min <= min(shorts) and max(shorts) <= s_max
    if s_max > s_min:
        assert len(set(shorts)) >= 5 and min(shorts) < s_min + 10 and max(shorts) > s_max - 10
    assert 0 < flips < len(pixels) and len(offsets) > len(pixels) // 2


def test_inception_crop_area_and_aspect_within_their_ranges(ramp):
    area_range, aspect_range = (0.25, 0.5), (3 / 4, 4 / 3)
    pixels, _ = _train_pixels(ramp, 4, augment="inception", area_range=area_range,
                              aspect_range=aspect_range)
    areas, aspects = [], []
    for p in pixels:
        _, sx, x0, sy, y0 = _geometry(p)
        width, height = 32 * sx, 32 * sy  # the box, resized to 32x32, in source pixels
        left, top = x0 + 0.5 - 0.5 * sx, y0 + 0.5 - 0.5 * sy
        assert -0.1 < left and left + width < RAMP_HW[1] + 0.1, (left, width)
        assert -0.1 < top and top + height < RAMP_HW[0] + 0.1, (top, height)
        areas.append(width * height / (RAMP_HW[0] * RAMP_HW[1]))
        aspects.append(width / height)
    assert area_range[0] * 0.99 < min(areas) and max(areas) < area_range[1] * 1.01, (areas,)
    assert aspect_range[0] * 0.97 < min(aspects) and max(aspects) < aspect_range[1] * 1.03, (aspects,)
    assert np.std(areas) > 0.03 and np.std(aspects) > 0.05  # drawn, not fixed


# AlexNet's PCA of ImageNet's RGB pixels in [0, 1] (Krizhevsky et al. 2012, as fb.resnet.torch
# publishes it): eigenvalues and the eigenvectors as columns, written out here by hand.
_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                    [-0.5808, -0.0045, -0.8140],
                    [-0.5836, -0.6948, 0.4203]])


def test_pca_lighting_is_one_shift_per_image_with_alpha_std_0_1(tmp_path):
    """rgb += 255 * eigvec @ (alpha * eigval), alpha ~ N(0, 0.1) per image; solved back for alpha."""
    grid = np.array([(r, g, b) for r in (64, 128, 192) for g in (64, 128, 192) for b in (64, 128, 192)])
    name = f"folder:{tmp_path}"
    _write(tmp_path, [np.full((16, 16, 3), c, np.uint8) for c in grid])
    pixels, _ = _train_pixels(name, 3, batch_size=27, image_size=16, augment="paper")
    alphas = []
    for p in pixels:
        colour = p.reshape(-1, 3).mean(axis=0)
        assert np.abs(p - colour).max() < 1e-2  # the same shift for every pixel
        source = grid[np.argmin(np.abs(grid - colour).sum(axis=1))]
        alphas.append(np.linalg.solve(_EIGVEC, (colour - source) / 255.0) / _EIGVAL)
    alphas = np.asarray(alphas)  # [81, 3]
    assert np.all(np.abs(alphas.mean(axis=0)) < 0.04), alphas.mean(axis=0)
    assert np.all((0.07 < alphas.std(axis=0)) & (alphas.std(axis=0) < 0.13)), alphas.std(axis=0)
    none, _ = _train_pixels(name, 1, batch_size=27, image_size=16, augment="paper", color_pca=0.0)
    assert {tuple(np.round(p[0, 0]).astype(int)) for p in none} == set(map(tuple, grid))


# ---- evaluation: masks, contiguous shares, "whole" --------------------------------------------------

DIGITS = "sklearn_digits"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ip.dataset_info(DIGITS, data_dir=data_dir)  # built locally, no download
    return data_dir


def _eval_rows(name, split, *, batch_size, data_dir=None, **kw):
    """(images [N, ...], labels, mask) of one process's whole eval stream, batches concatenated."""
    batches = list(ip.create_dataset(name, split, batch_size=batch_size, train=False, image_size=32,
                                     data_dir=data_dir, normalization="symmetric", **kw))
    cat = lambda key: np.concatenate([b[key] for b in batches])
    return cat("image"), cat("label"), cat("mask"), len(batches)


def _check_contiguous_shares(name, split, n, count, batch_size, data_dir=None):
    """Process i's real rows are rows [start_i, start_i + share_i) of the one-process order, first in
    its stream, then only padding; the shares are disjoint and cover the split."""
    whole, whole_labels, whole_mask, _ = _eval_rows(name, split, batch_size=n, data_dir=data_dir)
    assert whole_mask.all() and len(whole) == n
    shares = [n // count + (i < n % count) for i in range(count)]  # TFDS's even split: first ones +1
    start, num_batches = 0, set()
    for index in range(count):
        images, labels, mask, batches = _eval_rows(name, split, batch_size=batch_size, data_dir=data_dir,
                                                   process_index=index, process_count=count)
        num_batches.add(batches)
        expected_mask = np.arange(len(mask)) < shares[index]
        np.testing.assert_array_equal(mask, expected_mask)  # real rows first, then padding only
        np.testing.assert_array_equal(images[mask], whole[start:start + shares[index]])
        np.testing.assert_array_equal(labels[mask], whole_labels[start:start + shares[index]])
        start += shares[index]
    assert start == n and len(num_batches) == 1  # covered once; every process runs the same steps


def test_eval_shares_are_contiguous_and_real_rows_come_first_tfds(digits_dir):
    # 359 = 120 + 120 + 119; batch 50 divides none of them.
    _check_contiguous_shares(DIGITS, "test", 359, 3, 50, data_dir=digits_dir)


def test_eval_shares_are_contiguous_and_real_rows_come_first_folder(noise):
    name, sources = noise
    _check_contiguous_shares(name, "train", 25, 2, 4)
    images, labels, _, _ = _eval_rows(name, "train", batch_size=25, eval_resize=32)
    # The one-process order is the reader's: classes sorted, then file names.
    np.testing.assert_array_equal(np.round(SYM.invert(images)).astype(np.uint8), [s for s, _ in sources])
    np.testing.assert_array_equal(labels, [lb for _, lb in sources])


def _smooth(height, width):
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 9.0)
    g = 128 + 90 * np.cos((x + y) / 11.0)
    b = 255 * (x / width) * (1 - y / height)
    return np.clip(np.dstack([r, g, b]), 0, 255).astype(np.uint8)


def test_eval_views_whole_is_the_resized_image_uncropped(tmp_path):
    """"whole": torchvision's Resize(Q) (PIL bilinear, antialiased) of the whole image, any shape."""
    sizes = [(40, 60), (50, 30), (33, 47)]
    files = _write(tmp_path, [_smooth(h, w) for h, w in sizes])
    name, q = f"folder:{tmp_path}", 24
    for index, count in [(0, 1), (0, 2), (1, 2)]:
        stream = ip.create_dataset(name, "train", batch_size=1, train=False, image_size=16, eval_resize=q,
                                   eval_views="whole", normalization="symmetric", process_index=index,
                                   process_count=count)
        batches = list(stream)
        assert len(batches) == (3 if count == 1 else 2)
        paths = [path for path, _ in files][index * 2:index * 2 + 2] if count == 2 else [p for p, _ in files]
        for batch, path in zip(batches, paths + [None] * (len(batches) - len(paths)), strict=True):
            if path is None:  # process 1 of 2 holds one image, then one padding row
                assert not batch["mask"][0]
                continue
            image = Image.open(path)
            w, h = image.size
            new = (q, int(q * w / h)) if h <= w else (int(q * h / w), q)
            reference = np.asarray(image.resize(new[::-1], Image.BILINEAR), np.float32)
            assert batch["mask"].tolist() == [True] and batch["image"].shape == (1, *new, 3)
            assert np.abs(SYM.invert(batch["image"][0]) - reference).max() <= 1.01


# ---- normalisation presets --------------------------------------------------------------------------

# Each preset's output for RGB pixels x in [0, 255], written out from its source (REFERENCE.md):
# caffe (the original VGG weights, Keras' "caffe" mode): BGR, minus the BGR means, no scaling;
# imagenet1k_features (torchvision VGG16_Weights.IMAGENET1K_FEATURES): 0-255 input minus 255 * mean,
# mean (0.48235, 0.45882, 0.40784) in RGB, std 1/255; torchvision: x / 255, mean/std of ImageNet;
# symmetric: [-1, 1].
_PRESETS = {
    "caffe": lambda x: x[..., ::-1] - np.array([103.939, 116.779, 123.68]),
    "imagenet1k_features": lambda x: x - 255.0 * np.array([0.48235, 0.45882, 0.40784]),
    "torchvision": lambda x: (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    "symmetric": lambda x: x / 127.5 - 1.0,
}


@pytest.mark.parametrize("preset", sorted(_PRESETS))
def test_presets_values_in_numpy_jax_and_the_pipeline(tmp_path, preset):
    import jax.numpy as jnp

    norm = preprocessing.get_preset(preset)
    pixels = np.array([[[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [200.0, 100.0, 10.0]]])
    expected = _PRESETS[preset](pixels)
    np.testing.assert_allclose(norm(pixels), expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(norm(pixels, xp=jnp), expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(norm.invert(expected), pixels, rtol=1e-6, atol=1e-3)
    colour = np.array([200, 100, 10], np.uint8)
    _write(tmp_path, [np.full((32, 32, 3), colour)])
    batch = next(ip.create_dataset(f"folder:{tmp_path}", "train", batch_size=1, train=False, image_size=32,
                                   eval_resize=32, normalization=preset))
    np.testing.assert_allclose(batch["image"][0], np.broadcast_to(_PRESETS[preset](colour * 1.0),
                                                                  (32, 32, 3)), rtol=1e-5, atol=1e-3)


# ---- the embedded digits -------------------------------------------------------------------------

# scikit-learn's digits per class (0-9), and the test split's round(20%) of each, by hand.
_DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
_TEST_COUNTS = [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def _pil_bilinear_4x(gray):
    """PIL's 8 -> 32 bilinear upsample written out: output pixel j samples the input at (j + .5) / 4 - .5
    (clamped at the edges), horizontal pass first, each pass rounded half up to uint8."""
    pos = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
    lo = np.floor(pos).astype(int)
    hi, frac = np.minimum(lo + 1, 7), pos - np.floor(pos)
    weights = np.zeros((32, 8))
    weights[np.arange(32), lo] += 1 - frac
    weights[np.arange(32), hi] += frac
    rows = np.floor(gray.astype(np.float64) @ weights.T + 0.5)
    return np.floor(weights @ rows + 0.5).astype(np.uint8)


def test_digits_split_sizes_per_class_counts_and_one_upsample_by_hand(digits_dir):
    from sklearn.datasets import load_digits

    info = ip.dataset_info(DIGITS, data_dir=digits_dir)
    assert (info.num_examples("train"), info.num_examples("test")) == (1438, 359)
    assert info.class_names == tuple("0123456789") and info.image_shape == (32, 32, 3)
    rows = {}
    for split in ("train", "test"):
        images, labels, mask, _ = _eval_rows(DIGITS, split, batch_size=500, data_dir=digits_dir)
        counts = np.bincount(labels[mask], minlength=10)
        want = np.asarray(_TEST_COUNTS) if split == "test" else np.subtract(_DIGIT_COUNTS, _TEST_COUNTS)
        np.testing.assert_array_equal(counts, want)
        rows[split] = {np.round(SYM.invert(im)).astype(np.uint8).tobytes() for im in images[mask]}
    digit = load_digits().images[0]  # a 0, values 0-16
    gray = np.round(digit * 255 / 16).astype(np.uint8)
    expected = np.repeat(_pil_bilinear_4x(gray)[:, :, None], 3, axis=2)
    assert expected[:2, :2].std() == 0 and expected.max() > 200  # edges clamp; ink is bright
    assert (expected.tobytes() in rows["train"]) != (expected.tobytes() in rows["test"])


# ---- eval preprocessing against torchvision on a textured image ----------------------------------

def test_eval_preprocessing_on_noise_equals_torchvision_and_catches_an_unantialiased_resize(tmp_path):
    """Noise is where resampling filters part: an unantialiased bilinear resize is tens of levels off."""
    pytest.importorskip("torchvision")
    import tensorflow as tf
    from torchvision import transforms as T

    image = np.random.default_rng(3).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    _write(tmp_path, [image])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])(
        Image.fromarray(image)).numpy().transpose(1, 2, 0)
    batch = next(ip.create_dataset(f"folder:{tmp_path}", "train", batch_size=1, train=False,
                                   image_size=224, normalization="torchvision"))
    one_level = 1 / 255 / 0.225  # one uint8 step after Normalize
    bound = 1.01 * one_level  # PIL resamples in fixed point: some pixels land one level away
    assert np.abs(batch["image"][0] - reference).max() <= bound
    # The same crop through an unantialiased bilinear resize: far outside the bound.
    aliased = tf.image.resize(image, (256, 341), method="bilinear", antialias=False).numpy()
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)
    aliased = preprocessing.get_preset("torchvision")(np.round(aliased[top:top + 224, left:left + 224]))
    assert np.abs(aliased - reference).max() > 30 * one_level
