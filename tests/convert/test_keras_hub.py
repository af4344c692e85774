"""keras-hub's VGG presets: directories written by keras-hub's `save_to_preset`, logits equal to its predict.

Random weights (keras-hub's initialisers, biases made non-zero), fp32, tiny widths (keras-hub's
`stackwise_num_filters`) at 224 px, the smallest input its heads take (a 7x7 map for fc1). The image
converter carries ImageNet's mean and std as keras-hub's timm-converted VGG presets do, so
`task.predict` on 0-255 pixels is compared with our model on `get_preset(stored preset)(pixels)`.
"""

import json
import os
import shutil

import numpy as np
import pytest

import vgg_flax
from vgg_flax import cli, preprocessing
from vgg_flax.convert import engine, keras_hub
from vgg_flax.convert import format as wformat
from vgg_flax.convert.errors import ConversionError

keras = pytest.importorskip("keras")  # tests/conftest.py loads torch before TensorFlow
khub = pytest.importorskip("keras_hub")
h5py = pytest.importorskip("h5py")
REL_TOL = 1e-5  # max abs error relative to max |reference| (fp32)
REPEATS, FILTERS = [1, 1, 2, 2, 2], [4, 8, 8, 16, 16]  # config A's blocks, tiny widths
CONFIG = (4, "M", 8, "M", 8, 8, "M", 16, 16, "M", 16, 16, "M")
HIDDEN, CLASSES = 12, 5
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _rel_err(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _classifier(pooling, seed):
    """A tiny VGGImageClassifier with random non-zero biases and an ImageNet-normalising converter."""
    shape = (224, 224, 3) if pooling == "flatten" else (None, None, 3)  # Flatten needs a fixed size
    backbone = khub.models.VGGBackbone(stackwise_num_repeats=REPEATS, stackwise_num_filters=FILTERS,
                                       image_shape=shape)
    converter = khub.layers.VGGImageConverter(image_size=(224, 224), scale=[1 / 255 / s for s in STD],
                                              offset=[-m / s for m, s in zip(MEAN, STD, strict=True)])
    task = khub.models.VGGImageClassifier(
        backbone, CLASSES, pooling=pooling, pooling_hidden_dim=HIDDEN,
        preprocessor=khub.models.VGGImageClassifierPreprocessor(image_converter=converter))
    rng = np.random.default_rng(seed)
    for layer in task.backbone.layers + task.head.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    return task


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """Per pooling: the preset directory, the task, 0-255 pixels and keras-hub's predict on them."""
    pixels = np.random.default_rng(7).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    out = {}
    for seed, pooling in enumerate(("avg", "flatten")):
        task = _classifier(pooling, seed)
        directory = tmp_path_factory.mktemp(f"keras_hub_{pooling}") / "preset"
        task.save_to_preset(str(directory))
        out[pooling] = {"dir": directory, "task": task, "pixels": pixels,
                        "logits": task.predict(pixels, verbose=0)}
    return out


def _weights(task):
    return {w.path.split("/")[-2] + "/" + w.path.split("/")[-1]: w.numpy()
            for w in task.backbone.weights + task.head.weights}


@pytest.mark.parametrize("pooling, layout", [("avg", "keras_hub"), ("flatten", "keras")])
def test_presets_give_keras_hub_logits(presets, pooling, layout):
    p = presets[pooling]
    model, variables, meta = vgg_flax.from_pretrained(p["dir"], return_metadata=True)
    assert (model.config, model.fc_width, model.num_classes, model.head) == (CONFIG, HIDDEN, CLASSES,
                                                                             "torchvision")
    assert meta["preprocessing"] == "torchvision"
    x = preprocessing.get_preset(meta["preprocessing"])(p["pixels"])
    assert _rel_err(model.apply(variables, x, train=False), p["logits"]) <= REL_TOL
    exported = engine.export_weights(model, variables, layout)  # the rules backwards: keras-hub's own
    expected = _weights(p["task"])
    assert exported.keys() == expected.keys()
    assert all(np.array_equal(v, expected[k]) for k, v in exported.items())


def test_avg_preset_with_the_dense_head_gives_keras_hub_logits_above_224(presets):
    p = presets["avg"]
    pixels = np.random.default_rng(8).uniform(0, 255, (1, 224, 288, 3)).astype(np.float32)
    converter = p["task"].preprocessor.image_converter
    converter.image_size = (224, 288)  # resizing to its own size: the converter only normalises
    try:
        logits = p["task"].predict(pixels, verbose=0)
    finally:
        converter.image_size = (224, 224)
    model, variables = vgg_flax.load_weights(p["dir"], head="dense")
    got = model.apply(variables, preprocessing.get_preset("torchvision")(pixels), train=False)
    assert _rel_err(got, logits) <= REL_TOL


def test_the_stored_preset_is_keras_hub_image_converter(presets):
    pixels = presets["avg"]["pixels"]
    expected = keras.ops.convert_to_numpy(presets["avg"]["task"].preprocessor.image_converter(pixels))
    got = preprocessing.get_preset("torchvision")(pixels)
    assert _rel_err(got, expected) <= 1e-6
    offset = [-m / s for m, s in zip(MEAN, STD, strict=True)]
    assert keras_hub.preset_for([1 / 255 / s for s in STD], offset) == "torchvision"
    assert keras_hub.preset_for(2 / 255, -1.0) == "symmetric"
    with pytest.raises(ConversionError, match=r"^preprocessor.json: scale 0.00392156862745098 and offset "
                                              r"None \(on \[0, 1\] pixels: mean \[0.0, 0.0, 0.0\], std "
                                              r"\[1.0, 1.0, 1.0\]\) are no vgg_flax preset's"):
        keras_hub.preset_for(1 / 255, None)


@pytest.mark.parametrize("pooling, layout", [("avg", "keras_hub"), ("flatten", "keras")])
def test_convert_cli_stores_the_preset_of_preprocessor_json(presets, pooling, layout, tmp_path, capsys):
    p = presets[pooling]
    out = tmp_path / "hub.safetensors"
    assert cli.main(["convert", str(p["dir"]), str(out), "--no-check"]) == 0
    text = capsys.readouterr().out
    assert f"VGG config {CONFIG} without BatchNorm, {layout} layout, {CLASSES} classes" in text
    assert "the 'torchvision' preset, stored with the weights" in text
    meta = wformat.pretrained_metadata(out)
    assert meta["preprocessing"] == "torchvision" and meta["source"] == "preset"
    assert meta["source_sha256"] == engine.source_sha256(p["dir"])
    model, variables = vgg_flax.load_pretrained(out)
    x = preprocessing.get_preset("torchvision")(p["pixels"])
    assert _rel_err(model.apply(variables, x, train=False), p["logits"]) <= REL_TOL


def test_the_backbone_weights_file_of_a_preset_gives_keras_hub_feature_maps(presets):
    p = presets["avg"]
    x = preprocessing.get_preset("torchvision")(p["pixels"])
    model, variables, meta = vgg_flax.from_pretrained(p["dir"] / keras_hub.BACKBONE_WEIGHTS, head="none",
                                                      return_metadata=True)
    assert meta["preprocessing"] == "torchvision"  # from the preprocessor.json beside it, not Keras's caffe
    maps = p["task"].backbone.predict(x, verbose=0)
    assert _rel_err(model.apply(variables, x, train=False), maps) <= REL_TOL


def test_a_task_saved_by_save_weights_is_read_by_its_keys(presets, tmp_path):
    """One Keras 3 file, the backbone and the head nested in it, no JSON: the keys (a 4-d fc1) say
    keras-hub's layout; widths other than the paper's are given as config."""
    p = presets["avg"]
    path = tmp_path / "task.weights.h5"
    p["task"].save_weights(str(path))
    model, variables, meta = vgg_flax.from_pretrained(path, config=CONFIG, return_metadata=True)
    assert meta["preprocessing"] == "torchvision" and model.fc_width == HIDDEN
    x = preprocessing.get_preset("torchvision")(p["pixels"])
    assert _rel_err(model.apply(variables, x, train=False), p["logits"]) <= REL_TOL


def test_a_backbone_saved_alone_records_torchvision_with_a_warning(presets, tmp_path):
    directory = tmp_path / "backbone"
    presets["avg"]["task"].backbone.save_to_preset(str(directory))
    assert not (directory / keras_hub.PREPROCESSOR).exists()
    with pytest.warns(UserWarning, match="no preprocessor.json, so no record of the input"):
        model, _, meta = vgg_flax.from_pretrained(directory, head="none", return_metadata=True)
    assert meta["preprocessing"] == "torchvision" and model.config == CONFIG
    with pytest.raises(ConversionError, match=r"holds no classifier weights \(no fc1/kernel\)"):
        vgg_flax.load_weights(directory, preprocessing="torchvision")


def _copy(directory, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def _edit_task(directory, **fields):
    path = directory / keras_hub.TASK
    spec = json.loads(path.read_text())
    spec["config"].update(fields)
    path.write_text(json.dumps(spec))


def test_malformed_presets_are_one_clear_error(presets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    missing = _copy(presets["avg"]["dir"], tmp_path / "missing")
    os.remove(missing / keras_hub.BACKBONE_WEIGHTS)
    with pytest.raises(ConversionError, match=r"copy: a keras-hub preset without model.weights.h5$"):
        vgg_flax.load_weights(missing)
    with pytest.raises(ConversionError, match=r"empty: not a keras-hub VGG preset: no config.json"):
        vgg_flax.from_pretrained(tmp_path / "empty")
    shaped = _copy(presets["avg"]["dir"], tmp_path / "shaped")
    with h5py.File(shaped / keras_hub.BACKBONE_WEIGHTS, "r+") as f:
        del f["layers/conv2d_1/vars/0"]  # block2_conv1
        f["layers/conv2d_1/vars/0"] = np.zeros((3, 3, 4, 9), np.float32)
    with pytest.raises(ConversionError, match=r"copy: the Keras conv layers are not VGG config .*: the file "
                                              r"block2_conv1 is \(3, 3, 4, 9\), not \(3, 3, 4, 8\)"):
        vgg_flax.load_weights(shaped)
    shaped = _copy(presets["avg"]["dir"], tmp_path / "shaped_head")
    with h5py.File(shaped / keras_hub.TASK_WEIGHTS, "r+") as f:
        group = next(g for g in f["layers/sequential/layers"].values() if g["vars"].attrs["name"] == "fc2")
        del group["vars/0"]
        group["vars/0"] = np.zeros((1, 1, HIDDEN, 11), np.float32)
    with pytest.raises(ConversionError, match=r"copy: 1 problem\(s\):\n  key 'fc2/kernel': expected "
                                              r"shape \(1, 1, 12, 12\), found \(1, 1, 12, 11\)$"):
        vgg_flax.load_weights(shaped)
    pooled = _copy(presets["avg"]["dir"], tmp_path / "pooled")
    _edit_task(pooled, pooling="max")
    with pytest.raises(ConversionError, match=r"task.json: pooling 'max' has no vgg-flax head \(valid: "
                                              r"\['avg', 'flatten'\]\); load the features only with"):
        vgg_flax.load_weights(pooled)
    model, _ = vgg_flax.load_weights(pooled, head="none")  # the features of any pooling
    assert model.config == CONFIG and model.head == "none"
    capsys.readouterr()
    assert cli.main(["convert", str(pooled), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pooling 'max' has no vgg-flax head" in err and "Traceback" not in err


def test_keras_hub_stacks_are_the_paper_configs():
    from keras_hub.src.utils.timm import convert_vgg  # keras-hub's own table of its timm VGGs

    from vgg_flax.models import CONFIG_ALIASES

    for name, repeats in convert_vgg.REPEATS_BY_SIZE.items():
        spec = {"class_name": "VGGBackbone", "config": convert_vgg.convert_backbone_config(
            {"architecture": name})}
        assert spec["config"]["stackwise_num_repeats"] == repeats
        assert keras_hub.backbone_config(spec) == CONFIG_ALIASES[name]
    spec = {"class_name": "VGGBackbone", "config": {"stackwise_num_repeats": REPEATS,
                                                    "stackwise_num_filters": FILTERS}}
    assert keras_hub.backbone_config(spec) == CONFIG
    spec["config"]["stackwise_num_filters"] = FILTERS[:4]
    with pytest.raises(ConversionError, match=r"config.json: stackwise_num_repeats \[1, 1, 2, 2, 2\] and "
                                              r"stackwise_num_filters \[4, 8, 8, 16\] are not two lists"):
        keras_hub.backbone_config(spec)
    with pytest.raises(ConversionError, match="config.json: a ResNetBackbone preset, not keras-hub's VGG"):
        keras_hub.backbone_config({"class_name": "ResNetBackbone", "config": {}})
