"""`vgg-flax explain`: PNGs of real runs on a tiny weights file, and one-line errors before any
download or compile."""

import numpy as np
import pytest
from PIL import Image

import vgg_flax
from vgg_flax import cli
from vgg_flax.convert import pretrained

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import jax
    import jax.numpy as jnp

    root = tmp_path_factory.mktemp("explain")
    model = vgg_flax.VGG(config=(8, "M", 16, "M"), batch_norm=True, head="small", num_classes=4,
                         small_head_width=0)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    weights = root / "tiny.safetensors"
    vgg_flax.save_pretrained(weights, model, variables, preprocessing="symmetric",
                             classes=["zero", "one", "two", "three"])
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    (root / "notes.png").write_text("not an image")
    return root, str(weights), images


def _run(capsys, *argv):
    status = cli.main(["explain", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_explain_writes_one_png_per_image_and_a_class_model(files, capsys):
    root, weights, images = files
    status, out, _ = _run(capsys, "--weights", weights, "--image-size", "32", "--method",
                          "grad-cam,saliency,integrated-gradients", "--steps", "4", "--out",
                          str(root / "out"), *images)
    assert status == 0
    assert out.split() == [str(root / "out" / "im0_explain.png"), str(root / "out" / "im1_explain.png")]
    for path in out.split():
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 3 * png.height  # image, 3 maps, top-5 in a row
    status, out, _ = _run(capsys, "--weights", weights, "--image-size", "32", "--method", "class-model",
                          "--target", "2", "--steps", "5", "--out", str(root / "out"))
    assert status == 0 and out.strip() == str(root / "out" / "class_model_2.png")


@pytest.mark.parametrize("argv,message", [
    (["--method", "lime"], "unknown methods ['lime']; valid methods: ['saliency', 'grad-cam',"),
    (["--target", "two"], "--target must be 'top1' or a class index"),
    (["--method", "class-model"], "class-model needs --target N"),
    (["--target", "4"], "--target 4 out of range: the model has 4 classes (0..3)"),
    (["--tap", "relu5_3"], "unknown conv-block tap 'relu5_3' for Grad-CAM; valid taps: ['conv1_1',"),
])
def test_bad_arguments_are_one_line(files, capsys, argv, message):
    _, weights, images = files
    status, _, err = _run(capsys, "--weights", weights, *argv, images[0])
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_not_an_image_and_registry_checks_come_before_any_download(files, capsys, monkeypatch):
    root, weights, images = files
    monkeypatch.setattr(pretrained, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded before the arguments were checked"))
    status, _, err = _run(capsys, "--model", "vgg16", str(root / "notes.png"))
    assert status == 2 and "notes.png: not an image file" in err
    status, _, err = _run(capsys, "--model", "vgg16", "--target", "1000", images[0])
    assert status == 2 and "the model has 1000 classes" in err
    status, _, err = _run(capsys, "--model", "vgg16", "--tap", "relu6_1", images[0])
    assert status == 2 and "valid taps" in err and "relu5_3" in err
    status, _, err = _run(capsys, "--model", "vgg16.features", images[0])
    assert status == 2 and "features only" in err
