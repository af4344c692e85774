"""Evaluation: each protocol of a tiny model equals a direct computation of the same average; every
example is counted once when the batch size does not divide the split; the CLI writes the table."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vgg_flax
from vgg_flax import evaluation
from vgg_flax.preprocessing import get_preset

try:  # torch must be imported before TensorFlow initialises, or importing it later segfaults.
    import torch  # noqa: F401
except ImportError:
    pass

Q, S, CLASSES = 64, 32, 10
# Images whose short side is already Q: the resize is the identity, so the direct computation below
# needs no resampler and checks crops, flips, heads and averaging exactly.
SIZES = [(64, 64), (64, 80), (70, 64), (64, 91), (64, 66), (77, 64), (64, 64)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        os.makedirs(root / "val" / f"c{i % 3}", exist_ok=True)
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3) * np.sin(x[..., None] / rng.uniform(3, 9) + y[..., None] / 7.0)
        pixels = np.clip(128 + base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "val" / f"c{i % 3}" / f"im{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny():
    """A torchvision-head VGG whose dense head has a 2x2 score map at Q=64, with confident outputs."""
    model = vgg_flax.VGG(config=(8, "M", 16, "M", 16, "M"), fc_width=16, num_classes=CLASSES)
    variables = model.init(jax.random.key(0), jnp.zeros((1, S, S, 3)))
    params = dict(variables["params"])
    for i, (name, gain) in enumerate([("fc1", 2.0), ("fc2", 2.0), ("fc3", 40.0)]):
        fan_in, width = params[name]["kernel"].shape
        kernel = jax.random.normal(jax.random.key(i), (fan_in, width)) * np.sqrt(gain / fan_in)
        params[name] = {"kernel": kernel, "bias": params[name]["bias"]}
    return model, {"params": params}


def _files(root):
    return sorted((str(p), int(p.parent.name[1:])) for p in (root / "val").glob("*/*.png"))


def _direct(model, variables, root):
    """Posteriors computed image by image with numpy crops: {protocol: float[N, C]}, labels."""
    norm = get_preset("symmetric")
    dense = model.clone(head="dense")
    apply = {net: jax.jit(lambda v, x, net=net: jax.nn.softmax(net.apply(v, x))) for net in (model, dense)}
    softmax = lambda net, xs: np.asarray(apply[net](variables, np.stack(xs)))
    out = {"center": [], "dense": [], "multicrop": [], "dense_whole": []}
    labels = []
    for path, label in _files(root):
        x = norm(np.asarray(Image.open(path).convert("RGB"), np.float32))
        h, w = x.shape[:2]
        crop = lambda top, left, size, x=x: x[top:top + size, left:left + size]
        out["center"].append(softmax(model, [crop(round((h - S) / 2), round((w - S) / 2), S)])[0])
        square = crop(round((h - Q) / 2), round((w - Q) / 2), Q)
        out["dense"].append(softmax(dense, [square, square[:, ::-1]]).mean(0))
        out["dense_whole"].append(softmax(dense, [x, x[:, ::-1]]).mean(0))
        crops = [crop(round(i * (h - S) / 4), round(j * (w - S) / 4), S) for i in range(5) for j in range(5)]
        out["multicrop"].append(softmax(model, crops + [c[:, ::-1] for c in crops]).mean(0))
        labels.append(label)
    return {k: np.stack(v) for k, v in out.items()}, np.asarray(labels)


def test_each_protocol_equals_a_direct_computation(tiny, image_folder):
    model, variables = tiny
    assert model.clone(head="dense").apply(variables, jnp.zeros((1, Q, Q, 3)),
                                           taps=("score_map",))[1]["score_map"].shape[1:3] == (2, 2)
    direct, labels = _direct(model, variables, image_folder)
    for protocol in ("center", "dense", "multicrop"):
        probs, got_labels = evaluation.posteriors(
            model, variables, f"folder:{image_folder}", "val", protocol=protocol, scale=Q, image_size=S,
            batch_size=3, normalization="symmetric")
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_allclose(probs, direct[protocol], atol=2e-5, err_msg=protocol)
    whole, _ = evaluation.posteriors(model, variables, f"folder:{image_folder}", "val", protocol="dense",
                                     scale=Q, image_size=S, batch_size=3, normalization="symmetric",
                                     dense_images="whole")
    np.testing.assert_allclose(whole, direct["dense_whole"], atol=2e-5)
    assert not np.allclose(whole, direct["dense"], atol=1e-3)  # Non-square images: a different input.
    assert direct["dense"].max() > 0.3  # 3x uniform: confident enough that a wrong average would show.
    assert not np.allclose(direct["dense"], direct["multicrop"], atol=1e-2)


def test_evaluate_combines_protocols_and_counts_every_example_once(tiny, image_folder):
    model, variables = tiny
    direct, labels = _direct(model, variables, image_folder)
    direct["dense+multicrop"] = (direct["dense"] + direct["multicrop"]) / 2
    results = evaluation.evaluate(model, variables, f"folder:{image_folder}", "val", image_size=S,
                                  protocols=[*evaluation.PROTOCOLS, "dense+multicrop"], scales=[Q],
                                  batch_size=2,
                                  normalization="symmetric")
    for protocol, r in results.items():
        assert r["count"] == len(SIZES) == 7  # 7 images, batches of 2.
        assert r["top1"] == pytest.approx(np.mean(direct[protocol].argmax(-1) == labels)), protocol
        top5 = np.argsort(-direct[protocol], axis=-1)[:, :5]
        assert r["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1))), protocol


def test_a_new_protocol_is_one_row_and_an_unknown_one_lists_the_rows(tiny, image_folder, monkeypatch):
    """A toy row (the center crop and its mirror image) through evaluate, against the direct average."""
    model, variables = tiny
    flip = evaluation.Protocol("center", lambda m: m, lambda x: jnp.stack([x, x[:, :, ::-1]], axis=1))
    monkeypatch.setitem(evaluation.PROTOCOLS, "center_flip", flip)
    name, kw = f"folder:{image_folder}", dict(scale=Q, image_size=S, batch_size=3, normalization="symmetric")
    center, _ = evaluation.posteriors(model, variables, name, "val", protocol="center", **kw)
    flipped, _ = evaluation.posteriors(model, variables, name, "val", protocol="center_flip", **kw)
    direct, _ = _direct(model, variables, image_folder)
    np.testing.assert_allclose(center, direct["center"], atol=2e-5)
    assert not np.allclose(flipped, center, atol=1e-3)
    valid = "\\['center', 'center_flip', 'dense', 'multicrop'\\]"
    with pytest.raises(KeyError, match="'dense\\+tiles'.*" + valid):
        evaluation.evaluate(model, variables, name, "val", protocols=["dense+tiles"])


def test_multi_scale_averages_the_single_scale_posteriors(tiny, image_folder):
    model, variables = tiny
    kw = dict(image_size=S, batch_size=4, normalization="symmetric")
    name = f"folder:{image_folder}"
    per_scale = [evaluation.posteriors(model, variables, name, "val", protocol="dense", scale=q, **kw)[0]
                 for q in (Q, 80)]
    expected = evaluation.metrics(np.mean(per_scale, axis=0), _direct(model, variables, image_folder)[1])
    results = evaluation.evaluate(model, variables, name, "val", protocols=["dense"], scales=[Q, 80], **kw)
    assert results["dense"] == {**expected, "scales": [Q, 80]}
    assert not np.allclose(per_scale[0], per_scale[1], atol=1e-3)


def test_topk_counts_against_hand_examples():
    probs = np.asarray([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    labels = np.asarray([1, 2, 0])
    assert evaluation.topk_correct(probs, labels, 1) == 1
    assert evaluation.topk_correct(probs, labels, 2) == 2
    assert evaluation.topk_correct(probs, labels, 5) == 3
    loss = -np.log([0.7, 0.2, 0.2]).mean()  # the posterior of each label
    assert evaluation.metrics(probs, labels) == {"top1": 1 / 3, "top5": 1.0, "loss": pytest.approx(loss),
                                                 "count": 3}


def test_digits_test_split_is_counted_exactly(tmp_path):
    model = vgg_flax.VGG(config=(8, "M", 8, "M"), head="small", small_head_width=0, num_classes=10)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    results = evaluation.evaluate(model, variables, "sklearn_digits", "test", image_size=32,
                                  protocols=["center", "dense"], batch_size=64,
                                  data_dir=str(tmp_path), normalization="symmetric")
    assert results["center"]["count"] == results["dense"]["count"] == 359  # 64 does not divide 359.
    assert results["center"]["scales"] == [32]  # Fixed-size images: no rescaling by default.
    assert 0.0 <= results["center"]["top1"] <= results["center"]["top5"] <= 1.0


def test_cli_eval_prints_and_saves_the_table(tiny, image_folder, tmp_path, capsys):
    from vgg_flax import cli
    from vgg_flax.convert.format import save_pretrained

    model, variables = tiny
    weights = tmp_path / "tiny.safetensors"
    save_pretrained(weights, model, variables, preprocessing="symmetric",
                    classes=[f"k{i}" for i in range(CLASSES)])
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--weights", str(weights), "--dataset", f"folder:{image_folder}",
                     "--split", "val", "--image-size", str(S), "--scales", str(Q),
                     "--protocols", "center,dense+multicrop", "--batch-size", "3", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dense+multicrop" in printed and "protocol" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["center"]["count"] == 7 and saved["normalization"] == "symmetric"
    direct, labels = _direct(model, variables, image_folder)
    assert saved["results"]["center"]["top1"] == pytest.approx(np.mean(direct["center"].argmax(-1) == labels))


def test_cli_eval_reads_a_training_workdir(tmp_path, capsys):
    """`vgg-flax eval --workdir` takes the model, dataset, split and preset from a real (2-step) run."""
    import importlib.util

    from vgg_flax import cli
    from vgg_flax.train import loop as training

    spec = importlib.util.spec_from_file_location(
        "default_config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.config = "8,M,8,M"
    config.model.small_head_width = 0
    config.data.data_dir = str(tmp_path / "tfds")
    config.num_train_steps = config.eval.every_steps = config.checkpoints.every_steps = 2
    config.log.tensorboard, config.log.progress, config.checkpoints.async_save = False, "none", False
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(config, workdir)
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--workdir", workdir, "--protocols", "center,dense",
                     "--batch-size", "100", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    run = (saved["dataset"], saved["split"], saved["normalization"])
    assert run == ("sklearn_digits", "test", "symmetric")
    assert saved["results"]["center"]["count"] == saved["results"]["dense"]["count"] == 359
    assert "center" in capsys.readouterr().out


_MULTI_DEVICE_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import flax.serialization, jax, numpy as np
import vgg_flax
from vgg_flax import evaluation
assert jax.device_count() == 4
model = vgg_flax.VGG(config=(8, "M", 16, "M", 16, "M"), fc_width=16, num_classes=10)
with open(sys.argv[1], "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
out = {}
for protocol in ("dense", "multicrop"):
    out[protocol], out["labels"] = evaluation.posteriors(
        model, variables, sys.argv[2], "val", protocol=protocol, scale=64, image_size=32, batch_size=4,
        normalization="symmetric")
# Chunked, 2 images per device: dense one view at a time (2 strided image chunks per device),
# multi-crop 2 images x 3 of 50 crops per chunk (17 chunks, the last overlapping).
for protocol, max_views in (("dense", 1), ("multicrop", 7)):
    out[protocol + "_chunked"], _ = evaluation.posteriors(
        model, variables, sys.argv[2], "val", protocol=protocol, scale=64, image_size=32, batch_size=8,
        normalization="symmetric", max_views=max_views)
np.savez(sys.argv[3], **out)
"""


def test_multi_device_evaluation_equals_single_device(tiny, image_folder, tmp_path):
    import subprocess
    import sys

    import flax.serialization

    model, variables = tiny
    assert model.config == (8, "M", 16, "M", 16, "M") and model.fc_width == 16  # As in the script.
    (tmp_path / "v.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables)))
    subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(tmp_path / "v.msgpack"),
                    f"folder:{image_folder}", str(tmp_path / "out.npz")], check=True)
    sharded = np.load(tmp_path / "out.npz")
    direct, labels = _direct(model, variables, image_folder)
    np.testing.assert_array_equal(sharded["labels"], labels)  # 7 images: 2 batches of 4, one padded.
    for protocol in ("dense", "multicrop"):
        np.testing.assert_allclose(sharded[protocol], direct[protocol], atol=2e-5, err_msg=protocol)
        np.testing.assert_allclose(sharded[protocol + "_chunked"], direct[protocol], atol=2e-5,
                                   err_msg=protocol)


_TWO_PROCESS_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[4], num_processes=2, process_id=int(sys.argv[5]))
import flax.serialization
import vgg_flax
from vgg_flax import evaluation
assert jax.process_count() == 2
model = vgg_flax.VGG(config=(8, "M", 16, "M", 16, "M"), fc_width=16, num_classes=10)
with open(sys.argv[1], "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
results = evaluation.evaluate(model, variables, sys.argv[2], "val", image_size=32, scales=[64],
                              protocols=[*evaluation.PROTOCOLS, "dense+multicrop"], batch_size=2,
                              normalization="symmetric")
with open(sys.argv[3] + str(jax.process_index()), "w") as f:
    json.dump(results, f)
"""


def test_two_process_evaluation_sums_every_example_once(tiny, image_folder, tmp_path):
    """jax.distributed on localhost: shares of 4 and 3 images, metrics summed over both processes."""
    import socket
    import subprocess
    import sys

    import flax.serialization

    model, variables = tiny
    (tmp_path / "v.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables)))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(tmp_path / "v.msgpack"),
                               f"folder:{image_folder}", str(tmp_path / "out"), address, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    single = evaluation.evaluate(model, variables, f"folder:{image_folder}", "val", image_size=S,
                                 scales=[Q], protocols=[*evaluation.PROTOCOLS, "dense+multicrop"],
                                 batch_size=2,
                                 normalization="symmetric")
    for i in range(2):
        got = json.loads((tmp_path / f"out{i}").read_text())
        for protocol, r in got.items():  # counts exact; the loss is a float sum gathered as float32
            assert r.pop("loss") == pytest.approx(single[protocol]["loss"], rel=1e-6)
            assert r == {k: v for k, v in single[protocol].items() if k != "loss"}, protocol
    assert single["dense"]["count"] == 7


def test_chunk_plan_stays_within_the_budget():
    """Every chunk fits max_pixels (or is one view of one image); the chunks cover every view."""
    for images in (1, 2, 3, 4, 6, 32):
        for views in (1, 2, 18, 50):
            for budget in (1, 2, 3, 7, 8, 49, 50, 51, 256):
                per_chunk, per_image = evaluation._chunk_plan(images, views, 10, budget * 10)
                assert images % per_chunk == 0 and 1 <= per_image <= views
                assert per_chunk * per_image <= max(budget, 1)
                steps = -(-views // per_image)
                assert (steps - 1) * per_image < views  # no chunk that only repeats views
    assert evaluation._chunk_plan(32, 50, 224 * 224, None) == (32, 50)
    assert evaluation._chunk_plan(32, 50, 224 * 224, 256 * 224 * 224) == (32, 8)  # 7 chunks, last overlaps
    assert evaluation._chunk_plan(3, 2, 64 * 64, 1 * 32 * 32) == (1, 1)  # a dense view over budget


@pytest.mark.parametrize("max_views", [1, 2, 3, 7, 49, 50, 51])
def test_chunked_posteriors_equal_unchunked(tiny, image_folder, max_views):
    """Views in chunks of max_views (dividing the 50 crops or not, splitting the batch or not) give
    the same posteriors as all views in one call, for every protocol."""
    model, variables = tiny
    kw = dict(scale=Q, image_size=S, batch_size=3, normalization="symmetric")
    name = f"folder:{image_folder}"
    for protocol in ("center", "dense", "multicrop"):
        whole, labels = evaluation.posteriors(model, variables, name, "val", protocol=protocol,
                                              max_views=None, **kw)
        chunked, chunked_labels = evaluation.posteriors(model, variables, name, "val", protocol=protocol,
                                                        max_views=max_views, **kw)
        np.testing.assert_array_equal(chunked_labels, labels)
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6, err_msg=protocol)


def test_chunked_program_bounds_the_views_per_call(tiny):
    """The compiled program runs the network on at most max_views crops at a time: beyond one copy of
    the views, its temporaries are a fraction of one conv output over all crops, which the unchunked
    program's exceed."""
    model, variables = tiny
    x = jnp.zeros((4, 50, S, S, 3))

    def temp_bytes(max_views):
        fn = evaluation.posterior_fn(model, "multicrop",
                                     max_pixels=None if max_views is None else max_views * S * S)
        return fn.lower(variables, x).compile().memory_analysis().temp_size_in_bytes

    unbounded, bounded = temp_bytes(None), temp_bytes(8)
    first_conv_out = 4 * 50 * S * S * 8 * 4  # bytes of conv1_1's output for all 200 crops
    assert unbounded >= first_conv_out
    assert bounded - x.nbytes < first_conv_out / 8  # 8 of 200 crops at a time


def test_max_views_must_be_positive(tiny, image_folder):
    model, variables = tiny
    with pytest.raises(ValueError, match="max_views must be at least 1"):
        evaluation.posteriors(model, variables, f"folder:{image_folder}", "val", protocol="center",
                              scale=Q, image_size=S, batch_size=3, normalization="symmetric", max_views=0)


def test_the_views_per_call_come_from_the_memory_budget(tiny, monkeypatch):
    """Two activations of the widest conv per view, in the model's dtype: VGG11's conv1_1 at 224 px
    (64 channels) in fp32 is 25.7 MB, so an 8 GiB device's eighth holds 41 views; bf16 holds 83."""
    vgg11 = vgg_flax.vgg11()
    assert evaluation.activation_bytes(vgg11, 224 * 224) == 2 * 224 * 224 * 64 * 4
    assert evaluation.views_per_call(vgg11, 224, memory=8 * 2**30) == 41
    assert evaluation.views_per_call(vgg11.clone(dtype=jnp.bfloat16), 224, memory=8 * 2**30) == 83
    model, _ = tiny  # (8, M, 16, M, 16, M): conv1_1's 8 channels at full size are the widest
    assert evaluation.activation_bytes(model, S * S) == 2 * S * S * 8 * 4
    monkeypatch.setattr(evaluation, "device_memory", lambda: 8 * 2 * S * S * 8 * 4 * 7)
    assert evaluation.Evaluator(model, image_size=S).max_views == 7
    assert evaluation.Evaluator(model, image_size=S, max_views=None).max_views is None
