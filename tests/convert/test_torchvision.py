"""Weight conversion: logits equal to torchvision itself, exact round trips, safe and strict reading."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import vgg_flax
from vgg_flax import cli, models, preprocessing
from vgg_flax.convert import engine, hashing, torch_check
from vgg_flax.convert import format as wformat
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.rules import Architecture
from vgg_flax.data.classes import imagenet_classes
from vgg_flax.evaluation import predict

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torch_reference import randomize_bn  # noqa: E402  (needs torch)

TORCHVISION_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
REL_TOL = 1e-5  # max abs logit error relative to max |logit| (fp32, eval mode)



def _rel_err(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


def _torch_logits(module, x):
    with torch.no_grad():
        return module(x).numpy()


def _assert_trees_equal(a, b):
    fa, fb = wformat.flatten_variables(a), wformat.flatten_variables(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_logits_equal_torchvision_and_round_trip_is_exact(name):
    torch.manual_seed(TORCHVISION_NAMES.index(name))
    reference = randomize_bn(getattr(torchvision.models, name)())
    source = reference.state_dict()
    model, variables = vgg_flax.load_torchvision(source)
    assert (model.config, model.batch_norm) == (vgg_flax.MODELS[name].keywords["config"],
                                               name.endswith("_bn"))
    assert vgg_flax.count_params(variables) == sum(p.numel() for p in reference.parameters())
    # 224 and a non-square size below 224, not a multiple of 32 (adaptive pool upsamples 6x5 -> 7x7).
    for batch, h, w in ((1, 224, 224), (2, 200, 168)):
        x = torch.randn(batch, 3, h, w)
        expected = _torch_logits(reference, x)
        assert _rel_err(model.apply(variables, _nhwc(x), train=False), expected) <= REL_TOL, (h, w)

    exported = vgg_flax.to_torchvision(model, variables)
    assert list(exported) == list(source)  # same keys, same order
    for key, value in source.items():
        if not key.endswith("num_batches_tracked"):
            assert np.array_equal(exported[key], value.numpy()), key
    fresh = getattr(torchvision.models, name)()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    _, again = vgg_flax.load_torchvision(exported)
    _assert_trees_equal(again, variables)


_NO_BN_LAYOUTS = ("keras", "keras_hub")  # layouts without BatchNorm variants


@pytest.mark.parametrize("name, layout", [
    (n, lay) for lay in engine.LAYOUTS for n in sorted(vgg_flax.MODELS)
    if lay not in _NO_BN_LAYOUTS or not vgg_flax.MODELS[n].keywords.get("batch_norm")])
def test_rules_use_every_key_once_and_fill_every_variable(name, layout):
    import jax
    import jax.numpy as jnp

    model = vgg_flax.get_model(name)
    arch = Architecture(model.config, model.batch_norm, 1000, 4096, layout, True)
    rules, ignored = engine.get_layout(layout).rules(arch, True)
    keys = [r.key for r in rules] + ignored
    assert len(keys) == len(set(keys)) and len({r.path for r in rules}) == len(rules)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    flat = wformat.flatten_variables(shapes, leaf=lambda v: v.shape)
    assert {"/".join(r.path) for r in rules} == set(flat)
    if layout == "torchvision" and name in TORCHVISION_NAMES:
        with torch.device("meta"):
            reference = getattr(torchvision.models, name)().state_dict()
        assert keys and set(keys) == set(reference)
        assert all(tuple(reference[r.key].shape) == r.shape for r in rules)


@pytest.mark.parametrize("config", ["C", "A-LRN"])
def test_paper_only_configs_convert_from_a_torchvision_layout(config):
    flax_model = vgg_flax.VGG(config=config, fc_width=64, num_classes=10)
    torch.manual_seed(0)
    reference = torch_check.torch_reference(flax_model)
    model, variables = vgg_flax.load_torchvision(reference.state_dict())
    assert (model.config, model.fc_width, model.num_classes) == (config, 64, 10)
    x = torch.randn(2, 3, 72, 56)  # the adaptive pool upsamples 2x1 -> 7x7
    assert _rel_err(model.apply(variables, _nhwc(x)), _torch_logits(reference, x)) <= REL_TOL


@pytest.fixture(scope="module")
def vgg11_bn():
    torch.manual_seed(1)
    return randomize_bn(torchvision.models.vgg11_bn(), seed=1)


def _score_map_mean(reference, x):
    """timm's semantics in torch: the classifier as a 7x7 conv and two 1x1 convs, scores averaged."""
    f = torch.nn.functional
    c = reference.classifier
    with torch.no_grad():
        y = reference.features(x)
        y = f.relu(f.conv2d(y, c[0].weight.reshape(-1, y.shape[1], 7, 7), c[0].bias))
        y = f.relu(f.conv2d(y, c[3].weight[:, :, None, None], c[3].bias))
        return f.conv2d(y, c[6].weight[:, :, None, None], c[6].bias).mean(dim=(2, 3)).numpy()


def test_dense_head_is_torchvision_at_224_and_score_map_mean_above(vgg11_bn):
    model, variables = vgg_flax.load_torchvision(vgg11_bn.state_dict(), head="dense")
    x = torch.randn(1, 3, 224, 224)
    assert _rel_err(model.apply(variables, _nhwc(x)), _torch_logits(vgg11_bn, x)) <= REL_TOL
    x = torch.randn(1, 3, 288, 256)  # 9x8 features -> a 3x2 score map
    expected = _score_map_mean(vgg11_bn, x)
    assert _rel_err(model.apply(variables, _nhwc(x)), expected) <= REL_TOL
    # Not the torchvision head's answer at this size: the test can tell the two apart.
    assert _rel_err(_torch_logits(vgg11_bn, x), expected) > 1e-3


def _timm_layout(state):
    """torchvision keys -> timm's (`pre_logits.fc1/fc2` convs, `head.fc`), as the hub files have them."""
    out = {k: v for k, v in state.items() if k.startswith("features.")}
    out["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(-1, 512, 7, 7)
    out["pre_logits.fc1.bias"] = state["classifier.0.bias"]
    out["pre_logits.fc2.weight"] = state["classifier.3.weight"][:, :, None, None]
    out["pre_logits.fc2.bias"] = state["classifier.3.bias"]
    out["head.fc.weight"], out["head.fc.bias"] = state["classifier.6.weight"], state["classifier.6.bias"]
    return out


def test_timm_layout_gives_the_same_variables(vgg11_bn, tmp_path):
    from safetensors.torch import save_file

    state = vgg11_bn.state_dict()
    _, expected = vgg_flax.load_torchvision(state)
    timm_state = _timm_layout(state)
    timm_state = {k: v.contiguous() for k, v in timm_state.items() if "num_batches" not in k}
    save_file(timm_state, tmp_path / "vgg11_bn.tv_in1k.safetensors")
    model, got = vgg_flax.load_torchvision(tmp_path / "vgg11_bn.tv_in1k.safetensors")
    _assert_trees_equal(got, expected)
    back = vgg_flax.to_torchvision(model, got, layout="timm")
    assert all(np.array_equal(back[k], v.numpy()) for k, v in timm_state.items())


# Small files for the I/O tests: VGG11-BN's features with a 64-wide classifier over 1000 classes.
@pytest.fixture(scope="module")
def slim():
    torch.manual_seed(2)
    reference = randomize_bn(torch_check.torch_reference(
        vgg_flax.VGG(config="A", batch_norm=True, fc_width=64, num_classes=1000)), seed=2)
    return reference, reference.state_dict()


@pytest.fixture(scope="module")
def slim_files(slim, tmp_path_factory):
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("slim")
    pth = directory / "slim.pth"
    torch.save(slim[1], pth)
    prefix = hashing.file_sha256(pth)[:8]
    hashed = directory / f"slim-{prefix}.pth"
    hashed.write_bytes(pth.read_bytes())  # torch.save's bytes depend on the file name: copy them
    st = directory / "slim.safetensors"
    save_file({k: v.contiguous() for k, v in slim[1].items()}, st)
    return {"pth": pth, "hashed": hashed, "safetensors": st, "prefix": prefix}


def test_pth_and_safetensors_files_load_the_same(slim, slim_files):
    _, from_dict = vgg_flax.load_torchvision(slim[1])
    for key in ("pth", "safetensors", "hashed"):
        _, got = vgg_flax.load_torchvision(slim_files[key])
        _assert_trees_equal(got, from_dict)


def test_safetensors_needs_no_torch(slim_files):
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "import vgg_flax\n"
            f"m, v = vgg_flax.load_torchvision({str(slim_files['safetensors'])!r})\n"
            "print(m.config, m.batch_norm, 'torch' in sys.modules and sys.modules['torch'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["A", "True", "None"]


def test_hash_prefix_is_verified(slim_files, tmp_path):
    assert hashing.verify_hash_prefix(slim_files["hashed"])[0] == slim_files["prefix"]
    wrong = tmp_path / "slim-0123abcd.pth"
    wrong.write_bytes(slim_files["pth"].read_bytes())
    with pytest.raises(ConversionError, match="does not start with the hash prefix '0123abcd'"):
        vgg_flax.load_torchvision(wrong)
    vgg_flax.load_torchvision(wrong, verify_hash=False)  # an explicit opt-out still loads


class _Payload:
    """A pickle whose unpickling calls open(marker, "w"): creating the file proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    for name in ("control", "attack"):
        torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "x": _Payload(tmp_path / name)},
                   tmp_path / f"{name}.pth")
        with open(tmp_path / f"{name}.pkl", "wb") as f:  # the legacy, non-zip form too
            pickle.dump({"x": _Payload(tmp_path / f"{name}_legacy")}, f, protocol=2)
    # Control: an unsafe load does run the payload, so the attack below is real.
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert (tmp_path / "control").exists()
    with pytest.raises(ConversionError, match="refused.*none of its code ran"):
        vgg_flax.load_torchvision(tmp_path / "attack.pth")
    os.replace(tmp_path / "attack.pkl", tmp_path / "attack_legacy.pth")
    with pytest.raises(ConversionError, match="refused"):
        vgg_flax.load_torchvision(tmp_path / "attack_legacy.pth")
    assert not (tmp_path / "attack").exists() and not (tmp_path / "attack_legacy").exists()


def _numpy_state(slim):
    return {k: v.numpy().copy() for k, v in slim[1].items()}


def test_bad_state_dicts_name_the_key_and_shapes(slim):
    state = _numpy_state(slim)
    del state["features.4.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'features.4.bias' \(expected shape \(128,\)"):
        vgg_flax.load_torchvision(state)
    state = {**_numpy_state(slim), "extra.weight": np.zeros(3)}
    with pytest.raises(ConversionError, match=r"unexpected key 'extra.weight' \(shape \(3,\)\)"):
        vgg_flax.load_torchvision(state)
    state = _numpy_state(slim)
    state["classifier.3.weight"] = np.zeros((64, 65), np.float32)
    with pytest.raises(ConversionError,
                       match=r"'classifier.3.weight': expected shape \(64, 64\), found \(64, 65\)"):
        vgg_flax.load_torchvision(state)


def test_features_only_state_dict_needs_head_none(slim):
    features = {k: v for k, v in _numpy_state(slim).items() if k.startswith("features.")}
    with pytest.raises(ConversionError, match="no classifier weights.*head='none'"):
        vgg_flax.load_torchvision(features)
    model, variables = vgg_flax.load_torchvision(features, head="none")
    convs = [name for name, _ in models.layer_names("A") if name.startswith("conv")]
    assert model.head == "none"
    assert set(variables["params"]) == set(convs) | {"bn" + name[4:] for name in convs}


def test_wrong_architecture_is_one_clear_error(slim):
    with pytest.raises(ConversionError, match="not a VGG state dict.*conv1.weight"):
        vgg_flax.load_torchvision({"conv1.weight": np.zeros((64, 3, 7, 7)), "fc.bias": np.zeros(10)})
    state = _numpy_state(slim)
    state["features.0.weight"] = np.zeros((32, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match="match no VGG config.*features.0: 32x3x3x3"):
        vgg_flax.load_torchvision(state)
    with pytest.raises(ConversionError, match=r"not VGG config 'E' .*expected features.3.weight of "
                       r"shape \(64, 64, 3, 3\), found features.4.weight of shape \(128, 64, 3, 3\)"
                       r"; the weights look like config 'A'"):
        vgg_flax.load_torchvision(_numpy_state(slim), config="E")  # VGG11 weights, VGG19 asked


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_truncated_files_are_refused(slim_files, tmp_path, kind):
    data = slim_files[kind].read_bytes()
    bad = tmp_path / f"cut.{kind}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        vgg_flax.load_torchvision(bad)


def test_nan_classifier_loads_features_only_with_its_preset(slim):
    state = _numpy_state(slim)
    for k in ("classifier.0.weight", "classifier.3.weight", "classifier.6.weight"):
        state[k] = np.full_like(state[k], np.nan)
    with pytest.warns(UserWarning, match="NaN.*imagenet1k_features"):
        model, variables = vgg_flax.load_torchvision(state)
    assert model.head == "none" and "fc1" not in variables["params"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = slim[0].features(x).numpy().transpose(0, 2, 3, 1)
    assert _rel_err(model.apply(variables, _nhwc(x)), expected) <= REL_TOL
    assert preprocessing.get_preset("imagenet1k_features").std == (1 / 255.0,) * 3


def test_save_and_load_pretrained(slim, tmp_path):
    model, variables = vgg_flax.load_torchvision(slim[1])
    path = tmp_path / "w.safetensors"
    vgg_flax.save_pretrained(path, model, variables, source="slim.pth", source_sha256="ab" * 32)
    loaded, got = vgg_flax.load_pretrained(path)
    assert loaded == model
    _assert_trees_equal(got, variables)
    meta = wformat.pretrained_metadata(path)
    assert meta["preprocessing"] == "torchvision" and meta["source"] == "slim.pth"
    assert meta["classes"][:2] == ["tench", "goldfish"] and len(meta["classes"]) == 1000
    dense, _ = vgg_flax.load_pretrained(path, head="dense")
    assert dense.head == "dense"
    with pytest.raises(ConversionError, match="not a vgg-flax pretrained file"):
        vgg_flax.load_pretrained(_plain_safetensors(tmp_path))


def _plain_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "plain.safetensors")
    return tmp_path / "plain.safetensors"


def test_load_image_equals_torchvision_transform(tmp_path):
    from PIL import Image
    from torchvision import transforms

    pixels = np.random.default_rng(0).integers(0, 256, (181, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    norm = preprocessing.get_preset("torchvision")
    expected = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(norm.mean, norm.std)])(Image.open(tmp_path / "x.png").convert("RGB"))
    got = predict.load_image(tmp_path / "x.png", norm)
    np.testing.assert_allclose(got, expected.numpy().transpose(1, 2, 0), atol=1e-5)


def test_cli_convert_and_predict(slim, slim_files, tmp_path, capsys):
    dst = tmp_path / "slim.safetensors"
    assert cli.main(["convert", str(slim_files["hashed"]), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"matches the prefix {slim_files['prefix']}" in out
    assert "VGG config A with BatchNorm, torchvision layout, 1000 classes" in out
    params = sum(p.numel() for p in slim[0].parameters())
    assert f"parameters: {params:,}" in out
    diff = float(out.split("max abs diff ")[1].split()[0])
    assert diff < 1e-4, out

    pixels = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(pixels).save(tmp_path / "img.png")
    assert cli.main(["predict", "--weights", str(dst), str(tmp_path / "img.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("img.png") and len(lines) == 6
    x = torch.from_numpy(predict.load_image(tmp_path / "img.png", preprocessing.get_preset("torchvision")))
    probs = torch.softmax(torch.from_numpy(_torch_logits(slim[0], x.permute(2, 0, 1)[None])), -1)[0]
    classes = imagenet_classes()
    top = torch.topk(probs, 5)
    for line, p, i in zip(lines[1:], top.values, top.indices, strict=True):
        assert line.split(None, 2)[2] == classes[int(i)] and f"{float(p):7.2%}".strip() in line
