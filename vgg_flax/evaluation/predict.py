"""Top-k classification of image files with converted weights (`vgg-flax predict`).

Decoding and resizing use PIL, exactly as torchvision's evaluation transform does on PIL images
(`Resize(256)` bilinear with PIL's antialiasing, `CenterCrop(224)`, `ToTensor`, `Normalize`), so
predictions need neither TensorFlow nor torch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vgg_flax import preprocessing
from vgg_flax.convert import format as wformat


def check_images(paths: list[str | os.PathLike]) -> None:
    """Raises for the first path that is missing or not an image PIL decodes, naming it.

    Cheap (PIL reads the header and verifies the file), so callers run it before fetching weights:
    a typo costs no download.
    """
    from PIL import Image

    for path in paths:
        with Image.open(path) as img:  # FileNotFoundError / UnidentifiedImageError name the file
            img.verify()


def load_image(path: str | os.PathLike, norm: preprocessing.Normalization) -> np.ndarray:
    """One image file as the network input float32[crop, crop, 3], torchvision's eval transform.

    Resize the short side to `norm.resize` (long side int(resize * long / short), PIL bilinear,
    which antialiases when shrinking), center-crop `norm.crop`, then normalise.
    """
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        new_h, new_w = preprocessing.resized_short_side(img.height, img.width, norm.resize)
        img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = preprocessing.center_crop_box(new_h, new_w, norm.crop)
    if top < 0 or left < 0:
        raise ValueError(f"{path}: resized to {new_h}x{new_w}, smaller than the {norm.crop} crop")
    pixels = np.asarray(img, np.float32)[top:top + norm.crop, left:left + norm.crop]
    return np.asarray(norm(pixels), np.float32)


def top_k(logits: np.ndarray, classes: list[str] | None, k: int = 5) -> list[list[tuple[str, float]]]:
    """Per row of float[N, C] logits, the k most probable (class name, softmax probability)."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    name = (lambda i: classes[i]) if classes else str
    return [[(name(int(i)), float(p[i])) for i in row] for p, row in zip(probs, order, strict=True)]


def predict_files(weights_path: str | os.PathLike, paths: list[str], k: int = 5,
                  batch_size: int = 8) -> list[list[tuple[str, float]]]:
    """Top-k predictions for image files, with a `save_pretrained` file's model, preset and classes."""
    meta = wformat.pretrained_metadata(weights_path)
    model, variables = wformat.load_pretrained(weights_path)
    return predict_with(model, variables, meta, paths, k=k, batch_size=batch_size,
                        where=os.fspath(weights_path))


def predict_with(model, variables, meta: dict[str, Any], paths: list[str], k: int = 5,
                 batch_size: int = 8, where: str = "the weights") -> list[list[tuple[str, float]]]:
    """Top-k predictions with loaded weights; `meta` gives "preprocessing" and "classes"."""
    import jax

    if model.head == "none":
        raise ValueError(f"{where} holds features only (no classifier): nothing to predict")
    norm = preprocessing.get_preset(meta["preprocessing"])
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    results: list[Any] = []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([load_image(p, norm) for p in paths[start:start + batch_size]])
        results += top_k(np.asarray(apply(variables, batch)), meta["classes"], k)
    return results
