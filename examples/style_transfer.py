"""Style transfer as a functional experiment: optimise an image with optax under VGG losses.

Gatys et al. 2016: the image starts from the content image and follows jax.grad of
content_weight * feature_loss (relu4_2) + style_weight * style_loss (Gram matrices of relu1_1 ..
relu5_1) w.r.t. its pixels. Runs on CPU in about a minute at the defaults, with random VGG19
weights unless --weights gives a torchvision file (e.g. vgg19-dcbb9e9d.pth); without images
it makes a synthetic content (a disc) and style (stripes) image.

    python examples/style_transfer.py --out /tmp/styled.png
    python examples/style_transfer.py --weights vgg19-dcbb9e9d.pth --content a.png --style b.png
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

import vgg_flax
from vgg_flax import perceptual

CONTENT_TAPS = ("relu4_2",)
STYLE_TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
MEAN, STD = np.float32((0.485, 0.456, 0.406)), np.float32((0.229, 0.224, 0.225))


def synthetic(size: int, kind: str) -> np.ndarray:
    """float32[size, size, 3] in [0, 1]: a disc ("content") or diagonal colour stripes ("style")."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "content":
        disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).astype(np.float32)
        return np.stack([disc, 0.3 + 0.4 * yy, 1 - disc], -1).astype(np.float32)
    phase = 2 * np.pi * 6 * (xx + yy)
    return np.stack([0.5 + 0.5 * np.sin(phase + k) for k in (0, 2, 4)], -1).astype(np.float32)


def load_image(path: str, size: int) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def backbone(weights: str | None):
    """(linen VGG19 features, variables): converted from --weights, or random."""
    if weights:
        return vgg_flax.load_torchvision(weights, head="none")
    model = vgg_flax.vgg19(head="none")
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def make_loss(model, variables, content, style, content_weight, style_weight):
    """loss(image float32[1, H, W, 3] in [0, 1]) -> float32 scalar, and its parts."""
    def feats(img, taps):
        return perceptual.extract(model, variables, (img - MEAN) / STD, taps)

    content_feats = feats(content, CONTENT_TAPS)
    style_grams = {t: perceptual.gram_matrix(f) for t, f in feats(style, STYLE_TAPS).items()}

    def loss(img):
        f = feats(img, CONTENT_TAPS + STYLE_TAPS)
        c = perceptual.feature_loss({t: f[t] for t in CONTENT_TAPS}, content_feats)[0]
        s = perceptual.style_loss({t: f[t] for t in STYLE_TAPS}, style_grams)[0]
        return content_weight * c + style_weight * s, (c, s)

    return loss


def run(args) -> np.ndarray:
    model, variables = backbone(args.weights)
    content = load_image(args.content, args.size) if args.content else synthetic(args.size, "content")
    style = load_image(args.style, args.size) if args.style else synthetic(args.size, "style")
    loss = make_loss(model, variables, content[None], style[None], args.content_weight,
                     args.style_weight)
    tx = optax.adam(args.lr)

    @jax.jit
    def step(img, opt_state):
        (value, parts), grad = jax.value_and_grad(loss, has_aux=True)(img)
        updates, opt_state = tx.update(grad, opt_state, img)
        return jnp.clip(optax.apply_updates(img, updates), 0.0, 1.0), opt_state, value, parts

    img = jnp.asarray(content[None])
    opt_state = tx.init(img)
    start = time.perf_counter()
    for i in range(args.steps):
        img, opt_state, value, (c, s) = step(img, opt_state)
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {float(value):.4g}  content {float(c):.4g}  style {float(s):.4g}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    out = np.asarray(img[0])
    Image.fromarray((out * 255).round().astype(np.uint8)).save(args.out)
    print(f"saved {args.out}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", help="torchvision VGG19 (or any VGG with relu1_1..relu5_1) weights")
    p.add_argument("--content", help="content image (default: a synthetic disc)")
    p.add_argument("--style", help="style image (default: synthetic stripes)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--content-weight", type=float, default=1.0)
    p.add_argument("--style-weight", type=float, default=1e3)
    p.add_argument("--out", default="styled.png")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
