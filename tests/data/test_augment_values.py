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
