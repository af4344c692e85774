"""Attribution pictures of image files (`vgg-flax explain`): one PNG per image, or a class model.

Each PNG shows the image, each method's map as a heatmap over it and the top-5 classes with their
softmax probabilities. Images are read as `vgg_flax.evaluation.predict` reads them (torchvision's evaluation
transform, PIL only). matplotlib (the `train` extra) draws; it is imported when a picture is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vgg_flax import preprocessing
from vgg_flax.evaluation import predict
from vgg_flax.explain import gradients as G
from vgg_flax.explain import maps, visualisation

# CLI method name -> (title, map function(model, variables, images, targets, **options)).
METHODS: dict[str, tuple[str, Callable[..., Any]]] = {
    "saliency": ("saliency", maps.saliency),
    "grad-cam": ("Grad-CAM", maps.grad_cam),
    "grad-cam++": ("Grad-CAM++", maps.grad_cam_plus_plus),
    "integrated-gradients": ("Integrated Gradients", maps.integrated_gradients),
    "smooth-grad": ("SmoothGrad (saliency)", maps.smooth_grad),
}
CLASS_MODEL = "class-model"
# The options each method takes from the command line.
_OPTIONS = {"grad-cam": ("tap",), "grad-cam++": ("tap",), "integrated-gradients": ("steps",),
            "smooth-grad": ("samples",)}


def check_methods(names: Sequence[str]) -> list[str]:
    """The method names, or a KeyError listing the valid ones; class-model stands alone."""
    unknown = [n for n in names if n not in METHODS and n != CLASS_MODEL]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; valid methods: {[*METHODS, CLASS_MODEL]}")
    if CLASS_MODEL in names and len(names) > 1:
        raise ValueError(f"{CLASS_MODEL} makes its own image: give it alone, with --target N")
    return list(dict.fromkeys(names))


def check_images(paths: Sequence[str]) -> None:
    """Every path an image file PIL can read (a missing or non-image file is one error)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except UnidentifiedImageError:
            raise ValueError(f"{path}: not an image file PIL can read") from None


def _display(values: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] for display: |values| over their 99th percentile, clipped."""
    a = np.abs(values)
    top = np.percentile(a, 99) or a.max() or 1.0
    return np.clip(a / top, 0, 1)


def _draw(path: str, pixels: np.ndarray, panels: list[tuple[str, np.ndarray]],
          top5: list[tuple[str, float]], title: str) -> None:
    """One row: the image, a heatmap overlay per panel, the top-5 bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n + 0.6, 2.6), dpi=80,
                             gridspec_kw={"width_ratios": [1] * (n - 1) + [1.3]})
    image = np.clip(pixels / 255.0, 0, 1)
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=9)
    for ax, (name, heat) in zip(axes[1:-1], panels, strict=True):
        ax.imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1)
        ax.imshow(_display(heat), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    for ax in axes[:-1]:
        ax.set_xticks([])
        ax.set_yticks([])
    names, probs = zip(*top5, strict=True)
    bars = axes[-1]
    bars.barh(range(len(probs))[::-1], probs, color="tab:blue")
    bars.set_yticks(range(len(probs))[::-1], [n[:18] for n in names], fontsize=8)
    for y, p in zip(range(len(probs))[::-1], probs, strict=True):
        bars.text(min(p, 0.62) + 0.02, y, f"{p:.1%}", va="center", fontsize=7)
    bars.set_xlim(0, 1)
    bars.set_title("top-5", fontsize=9)
    bars.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in _OPTIONS.get(method, ()) if options.get(k) is not None}


def explain_files(model, variables, norm: preprocessing.Normalization, paths: Sequence[str],
                  methods: Sequence[str], out_dir: str, *, target: int | None = None,
                  classes: Sequence[str] | None = None, batch_size: int = 8, progress: bool = True,
                  **options) -> list[str]:
    """One PNG per image in `out_dir` (`<stem>_explain.png`); returns their paths.

    Args:
      model, variables: a linen VGG and its variables. norm: how the weights expect pixels (its
        resize/crop give the input size). methods: names from `METHODS`.
      target: the class to explain in every image, or None for each image's top-1.
      options: tap (Grad-CAM/++), steps (Integrated Gradients), samples (SmoothGrad).
    """
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    written = []
    bar = tqdm(total=len(paths) * len(methods), unit="map", disable=not progress or len(paths) <= 3)
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        x = np.stack([predict.load_image(p, norm) for p in chunk])
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(chunk), 0)])  # one shape: one compile
        logits = np.asarray(G.forward(model, variables, jnp.asarray(x)))[:len(chunk)]
        targets = None if target is None else np.full((batch_size,), target)
        heat = {}
        for m in methods:
            heat[m] = np.asarray(METHODS[m][1](model, variables, x, targets, **_options(m, options)))
            bar.update(len(chunk))
        for i, path in enumerate(chunk):
            stem = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(out_dir, f"{stem}_explain.png")
            shown = int(np.argmax(logits[i])) if target is None else target
            name = classes[shown] if classes else str(shown)
            _draw(out, norm.invert(x[i]), [(METHODS[m][0], heat[m][i]) for m in methods],
                  predict.top_k(logits[i:i + 1], classes)[0], f"explained: {name[:16]}")
            written.append(out)
    bar.close()
    return written


def class_model_file(model, variables, norm: preprocessing.Normalization, target: int, out_dir: str,
                     *, classes: Sequence[str] | None = None, steps: int | None = None) -> str:
    """The class model visualisation of `target` (Simonyan et al. 2013, Sec. 2) as a PNG."""
    os.makedirs(out_dir, exist_ok=True)
    start = jnp.zeros((1, norm.crop, norm.crop, 3))
    kwargs = {} if steps is None else {"steps": steps}
    image = visualisation.class_model(model, variables, start, [target], **kwargs)
    logits = np.asarray(G.forward(model, variables, image))
    pixels = np.asarray(image[0])
    pixels = 255.0 * (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-12)
    name = classes[target] if classes else str(target)
    out = os.path.join(out_dir, f"class_model_{target}.png")
    _draw(out, pixels, [], predict.top_k(logits, classes)[0], f"class model: {name[:16]}")
    return out
