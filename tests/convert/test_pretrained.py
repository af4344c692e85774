"""Pretrained weights by name, URL and hub repo, from a local server: cached, checked, resumable."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from weights_server import serving

import vgg_flax
from vgg_flax import cli, preprocessing
from vgg_flax.convert import hashing, pretrained, registry, torch_check, torch_pickle
from vgg_flax.convert.errors import ConversionError
from vgg_flax.data.classes import imagenet_classes
from vgg_flax.evaluation import predict

torch = pytest.importorskip("torch")
from torch_reference import randomize_bn  # noqa: E402  (needs torch)

REL_TOL = 1e-5  # max abs logit error relative to max |logit| (fp32, eval mode)



def _reference(seed=2, **fields):
    """A torch module in torchvision's layout (a 64-wide classifier keeps the files small)."""
    torch.manual_seed(seed)
    fields = {"config": "A", "batch_norm": True, "fc_width": 64, "num_classes": 1000, **fields}
    return randomize_bn(torch_check.torch_reference(vgg_flax.VGG(**fields)), seed)


def _file_bytes(state, legacy=True):
    """torch.save bytes and the torchvision-style name with their sha256 prefix."""
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    import hashlib

    return data, hashlib.sha256(data).hexdigest()[:8]


def _rel_err(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _logits(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _files_under(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def slim():
    reference = _reference()
    data, prefix = _file_bytes(reference.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 32, 40, 3)).astype(np.float32)
    return {"reference": reference, "data": data, "file": f"slim-{prefix}.pth", "prefix": prefix,
            "x": x, "logits": _logits(reference, x)}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_FLAX_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("VGG_FLAX_MIRROR", "VGG_FLAX_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def server():
    with serving() as s:
        yield s


@pytest.fixture
def slim_entry(slim, server, monkeypatch):
    """A registry entry "slim" whose file the local server serves through VGG_FLAX_MIRROR."""
    entry = registry.Pretrained("slim", "vgg11_bn", slim["file"], 0, 1.0, 2.0, 0.0, 1.0, "torchvision",
                                "torchvision")
    monkeypatch.setitem(registry.REGISTRY, "slim", entry)
    monkeypatch.setenv("VGG_FLAX_MIRROR", server.url + "/mirror")
    server.files["/mirror/" + slim["file"]] = slim["data"]
    return entry


def test_registry_name_through_the_mirror_then_from_the_cache(env, server, slim, slim_entry, monkeypatch):
    model, variables, meta = vgg_flax.from_pretrained("slim", progress=False, return_metadata=True)
    assert _rel_err(model.apply(variables, slim["x"], train=False), slim["logits"]) <= REL_TOL
    assert meta["preprocessing"] == "torchvision" and meta["classes"] == imagenet_classes()
    url = f"{server.url}/mirror/{slim['file']}"
    assert meta["provenance"]["url"] == url and meta["provenance"]["name"] == "slim"
    assert meta["source_sha256"].startswith(slim["prefix"])
    # Only the converted weights stay: no .pth, no .part.
    assert _files_under(env / "cache") == [f"converted/slim-{slim['prefix']}.safetensors"]
    requests = len(server.requests)
    server.stop()
    monkeypatch.setattr(torch_pickle, "load", lambda *a: pytest.fail("the .pth parser ran"))
    again, cached = vgg_flax.from_pretrained("slim")
    assert again == model and len(server.requests) == requests
    for a, b in zip(*(vgg_flax.convert.format.flatten_variables(v).values() for v in (variables, cached)),
                    strict=True):
        assert np.array_equal(a, b)
    dense, _ = vgg_flax.from_pretrained("slim", head="dense")
    features, fv = vgg_flax.from_pretrained("slim", head="none")
    assert dense.head == "dense" and features.head == "none" and "fc1" not in fv["params"]


def test_substituted_file_is_refused_and_nothing_is_cached(env, server, slim, slim_entry):
    other, _ = _file_bytes(_reference(seed=3).state_dict())
    server.files["/mirror/" + slim["file"]] = other
    found = __import__("hashlib").sha256(other).hexdigest()
    with pytest.raises(ConversionError, match=rf"{server.url}/mirror/{slim['file']}: sha256 {found} "
                                              rf"does not start with the expected {slim['prefix']}"):
        vgg_flax.from_pretrained("slim", progress=False)
    assert _files_under(env / "cache") == []


def test_file_in_downloads_is_hash_checked_and_left_in_place(env, server, slim, slim_entry):
    place = env / "cache" / "downloads" / slim["file"]  # placed by hand, or left by a cut conversion
    place.parent.mkdir(parents=True)
    other, _ = _file_bytes(_reference(seed=3).state_dict())
    place.write_bytes(other)
    found = __import__("hashlib").sha256(other).hexdigest()
    with pytest.raises(ConversionError, match=rf"^{place}: sha256 {found} does not start with the expected "
                                              rf"{slim['prefix']}: .*left in place"):
        vgg_flax.from_pretrained("slim", progress=False)
    assert place.read_bytes() == other and server.requests == []
    assert _files_under(env / "cache") == [f"downloads/{slim['file']}"]


def test_predict_checks_its_images_before_any_download(env, server, slim, slim_entry, capsys):
    notes = env / "notes.txt"
    notes.write_text("not an image")
    assert cli.main(["predict", "--model", "slim", str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot identify image file" in err and str(notes) in err
    assert server.requests == [] and _files_under(env / "cache") == []


def test_cut_download_leaves_no_weights_and_resumes_with_range(env, server, slim, slim_entry):
    path = "/mirror/" + slim["file"]
    server.cut.add(path)
    with pytest.raises(ConversionError, match=rf"{server.url}{path}: download failed after [\d,]+ bytes"):
        vgg_flax.from_pretrained("slim", progress=False)
    assert [f for f in _files_under(env / "cache") if not f.endswith(".part")] == []
    ranges = [r for p, r in server.requests if p == path]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:]) and len(ranges) == 3
    server.cut.clear()
    model, variables = vgg_flax.from_pretrained("slim", progress=False)
    have = int(server.requests[-1][1][len("bytes="):-1])
    assert 0 < have < len(slim["data"])  # the last request only asked for the rest
    assert _rel_err(model.apply(variables, slim["x"], train=False), slim["logits"]) <= REL_TOL


def test_offline_names_the_file_and_the_place_then_uses_it(env, server, slim, slim_entry, monkeypatch):
    monkeypatch.setenv("VGG_FLAX_OFFLINE", "1")
    place = env / "cache" / "downloads" / slim["file"]
    with pytest.raises(ConversionError, match=rf"VGG_FLAX_OFFLINE=1 and {slim['file']} is in no cache: "
                                              rf"download .* and place it at {place}"):
        vgg_flax.from_pretrained("slim")
    assert server.requests == []
    place.parent.mkdir(parents=True)
    place.write_bytes(slim["data"])
    model, variables = vgg_flax.from_pretrained("slim")
    assert _rel_err(model.apply(variables, slim["x"], train=False), slim["logits"]) <= REL_TOL
    assert server.requests == []


def test_torch_hub_cache_is_used_in_place_and_hash_checked(env, server, slim, slim_entry, monkeypatch):
    monkeypatch.setenv("VGG_FLAX_OFFLINE", "1")
    hub_copy = env / "torch" / "hub" / "checkpoints" / slim["file"]
    hub_copy.parent.mkdir(parents=True)
    middle = len(slim["data"]) // 2  # legacy files end with whichever storage sorts last: maybe a 0
    data = bytearray(slim["data"])
    data[middle] ^= 0xFF
    hub_copy.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="does not start with the hash prefix"):
        vgg_flax.from_pretrained("slim")
    assert _files_under(env / "cache") == []
    hub_copy.write_bytes(slim["data"])
    model, variables = vgg_flax.from_pretrained("slim")
    assert hub_copy.exists() and server.requests == []  # the user's torch cache is left alone
    assert _rel_err(model.apply(variables, slim["x"], train=False), slim["logits"]) <= REL_TOL


def test_hf_hub_from_a_preseeded_cache_and_offline_error(env, slim, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    from safetensors.numpy import save_file

    _, variables = vgg_flax.load_torchvision(slim["reference"].state_dict())
    model, _ = vgg_flax.load_torchvision(slim["reference"].state_dict())
    timm_state = vgg_flax.to_torchvision(model, variables, layout="timm")
    snapshot = env / "hf" / "models--timm--slim.tv_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(timm_state, snapshot / "model.safetensors")
    (env / "hf" / "models--timm--slim.tv_in1k" / "refs").mkdir()
    (env / "hf" / "models--timm--slim.tv_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(env / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got, v = vgg_flax.from_pretrained("hf-hub:timm/slim.tv_in1k")
    assert _rel_err(got.apply(v, slim["x"], train=False), slim["logits"]) <= REL_TOL
    with pytest.raises(ConversionError, match=r"hf-hub:timm/other: offline and model.safetensors is not "
                                              r"in the hub cache; place it at .*models--timm--other"):
        vgg_flax.from_pretrained("hf-hub:timm/other")


def test_cli_weights_download_and_predict_model(env, server, slim, slim_entry, capsys):
    from PIL import Image

    assert cli.main(["weights", "download", "slim", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("slim: A batch_norm=True head=torchvision, preprocessing 'torchvision'")
    pixels = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(env / "img.png")
    server.stop()  # predict reads the cache
    assert cli.main(["predict", "--model", "slim", str(env / "img.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    x = predict.load_image(env / "img.png", preprocessing.get_preset("torchvision"))[None]
    probs = torch.softmax(torch.from_numpy(_logits(slim["reference"], x)), -1)[0]
    top = torch.topk(probs, 5)
    classes = imagenet_classes()
    for line, p, i in zip(lines[1:], top.values, top.indices, strict=True):
        assert line.split(None, 2)[2] == classes[int(i)] and f"{float(p):7.2%}".strip() in line


def test_fine_tune_from_a_registry_name(env, server, monkeypatch):
    """--config.pretrained=NAME: downloaded through the mirror, its features start the run."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
    from train_harness import FakeDatasets, tiny_config

    from vgg_flax.train import loop

    fields = {"config": "A", "batch_norm": True, "fc_width": 16, "num_classes": 7}
    data, prefix = _file_bytes(_reference(seed=5, **fields).state_dict(), legacy=False)
    name = f"tiny-{prefix}.pth"
    monkeypatch.setitem(registry.REGISTRY, "tiny", registry.Pretrained(
        "tiny", "vgg11_bn", name, 0, 0.0, 0.0, 0.0, 0.0, "torchvision", "torchvision"))
    monkeypatch.setenv("VGG_FLAX_MIRROR", server.url)
    server.files["/" + name] = data
    config = tiny_config(**{"model.config": "A", "model.head": "torchvision", "model.fc_width": 16,
                            "pretrained": "tiny",
                            "reset_head": True, "num_train_steps": 1, "schedule.learning_rate": 0.0})
    state = loop.train_and_evaluate(config, str(env / "run"), datasets=FakeDatasets())
    _, source = vgg_flax.from_pretrained("tiny")
    for layer in ("conv1_1", "conv2_1", "fc1", "fc2"):
        np.testing.assert_array_equal(np.asarray(state.params[layer]["kernel"]),
                                      np.asarray(source["params"][layer]["kernel"]))
    assert state.params["fc3"]["kernel"].shape == (16, 3)  # the run's 3 classes, a fresh head


# The torchvision variants' layouts (configs A, B, D, E with and without BatchNorm), read by a child
# in which `import torch` fails; a 64-wide classifier keeps each file near its features' size.
LAYOUTS = [(c, bn) for c in "ABDE" for bn in (False, True)]
_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _Block())
import numpy as np, vgg_flax
urls, x, out = sys.argv[1].split(","), np.load(sys.argv[2]), sys.argv[3]
logits = {}
for i, url in enumerate(urls):
    model, variables = vgg_flax.from_pretrained(url, progress=False)
    logits[str(i)] = np.asarray(model.apply(variables, x, train=False))
np.savez(out, **logits)
print("torch" in sys.modules)
"""


def test_url_without_torch_gives_torchvision_logits_for_every_layout(env, server, monkeypatch):
    x = np.random.default_rng(7).standard_normal((1, 32, 32, 3)).astype(np.float32)
    np.save(env / "x.npy", x)
    urls, expected = [], []
    for i, (config, bn) in enumerate(LAYOUTS):
        reference = _reference(seed=10 + i, config=config, batch_norm=bn)
        data, prefix = _file_bytes(reference.state_dict(), legacy=i % 2 == 0)
        path = f"/models/{config.lower()}{'_bn' * bn}-{prefix}.pth"
        server.files[path] = data
        urls.append(server.url + path)
        expected.append(_logits(reference, x))
        del reference, data
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, ",".join(urls), str(env / "x.npy"),
                          str(env / "logits.npz")], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "VGG_FLAX_HOME": str(env / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False"]
    got = np.load(env / "logits.npz")
    for i, layout in enumerate(LAYOUTS):
        assert _rel_err(got[str(i)], expected[i]) <= REL_TOL, layout
    # Server stopped: the second load comes from the converted cache.
    server.stop()
    monkeypatch.setattr(torch_pickle, "load", lambda *a: pytest.fail("the .pth parser ran"))
    model, variables = vgg_flax.from_pretrained(urls[-1])
    assert _rel_err(model.apply(variables, x, train=False), expected[-1]) <= REL_TOL
    assert hashing.hash_prefix(urls[-1]) in pretrained.converted_path(urls[-1])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_only(env, server, monkeypatch):
    from vgg_flax.convert import download

    data = bytes(range(256)) * 20_000
    server.files["/f.bin"] = data
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    download.fetch(server.url + "/f.bin", str(env / "a.bin"), progress=True)
    line = terminal.getvalue().rsplit("\r", 1)[-1]
    assert "f.bin: 5.1 MB / 5.1 MB (100%) ETA 00:00" in line and "MB/s" in line, line
    terminal.seek(0), terminal.truncate()
    download.fetch(server.url + "/f.bin", str(env / "b.bin"), progress=False)
    monkeypatch.setattr(terminal, "isatty", lambda: False)
    download.fetch(server.url + "/f.bin", str(env / "c.bin"), progress=True)
    assert terminal.getvalue() == ""
    assert (env / "c.bin").read_bytes() == data
