"""The converter engine knows sources only through `LAYOUTS`: a new weight source is one `Layout` row.

A toy source ("toy.{layer}.w" / ".b" keys in Flax's own tensor layouts, the architecture read from
the conv names) is added with nothing else edited, and must load through every public entry point
(`load_weights`, `from_pretrained`, `vgg-flax convert`) to the exact variables it was made from.
"""

import re

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import vgg_flax
from vgg_flax import cli
from vgg_flax.convert import engine
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.rules import Architecture, Layout, Rule

CONFIG = [8, "M", 16, 16, "M"]
_CONV_KEY = re.compile(r"^toy\.conv(\d+)_(\d+)\.w$")
_HEAD = ("fc1", "fc2", "fc3")


def _toy_infer(state, **model_kwargs):
    blocks: dict[int, dict[int, int]] = {}
    for key, value in state.items():
        if m := _CONV_KEY.match(key):
            blocks.setdefault(int(m[1]), {})[int(m[2])] = value.shape[-1]
    config = [w for b in sorted(blocks) for w in [*(blocks[b][k] for k in sorted(blocks[b])), "M"]]
    fc3 = state.get("toy.fc3.w")
    return Architecture(config=model_kwargs.get("config", config), batch_norm=False,
                        num_classes=fc3.shape[1] if fc3 is not None else 0,
                        fc_width=state["toy.fc2.w"].shape[0] if fc3 is not None else 0,
                        layout="toy", has_classifier=fc3 is not None)


def _toy_rules(arch, with_classifier):
    rules, channels = [], 3
    for name, width in vgg_flax.models.layer_names(arch.config):
        if vgg_flax.models.is_conv_layer(name):
            rules += [Rule(f"toy.{name}.w", ("params", name, "kernel"), (3, 3, channels, width), "copy"),
                      Rule(f"toy.{name}.b", ("params", name, "bias"), (width,), "copy")]
            channels = width
    if with_classifier:
        ins = (7 * 7 * channels, arch.fc_width, arch.fc_width)
        outs = (arch.fc_width, arch.fc_width, arch.num_classes)
        for layer, n_in, n_out in zip(_HEAD, ins, outs, strict=True):
            rules += [Rule(f"toy.{layer}.w", ("params", layer, "kernel"), (n_in, n_out), "copy"),
                      Rule(f"toy.{layer}.b", ("params", layer, "bias"), (n_out,), "copy")]
    return rules, []


TOY = Layout(name="toy", detect=lambda state: any(k.startswith("toy.") for k in state),
             infer=_toy_infer, rules=_toy_rules, classifier_key="toy.fc3.w", preprocessing="caffe")


@pytest.fixture
def toy_layout(monkeypatch):
    monkeypatch.setitem(engine.LAYOUTS, "toy", TOY)


@pytest.fixture(scope="module")
def reference():
    model = vgg_flax.VGG(config=CONFIG, fc_width=32, num_classes=5)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    state = {f"toy.{layer}.{'w' if kind == 'kernel' else 'b'}": np.asarray(v)
             for layer, p in variables["params"].items() for kind, v in p.items()}
    return model, jax.tree.map(np.asarray, variables), state


def _same(got, expected):
    flat_got, flat_expected = (jax.tree_util.tree_flatten_with_path(v)[0] for v in (got, expected))
    assert [p for p, _ in flat_got] == [p for p, _ in flat_expected]
    for (path, a), (_, b) in zip(flat_got, flat_expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


def test_a_new_weight_source_is_one_layout_row(toy_layout, reference, tmp_path):
    model, variables, state = reference
    loaded_model, loaded = vgg_flax.load_weights(dict(state))
    assert (list(loaded_model.config), loaded_model.fc_width, loaded_model.num_classes) == (CONFIG, 32, 5)
    _same(loaded, variables)

    save_file(state, tmp_path / "toy.safetensors")
    assert cli.main(["convert", str(tmp_path / "toy.safetensors"), str(tmp_path / "out.safetensors")]) == 0
    got_model, got, meta = vgg_flax.from_pretrained(tmp_path / "out.safetensors", return_metadata=True)
    assert meta["preprocessing"] == "caffe"  # the layout's preset, carried in the converted file
    _same(got, variables)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(got_model.apply(got, images), model.apply(variables, images))


def test_the_new_layout_is_listed_and_checked_like_the_others(toy_layout, reference):
    _, _, state = reference
    bad = {**state, "toy.conv2_1.b": np.zeros(15, np.float32)}
    with pytest.raises(ConversionError,
                       match=r"key 'toy\.conv2_1\.b': expected shape \(16,\), found \(15,\)"):
        vgg_flax.load_weights(bad, layout="toy")
    with pytest.raises(KeyError, match=r"unknown weights layout 'slim'; valid layouts: \[.*'toy'"):
        engine.get_layout("slim")
