"""scikit-learn's bundled handwritten digits as a TFDS image-classification dataset, built offline.

The data: 1,797 8x8 grayscale images of the digits 0-9 (pixel values 0-16), written by 43 people and
preprocessed by NIST's programs; it is the test part of the UCI "Optical Recognition of Handwritten
Digits" dataset (Alpaydin & Kaynak, 1998; UCI Machine Learning Repository, CC BY 4.0), shipped inside
scikit-learn (`sklearn.datasets.load_digits`). Nothing is downloaded: `download_and_prepare` reads the
copy inside the installed scikit-learn.

So that a VGG (five 2x2 pools) can run on it, every image is scaled to 0-255 and upsampled to 32x32 with
bilinear interpolation, then repeated to three RGB channels. The split is fixed: per class, a seeded
permutation (numpy's legacy `RandomState`, whose stream is frozen across numpy versions) puts 20% of the
examples in "test" (359 images) and the rest in "train" (1,438 images).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """{"train", "test"}: sorted example indices of the fixed, class-stratified split."""
    rng = np.random.RandomState(SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.extend(rng.permutation(members)[: int(round(TEST_FRACTION * len(members)))])
    test = np.sort(np.asarray(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


def upsample(image_8x8: np.ndarray) -> np.ndarray:
    """uint8[32, 32, 3] RGB from one float[8, 8] digit with values 0-16 (ink is bright)."""
    from PIL import Image

    gray = np.clip(np.round(image_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = Image.fromarray(gray, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """The UCI handwritten digits bundled with scikit-learn, 32x32 RGB, fixed train/test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32 RGB, 1438 train / 359 test, stratified with seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            license="CC BY 4.0 (UCI Machine Learning Repository), via scikit-learn (BSD-3-Clause)",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is inside scikit-learn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        parts = split_indices(digits.target)
        return {name: self._generate_examples(digits.images[idx], digits.target[idx], idx)
                for name, idx in parts.items()}

    def _generate_examples(self, images, labels, indices):
        for image, label, index in zip(images, labels, indices, strict=True):
            yield int(index), {"image": upsample(image), "label": int(label)}
