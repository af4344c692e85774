"""Our registry table holds torchvision's published facts (its weights enums) exactly."""

import math

import pytest

import vgg_flax
from vgg_flax import preprocessing
from vgg_flax.convert import registry

tv_vgg = pytest.importorskip("torchvision.models.vgg")

ENUMS = {"vgg11": ("VGG11_Weights", "IMAGENET1K_V1"), "vgg11_bn": ("VGG11_BN_Weights", "IMAGENET1K_V1"),
         "vgg13": ("VGG13_Weights", "IMAGENET1K_V1"), "vgg13_bn": ("VGG13_BN_Weights", "IMAGENET1K_V1"),
         "vgg16": ("VGG16_Weights", "IMAGENET1K_V1"),
         "vgg16.features": ("VGG16_Weights", "IMAGENET1K_FEATURES"),
         "vgg16_bn": ("VGG16_BN_Weights", "IMAGENET1K_V1"), "vgg19": ("VGG19_Weights", "IMAGENET1K_V1"),
         "vgg19_bn": ("VGG19_BN_Weights", "IMAGENET1K_V1")}


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("name", ENUMS)
def test_entry_equals_torchvision_enum(name):
    cls, member = ENUMS[name]
    weights = getattr(getattr(tv_vgg, cls), member)
    entry = registry.get(name)
    meta = weights.meta
    assert entry.url == weights.url
    assert entry.params == meta["num_params"]
    metrics = meta["_metrics"]["ImageNet-1K"]
    assert _same(entry.acc1, metrics["acc@1"]) and _same(entry.acc5, metrics["acc@5"])
    assert entry.gmacs == meta["_ops"] and entry.file_size_mb == meta["_file_size"]
    transform = weights.transforms()
    norm = preprocessing.get_preset(entry.preprocessing)
    assert (norm.mean, norm.std) == (tuple(transform.mean), tuple(transform.std))
    assert (norm.resize, norm.crop) == (transform.resize_size[0], transform.crop_size[0])
    assert entry.features_only == (meta["categories"] is None)
    assert vgg_flax.MODELS[entry.builder] is not None


def test_every_torchvision_vgg_weight_is_in_the_table():
    urls = {w.url for cls, _ in ENUMS.values() for w in getattr(tv_vgg, cls)}
    assert urls == {e.url for e in registry.REGISTRY.values()}


def test_names_aliases_and_unknown_names():
    assert registry.get("vgg16.tv_in1k") is registry.get("vgg16")
    with pytest.raises(KeyError, match="no pretrained weights named 'vgg17'.*'vgg16.tv_in1k'"):
        registry.get("vgg17")
    rows = vgg_flax.list_pretrained()
    assert [r["name"] for r in rows] == list(registry.REGISTRY)
    assert rows[0]["hub"] == "hf-hub:timm/vgg11.tv_in1k"
