"""Keras's VGG16/VGG19 weights: files written by Keras itself, logits equal to Keras's own predict.

Random weights (Keras's initialisers, biases made non-zero), fp32. The models with the top need
224x224 input (Keras's Flatten), so that model is built once per module and used for one image.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import vgg_flax
from vgg_flax import cli, preprocessing
from vgg_flax.convert import engine
from vgg_flax.convert import format as wformat
from vgg_flax.convert.errors import ConversionError
from vgg_flax.data.classes import imagenet_classes

keras = pytest.importorskip("keras")  # tests/conftest.py loads torch before TensorFlow
h5py = pytest.importorskip("h5py")
REL_TOL = 1e-5  # max abs error relative to max |reference| (fp32)
FORMATS = ("weights.h5", "model.h5", "legacy.h5", "model.keras")


def _rel_err(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _randomize_biases(model, seed):
    """Keras initialises biases to 0, which would hide a misplaced bias."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    return model


def _save(model, directory, stem, formats=FORMATS):
    """The weights in each file Keras writes: Keras 3's `save_weights`, `save(".h5")`, the legacy
    weights-only HDF5 layout of the files keras.applications downloads (Keras's own writer), and
    `save(".keras")`."""
    from keras.src.legacy.saving import legacy_h5_format

    def legacy(path):
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)

    writers = {"weights.h5": (".weights.h5", model.save_weights), "model.h5": (".h5", model.save),
               "legacy.h5": ("_legacy.h5", legacy), "model.keras": (".keras", model.save)}
    files = {}
    for fmt in formats:
        suffix, write = writers[fmt]
        files[fmt] = directory / f"{stem}{suffix}"
        write(files[fmt])
    return files


@pytest.fixture(scope="module")
def top(tmp_path_factory):
    """VGG16 with its top (logits: no softmax), two files (the other formats are tested without the
    top, where they cost less), and Keras's logits for one image."""
    model = _randomize_biases(keras.applications.VGG16(weights=None, classifier_activation=None), 0)
    files = _save(model, tmp_path_factory.mktemp("keras_top"), "vgg16", ("weights.h5", "legacy.h5"))
    pixels = np.random.default_rng(1).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    caffe = keras.applications.vgg16.preprocess_input(pixels.copy())
    return {"model": model, "files": files, "pixels": pixels,
            "logits": model.predict(caffe, verbose=0)}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Features-only VGG16 and VGG19 at 48x64, their files, and Keras's feature maps."""
    directory, out = tmp_path_factory.mktemp("keras_features"), {}
    x = np.random.default_rng(2).uniform(-100, 150, (2, 48, 64, 3)).astype(np.float32)
    for i, (name, build) in enumerate((("vgg16", keras.applications.VGG16),
                                        ("vgg19", keras.applications.VGG19))):
        model = _randomize_biases(build(weights=None, include_top=False, input_shape=(48, 64, 3)), i)
        out[name] = {"files": _save(model, directory, name), "x": x, "maps": model.predict(x, verbose=0)}
    return out


def test_caffe_preset_is_keras_preprocess_input():
    pixels = np.random.default_rng(3).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(preprocessing.get_preset("caffe")(pixels), expected, rtol=1e-6, atol=1e-4)


def test_vgg16_with_top_gives_keras_logits_from_every_file(top):
    caffe = preprocessing.get_preset("caffe")(top["pixels"])
    loaded = {}
    for fmt, path in top["files"].items():
        model, variables, meta = vgg_flax.from_pretrained(path, return_metadata=True)
        assert (model.config, model.batch_norm, model.num_classes, model.head) == ("D", False, 1000,
                                                                                 "torchvision")
        assert meta["preprocessing"] == "caffe", fmt
        loaded[fmt] = wformat.flatten_variables(variables)
    first = loaded["weights.h5"]
    for fmt in loaded:
        assert loaded[fmt].keys() == first.keys()
        assert all(np.array_equal(loaded[fmt][k], v) for k, v in first.items()), fmt
    model, variables = vgg_flax.load_weights(top["files"]["weights.h5"])
    assert _rel_err(model.apply(variables, caffe, train=False), top["logits"]) <= REL_TOL
    exported = engine.export_weights(model, variables, "keras")  # and back: the rules both ways
    keras_weights = {w.path: w.numpy() for w in top["model"].weights}
    assert all(np.array_equal(v, keras_weights[k]) for k, v in exported.items())
    assert len(exported) == len(keras_weights)


@pytest.mark.parametrize("name, config", [("vgg16", "D"), ("vgg19", "E")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_features_only_models_give_keras_feature_maps(features, name, config, fmt):
    model, variables = vgg_flax.load_weights(features[name]["files"][fmt], head="none")
    assert model.config == config and model.head == "none"
    got = model.apply(variables, features[name]["x"], train=False)
    assert _rel_err(got, features[name]["maps"]) <= REL_TOL
    with pytest.raises(ConversionError, match=r"holds no classifier weights \(no fc1/kernel\)"):
        vgg_flax.load_weights(features[name]["files"][fmt])


def test_convert_then_predict_gives_keras_top5(top, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "vgg16_keras.safetensors"
    assert cli.main(["convert", str(top["files"]["weights.h5"]), str(out), "--no-check"]) == 0
    assert "VGG config D without BatchNorm, keras layout, 1000 classes" in capsys.readouterr().out
    assert wformat.pretrained_metadata(out)["preprocessing"] == "caffe"
    pixels = np.random.default_rng(4).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    assert cli.main(["predict", "--weights", str(out), str(tmp_path / "img.png")]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    # Resize(256) leaves a 256x256 image as it is; CenterCrop(224) starts at 16.
    crop = pixels[16:240, 16:240].astype(np.float32)[None]
    logits = top["model"].predict(keras.applications.vgg16.preprocess_input(crop), verbose=0)[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    classes = imagenet_classes()
    expected = [(classes[i], f"{probs[i]:7.2%}".strip()) for i in np.argsort(-probs)[:5]]
    assert [(line.split(None, 2)[2], line.split()[1]) for line in lines] == expected


def _copy(path, tmp_path):
    target = tmp_path / os.path.basename(path)
    shutil.copy(path, target)
    return target


def test_malformed_files_are_one_clear_error(features, tmp_path, capsys):
    files = features["vgg16"]["files"]
    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    with pytest.raises(ConversionError, match="notes.h5: not a readable HDF5 file"):
        vgg_flax.load_weights(text, head="none")
    archive = tmp_path / "notes.keras"
    archive.write_text("not a zip")
    with pytest.raises(ConversionError, match="notes.keras: not a .keras archive holding model.weights.h5"):
        vgg_flax.load_weights(archive, head="none")
    missing = _copy(files["weights.h5"], tmp_path)
    with h5py.File(missing, "r+") as f:
        name = next(k for k, g in f["layers"].items() if g["vars"].attrs.get("name") == "block3_conv2")
        del f["layers"][name]
    with pytest.raises(ConversionError, match=r"not VGG config 'D' \(the closest\): the file lacks "
                                              r"block3_conv2 \(3, 3, 256, 256\)"):
        vgg_flax.load_weights(missing, head="none")
    legacy = _copy(files["legacy.h5"], tmp_path)
    with h5py.File(legacy, "r+") as f:
        del f["block5_conv3"]
    with pytest.raises(ConversionError, match="layer 'block5_conv3' is listed in layer_names but has no"):
        vgg_flax.load_weights(legacy, head="none")
    shaped = _copy(files["model.h5"], tmp_path)
    with h5py.File(shaped, "r+") as f:
        del f["model_weights/block1_conv1/block1_conv1/bias"]
        f["model_weights/block1_conv1/block1_conv1/bias"] = np.zeros(63, np.float32)
    with pytest.raises(ConversionError, match=r"key 'block1_conv1/bias': expected shape \(64,\), "
                                              r"found \(63,\)"):
        vgg_flax.load_weights(shaped, head="none")
    capsys.readouterr()
    assert cli.main(["convert", str(text), str(tmp_path / "out.safetensors"), "--head", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable HDF5 file" in err and "Traceback" not in err


def test_h5_files_need_h5py_only_and_only_when_read(features):
    code = ("import sys; sys.modules['tensorflow'] = sys.modules['keras'] = None  # imports now fail\n"
            "import vgg_flax\n"
            "before = 'h5py' in sys.modules\n"
            f"m, v = vgg_flax.load_weights({str(features['vgg16']['files']['weights.h5'])!r}, head='none')\n"
            "print(m.config, before, 'h5py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["D", "False", "True"]
