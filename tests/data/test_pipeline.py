"""Input pipeline: the embedded digits, augmentations, exact resume, exact eval counts, the folder reader,
and eval preprocessing against torchvision's Resize + CenterCrop + Normalize."""

import collections
import io
import os

import numpy as np
import pytest
from PIL import Image

from vgg_flax import preprocessing
from vgg_flax.data import folder
from vgg_flax.data import pipeline as ip

try:  # torch must be imported before TensorFlow initialises, or importing it later segfaults.
    import torchvision
except ImportError:
    torchvision = None

from vgg_flax.data import transforms  # noqa: E402  (imports TensorFlow, after torch)

DIGITS = "sklearn_digits"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ip.dataset_info(DIGITS, data_dir=data_dir)  # Builds it locally (no download).
    return data_dir


def _digits(digits_dir, split, **kw):
    kw = {"batch_size": 64, "train": True, "image_size": 32, "augment": "none", **kw}
    return ip.create_dataset(DIGITS, split, data_dir=digits_dir, **kw)


def test_digits_builder_is_the_sklearn_data_split_exactly(digits_dir):
    from sklearn.datasets import load_digits

    from vgg_flax.data.sklearn_digits import split_indices, upsample

    info = ip.dataset_info(DIGITS, data_dir=digits_dir)
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    digits = load_digits()
    parts = split_indices(digits.target)
    assert len(np.intersect1d(parts["train"], parts["test"])) == 0
    assert len(parts["train"]) + len(parts["test"]) == 1797
    for split, idx in parts.items():
        assert info.num_examples(split) == len(idx)
        expected = collections.Counter((upsample(digits.images[i]).tobytes(), int(digits.target[i]))
                                       for i in idx)
        got = collections.Counter()
        for batch in _digits(digits_dir, split, train=False, batch_size=128, normalization="symmetric"):
            pixels = np.round(preprocessing.get_preset("symmetric").invert(batch["image"])).astype(np.uint8)
            for image, label, keep in zip(pixels, batch["label"], batch["mask"], strict=True):
                if keep:
                    got[(image.tobytes(), int(label))] += 1
        assert got == expected


@pytest.mark.parametrize("augment", transforms.AUGMENTATIONS)
@pytest.mark.parametrize("normalization", ["torchvision", "caffe"])
def test_augmentations_keep_shape_dtype_and_range(digits_dir, augment, normalization):
    batch = next(_digits(digits_dir, "train", augment=augment, normalization=normalization,
                         batch_size=16, image_size=24, scale_range=(24, 40)))
    assert batch["image"].shape == (16, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool and batch["mask"].all()
    pixels = preprocessing.get_preset(normalization).invert(batch["image"])
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert pixels.std() > 10  # Not blank.


@pytest.mark.parametrize("shape,short", [((375, 500), 256), ((500, 333), 512), ((64, 48), 40),
                                         ((40, 40), 97)])
def test_resized_window_equals_resizing_everything_then_slicing(shape, short):
    from vgg_flax.data import transforms

    image = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    full = transforms.resize_short_side(image, short).numpy()
    size = min(full.shape[:2]) * 2 // 3
    for top, left in [(0, 0), (full.shape[0] - size, full.shape[1] - size), (3, 7)]:
        window = transforms.resized_window(image, short, top, left, size).numpy()
        np.testing.assert_allclose(window, full[top:top + size, left:left + size], atol=0.02)


# Decoded in memory (the default here), re-read with one shuffle buffer, or re-read in shuffled blocks
# of 128 records (the path of splits larger than the buffer, such as ImageNet's).
@pytest.mark.parametrize("cache,buffer", [(None, None), (False, None), (False, 128)])
def test_training_order_is_a_function_of_seed_and_step(digits_dir, cache, buffer):
    n, batch = 1438, 100  # 14.38 batches per epoch: batches straddle epoch boundaries.
    run = _digits(digits_dir, "train", batch_size=batch, seed=7, augment="paper", scale_range=(32, 40),
                  cache=cache, shuffle_buffer=buffer)
    batches = [next(run) for _ in range(20)]
    labels = np.concatenate([b["label"] for b in batches])
    all_labels = np.sort(_labels(digits_dir, "train"))
    assert np.array_equal(np.sort(labels[:n]), all_labels)  # Each epoch is a permutation.
    assert not np.array_equal(labels[:200], labels[n:n + 200])  # Reshuffled every epoch.
    for step in (0, 5, 14, 17):
        resumed = next(_digits(digits_dir, "train", batch_size=batch, seed=7, augment="paper",
                               scale_range=(32, 40), start_step=step, cache=cache, shuffle_buffer=buffer))
        np.testing.assert_array_equal(resumed["label"], batches[step]["label"])
        np.testing.assert_array_equal(resumed["image"], batches[step]["image"])
    other = next(_digits(digits_dir, "train", batch_size=batch, seed=8))
    assert not np.array_equal(other["label"], batches[0]["label"])


def test_training_shards_are_disjoint_per_process(digits_dir):
    """Two processes each stream their own half; one epoch of both covers the split once."""
    pixels = []
    for index in range(2):
        run = _digits(digits_dir, "train", batch_size=719, process_index=index, process_count=2,
                      normalization="symmetric")
        batch = next(run)  # 719 = 1438 / 2: exactly one epoch of this process's share.
        pixels += [image.tobytes() for image in batch["image"]]
    assert len(set(pixels)) > 1400  # A few digits are pixel-identical; shares do not repeat.
    whole = next(_digits(digits_dir, "train", batch_size=1438, normalization="symmetric"))
    assert sorted(pixels) == sorted(image.tobytes() for image in whole["image"])


def test_cut_blocks_keeps_every_record_once_in_order():
    from vgg_flax.data import blocks

    b = blocks.cut_blocks([("a", 0, 5), ("b", 2, 7)], 4)
    pieces = list(zip(b.files.tolist(), b.skips.tolist(), b.takes.tolist(), strict=True))
    assert pieces == [("a", 0, 4), ("a", 4, 1), ("b", 2, 3), ("b", 5, 4)]
    assert b.sizes.tolist() == [4, 4, 4] and b.first_piece.tolist() == [0, 1, 3]
    assert b.num_pieces.tolist() == [1, 2, 1]


def test_block_stream_visits_whole_blocks_and_resumes_anywhere(digits_dir):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from vgg_flax.data import blocks

    info = tfds.builder(DIGITS, data_dir=digits_dir).info
    fi = info.splits["train"].file_instructions
    cut = blocks.cut_blocks([(f.filename, f.skip, f.take) for f in fi], 128)
    records = [r.numpy() for r in tf.data.TFRecordDataset([f.filename for f in fi])]
    index = {r: i for i, r in enumerate(records)}
    stream = [index[r.numpy()] for r in blocks.record_stream(cut, key=3, block=128, first=0).take(2 * 1438)]
    epochs = [stream[:1438], stream[1438:]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(1438)) and epochs[0] != epochs[1]
    block_ids = [i // 128 for i in epochs[0]]  # Blocks are read whole (shuffled within): 12 runs.
    changes = sum(a != b for a, b in zip(block_ids[:-1], block_ids[1:], strict=True))
    assert changes == len(cut.sizes) - 1 == 11 and epochs[0][:128] != sorted(epochs[0][:128])
    for first in (1, 127, 128, 700, 1437, 1438, 2000):
        resumed = blocks.record_stream(cut, key=3, block=128, first=first).take(50)
        assert [index[r.numpy()] for r in resumed] == stream[first:first + 50], first


def _labels(digits_dir, split):
    batches = list(_digits(digits_dir, split, train=False, batch_size=500))
    return np.concatenate([b["label"][b["mask"]] for b in batches])


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_counts_every_example_exactly_once(digits_dir, process_count):
    n, batch = 359, 50  # 50 does not divide 359 (nor its thirds 120, 120, 119).
    expected = collections.Counter(_labels(digits_dir, "test").tolist())
    got, num_batches = collections.Counter(), set()
    for index in range(process_count):
        batches = list(_digits(digits_dir, "test", train=False, batch_size=batch, process_index=index,
                               process_count=process_count))
        num_batches.add(len(batches))
        for b in batches:
            assert b["image"].shape == (batch, 32, 32, 3)
            got.update(b["label"][b["mask"]].tolist())
    assert len(num_batches) == 1  # Every process runs the same number of steps.
    assert sum(got.values()) == n and got == expected


def test_tfds_slices_are_exact(digits_dir):
    info = ip.dataset_info(DIGITS, data_dir=digits_dir)
    assert info.num_examples("train[:10%]") == 144 and info.num_examples("test[:50]") == 50
    batches = list(_digits(digits_dir, "test[:50]", train=False, batch_size=16, process_index=1,
                           process_count=2))
    assert len(batches) == 2 and sum(b["mask"].sum() for b in batches) == 25


def test_multicrop_and_full_views(digits_dir):
    b = next(_digits(digits_dir, "test", train=False, batch_size=4, eval_views="multicrop",
                     eval_resize=40, multicrop_grid=3, normalization="symmetric"))
    assert b["image"].shape == (4, 18, 32, 32, 3)
    np.testing.assert_array_equal(b["image"][:, 9:], b["image"][:, :9, :, ::-1])  # Flips follow.
    full = next(_digits(digits_dir, "test", train=False, batch_size=4, eval_views="full", eval_resize=40,
                        normalization="symmetric"))
    assert full["image"].shape == (4, 40, 40, 3)
    np.testing.assert_array_equal(b["image"][:, 0], full["image"][:, :32, :32])  # Top-left crop.
    np.testing.assert_array_equal(b["image"][:, 8], full["image"][:, 8:, 8:])  # Bottom-right crop.


def test_bad_arguments_raise_clear_errors(digits_dir):
    with pytest.raises(TypeError, match="unknown create_dataset options"):
        _digits(digits_dir, "train", shuffle_bufer=10)
    with pytest.raises(KeyError, match="valid"):
        _digits(digits_dir, "train", augment="mixup")
    with pytest.raises(ValueError, match="batch_size must be 1"):
        _digits(digits_dir, "test", train=False, batch_size=2, eval_views="whole")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        ip.create_dataset("mnist", "train", batch_size=2, train=False, image_size=32,
                          data_dir=digits_dir)


def _odd_images(root):
    """A folder with every odd mode, a corrupt and a truncated JPEG, and a non-image file."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    os.makedirs(root / "a")
    os.makedirs(root / "b")
    Image.fromarray(rgb).save(root / "a" / "rgb.jpg", quality=95)
    Image.fromarray(rgb[:, :, 0]).save(root / "a" / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(root / "a" / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "b" / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(root / "b" / "palette.gif", transparency=0)
    Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257).save(root / "b" / "deep16.png")
    (root / "b" / "corrupt.jpg").write_bytes(rng.bytes(500))
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    (root / "b" / "truncated.JPEG").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 5])
    (root / "b" / "notes.txt").write_text("not an image")
    return rgb


def test_folder_reader_survives_corrupt_and_odd_mode_images(tmp_path):
    rgb = _odd_images(tmp_path / "train")
    name = f"folder:{tmp_path}"
    with pytest.warns(UserWarning, match="2 unreadable image"):
        info = ip.dataset_info(name)
    assert info.class_names == ("a", "b") and info.num_examples("train") == 6
    assert sorted(os.path.basename(p) for p, _ in info.skipped("train")) == ["corrupt.jpg", "truncated.JPEG"]
    batches = list(ip.create_dataset(name, "train", batch_size=4, train=False, image_size=32,
                                     eval_resize=40, normalization="symmetric"))
    masks = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[masks]
    assert masks.sum() == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    gray = folder.load_rgb(str(tmp_path / "train" / "a" / "gray.png"))
    assert gray.shape == (40, 50, 3) and np.array_equal(gray[:, :, 0], rgb[:, :, 0])
    deep = folder.load_rgb(str(tmp_path / "train" / "b" / "deep16.png"))
    assert np.array_equal(deep[:, :, 2], rgb[:, :, 1])
    train = next(ip.create_dataset(name, "train[:50%]", batch_size=3, train=True, image_size=32,
                                   augment="paper", scale_range=(32, 48)))
    assert train["image"].shape == (3, 32, 32, 3) and sorted(train["label"].tolist()) == [0, 0, 0]


def test_a_file_that_breaks_after_the_scan_is_dropped_in_training_and_masked_in_eval(tmp_path):
    _odd_images(tmp_path / "train")
    name = f"folder:{tmp_path}"
    with pytest.warns(UserWarning):
        assert ip.dataset_info(name).num_examples("train") == 6  # Scanned (and cached) now.
    (tmp_path / "train" / "a" / "rgb.jpg").write_bytes(b"overwritten")
    batches = list(ip.create_dataset(name, "train", batch_size=4, train=False, image_size=32,
                                     eval_resize=40))
    assert np.concatenate([b["mask"] for b in batches]).sum() == 5
    train = ip.create_dataset(name, "train", batch_size=5, train=True, image_size=32, augment="none")
    first = next(train)  # The broken file (class a) is dropped: one epoch is the 5 good images.
    assert first["mask"].all() and sorted(first["label"].tolist()) == [0, 0, 1, 1, 1]


def _photo(height, width):
    """A smooth, photo-like test image (sharp edges would exaggerate resampling differences)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(x / 23.0) * np.cos(y / 31.0)
    g = 128 + 90 * np.cos((x + y) / 41.0)
    b = 255 * (x / width) * (1 - y / height)
    return Image.fromarray(np.clip(np.dstack([r, g, b]), 0, 255).astype(np.uint8))


# Center-crop offsets after Resize(256): 58.5 (round and floor agree: 58), 80, 59, and 59.5 for
# (402, 300) -> (343, 256), where torchvision's round (half to even, 60) and floor (59) differ.
@pytest.mark.parametrize("size", [(375, 500), (500, 333), (224, 300), (402, 300)])
def test_eval_preprocessing_equals_torchvision(tmp_path, size):
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    from torchvision import transforms as T

    image = _photo(*size)
    os.makedirs(tmp_path / "val" / "x")
    image.save(tmp_path / "val" / "x" / "im.png")
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    reference = reference.numpy().transpose(1, 2, 0)
    batch = next(ip.create_dataset(f"folder:{tmp_path}", "val", batch_size=1, train=False,
                                   image_size=224, normalization="torchvision"))
    ours = batch["image"][0]
    assert ours.shape == reference.shape == (224, 224, 3)
    info = ip.dataset_info(f"folder:{tmp_path}")  # Only a "val" split folder: its classes, not "val".
    assert info.class_names == ("x",) and info.num_examples("val") == 1
    diff = np.abs(ours - reference)
    one_level = 1 / 255 / 0.225  # One uint8 step after Normalize.
    # PIL resamples in fixed point: some pixels land one uint8 level away, none further.
    assert diff.mean() < 0.25 * one_level and diff.max() <= 1.01 * one_level, (diff.mean(), diff.max())
