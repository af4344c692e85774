"""The model's config pair (`VGG.to_config` / `VGG.from_config`), the layer-name contract, the heads'
declared facts and the builders' table."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax import models
from vgg_flax.convert import to_torchvision
from vgg_flax.convert.errors import ConversionError
from vgg_flax.models import VGG

TINY = (8, "M", 8, "LRN", "M", (8, 1), 8, "M", 8, "M", 16, "M")
NON_DEFAULT = dict(num_classes=7, dropout_rate=0.25, fc_width=16, small_head_width=5,
                   weight_init="paper")


def _json_round_trip(model):
    return VGG.from_config(json.loads(json.dumps(model.to_config())))


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("head", models.HEADS)
def test_round_trip_every_builder_and_head(name, head):
    model = models.get_model(name, head=head, **NON_DEFAULT)
    again = _json_round_trip(model)
    assert again == model
    assert again.to_config() == model.to_config()
    assert set(model.to_config()) == set(models.CONFIG_FIELDS)


@pytest.mark.parametrize("head", models.HEADS)
def test_round_trip_custom_list_keeps_the_parameters(head):
    model = VGG(config=list(TINY), batch_norm=True, head=head, **NON_DEFAULT)
    cfg = model.to_config()
    assert cfg["config"] == [8, "M", 8, "LRN", "M", [8, 1], 8, "M", 8, "M", 16, "M"]
    again = _json_round_trip(model)
    assert again.config == TINY and again.batch_norm and again.head == head
    shapes = [jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))) for m in (model, again)]
    assert jax.tree_util.tree_map(np.shape, shapes[0]) == jax.tree_util.tree_map(np.shape, shapes[1])


def test_from_config_reads_old_pretrained_metadata_and_training_sections():
    # What save_pretrained wrote before to_config existed: no weight_init, the config as lists.
    old = {"config": [64, [64, 1], "M"], "batch_norm": True, "head": "none", "num_classes": 1000,
           "dropout_rate": 0.5, "fc_width": 4096, "small_head_width": 512}
    model = VGG.from_config(old)
    assert model.config == (64, (64, 1), "M") and model.weight_init == "torchvision"
    # A training config's model section: a comma string; dtype as a name.
    section = {"config": "16,M,32x1,lrn,M", "batch_norm": False, "head": "small"}
    model = VGG.from_config(section, num_classes=3, dtype="bfloat16")
    assert model.config == (16, "M", (32, 1), "LRN", "M") and model.dtype == jnp.bfloat16
    assert VGG.from_config({"config": "vgg16"}).config == "vgg16"
    assert VGG.from_config({}, head="dense") == VGG(head="dense")


def test_from_config_errors_name_what_is_wrong():
    with pytest.raises(KeyError, match=r"unknown VGG fields \['widht'\]"):
        VGG.from_config({"config": "A", "widht": 3})
    with pytest.raises(ValueError, match="bad model.config entry 'Q'"):
        VGG.from_config({"config": "8,Q"})
    with pytest.raises(ValueError, match=r"bad model.config entry 'F'.*\['A', 'A-LRN'"):
        VGG.from_config({"config": "F"})
    with pytest.raises(KeyError, match="unknown VGG config 'F'"):
        models.resolve_config("F")


def test_layer_name_contract():
    assert models.bn_name("conv3_2") == "bn3_2" and models.bn_name("conv12_10") == "bn12_10"
    assert models.relu_name("conv1_1") == "relu1_1"
    assert models.stage_name("pool5") == "stage5"
    for bad, fn in (("pool3", models.bn_name), ("fc1", models.relu_name), ("conv1_1", models.stage_name),
                    ("convx_1", models.bn_name)):
        with pytest.raises(ValueError, match=repr(bad)):
            fn(bad)
    for name in ("conv1_1", "bn5_3", "relu2_2", "lrn1", "pool4", "stage3"):
        assert models.is_feature_layer(name), name
    for name in ("fc1", "fc3", "head_hidden", "head_out", "pre_logits", "score_map", "conv1", "bn"):
        assert not models.is_feature_layer(name), name
    assert models.is_conv_layer("conv2_1") and not models.is_conv_layer("bn2_1")
    assert models.is_pool_layer("pool1") and not models.is_pool_layer("pool")


def test_the_contract_names_the_model_s_own_layers():
    model = VGG(config=TINY, batch_norm=True, head="none")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    convs = [n for n, _ in models.layer_names(TINY) if models.is_conv_layer(n)]
    assert set(variables["params"]) == set(convs) | {models.bn_name(n) for n in convs}
    assert set(variables["batch_stats"]) == {models.bn_name(n) for n in convs}
    taps = model.tap_names()
    assert [models.relu_name(n) for n in convs] == [t for t in taps if t.startswith("relu")]
    assert all(models.is_feature_layer(t) for t in taps)
    assert models.stage_name("pool5") in taps and "pool5" in models.PYRAMID_TAPS
    # Layers after the last pool form a block of their own.
    open_end = VGG(config=(8, "M", 16, (16, 1)), head="none")
    out = jax.eval_shape(open_end.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert set(out["params"]) == {"conv1_1", "conv2_1", "conv2_2"}
    assert [len(s) for s in models.configs.stages((8, "M", 16, (16, 1)))] == [2, 2]


@pytest.mark.parametrize("head", models.HEADS)
def test_heads_declare_what_they_build(head):
    spec = models.get_head(head)
    model = VGG(config=TINY, batch_norm=True, head=head, num_classes=7, fc_width=16,
                small_head_width=5)
    size = spec.trace_size
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    params = variables["params"]
    assert [n for n in params if not models.is_feature_layer(n)] == list(spec.layers)
    assert models.classifier_layer(head) == spec.classifier == models.classifier_in(params)
    if spec.classifier is not None:
        assert params[spec.classifier]["bias"].shape == (7,)
        assert spec.classifier in models.CLASSIFIER_LAYERS
    assert model.tap_names()[len(model.tap_names()) - len(spec.taps):] == list(spec.taps)
    assert all(not models.is_feature_layer(t) for t in spec.taps)


@pytest.mark.parametrize("head", models.HEADS)
def test_heads_torchvision_layout_is_what_the_converter_exports(head):
    model = VGG(config=TINY, head=head, num_classes=7, fc_width=16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    if models.get_head(head).torchvision_layout:
        state = to_torchvision(model, variables)
        assert ("classifier.6.weight" in state) == (models.classifier_layer(head) is not None)
    else:
        with pytest.raises(ConversionError):
            to_torchvision(model, variables)


def test_trace_sizes():
    assert {h: s.trace_size for h, s in models.HEAD_SPECS.items()} == {
        "torchvision": 224, "dense": 224, "none": 32, "small": 32}
    assert models.CLASSIFIER_LAYERS == ("fc3", "head_out")
    with pytest.raises(KeyError, match="unknown head 'tiny'"):
        models.get_head("tiny")


def test_builders_come_from_the_one_table():
    assert list(models.MODELS) == list(models.VARIANTS)
    for name, fields in models.VARIANTS.items():
        builder = models.MODELS[name]
        assert builder.func is VGG and builder.keywords == fields
        assert getattr(models, name) is builder
        assert models.get_model(name).to_config()["config"] == fields["config"]
    assert models.vgg16_bn().batch_norm and not models.vgg16().batch_norm


def test_load_pretrained_reads_a_file_written_before_to_config(tmp_path):
    from safetensors.numpy import save_file

    from vgg_flax.convert import format as weights

    model = VGG(config=TINY, batch_norm=True, head="small", num_classes=3, small_head_width=0)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    old = {"config": [list(e) if isinstance(e, tuple) else e for e in TINY], "batch_norm": True,
           "head": "small", "num_classes": 3, "dropout_rate": 0.5, "fc_width": 4096,
           "small_head_width": 0}
    flat = {k: np.asarray(v) for k, v in weights.flatten_variables(variables).items()}
    path = str(tmp_path / "old.safetensors")
    save_file(flat, path, metadata={"format": weights.FORMAT, "model": json.dumps(old),
                                    "preprocessing": "torchvision", "classes": "null", "source": "",
                                    "source_sha256": ""})
    loaded, loaded_vars = weights.load_pretrained(path)
    assert loaded == model
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    np.testing.assert_array_equal(loaded.apply(loaded_vars, x), model.apply(variables, x))


def test_architecture_strings():
    assert models.parse_config("vgg16") == "vgg16"
    assert models.parse_config("8,LRN,M,16x1,m") == (8, "LRN", "M", (16, 1), "M")
    with pytest.raises(ValueError, match="bad model.config entry 'Q'"):
        models.parse_config("8,Q")


def test_every_builder_name_comes_from_variants():
    """vgg_flax, vgg_flax.models and vgg_flax.nnx export one builder per VARIANTS row, no other."""
    import vgg_flax
    from vgg_flax import nnx

    names = set(models.VARIANTS)
    for module in (vgg_flax, models, nnx):
        assert {n for n in module.__all__ if n.startswith("vgg")} == names, module.__name__
        for name, fields in models.VARIANTS.items():
            builder = getattr(module, name)
            assert builder.keywords == fields if module is not nnx else builder.args == (name,)
