"""The shipped configs against the paper's recipe, written here by hand (not read from the configs).

Simonyan & Zisserman, Sec. 3.1 and Table 3: SGD with momentum 0.9, batch 256, weight decay 5e-4,
dropout 0.5 on the first two FC layers, learning rate 1e-2 divided by 10 when the validation accuracy
stops improving (3 times in all), 370K iterations; 224 crops of the image rescaled to a short side S:
nets A, A-LRN and B were trained at S = 256 only, C, D and E also with scale jitter S in [256, 512]
(their best single nets, which the configs use). Net A from N(0, 1e-2).
"""

import jax.numpy as jnp
import pytest
import train_harness

from vgg_flax.train import checkpoints, optim
from vgg_flax.train import loop as training

# config file: (paper letter, scale range (S_min, S_max), weight init)
PAPER = {
    "vgg11": ("A", (256, 256), "paper"),
    "vgg11_lrn": ("A-LRN", (256, 256), "paper"),
    "vgg13": ("B", (256, 256), "torchvision"),
    "vgg16_c": ("C", (256, 512), "torchvision"),
    "vgg16": ("D", (256, 512), "torchvision"),
    "vgg19": ("E", (256, 512), "torchvision"),
    "imagenet_vgg16": ("D", (256, 512), "torchvision"),
}


def _config(name):
    return train_harness.load_config_module(name).get_config()


class _Recording:
    """`dataset_info` / `create_dataset` that record what the training program asks for."""

    def __init__(self):
        self.calls = []

    def dataset_info(self, name, data_dir=None):
        return type("Info", (), {"num_classes": 1000, "num_examples": lambda self, split: 1000})()

    def create_dataset(self, name, split, **kw):
        self.calls.append((name, split, kw))
        return iter(())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_have_the_paper_s_values(name):
    letter, scale_range, init = PAPER[name]
    c = _config(name)
    assert c.model.config == letter
    assert (c.model.batch_norm, c.model.head, c.model.dropout_rate, c.model.weight_init) == \
        (False, "torchvision", 0.5, init)
    assert c.model.dtype == "bfloat16"  # not the paper's (float32 on GPUs in 2014): accelerators' dtype
    assert (c.data.dataset, c.data.image_size, c.data.augment, tuple(c.data.scale_range)) == \
        ("imagenet2012", 224, "paper", scale_range)
    assert (c.optim.name, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == \
        ("sgd", 0.9, False, 5e-4)
    assert (c.optim.grad_clip_norm, c.optim.freeze_features) == (0.0, False)
    assert (c.global_batch_size, c.num_train_steps) == (256, 370_000)
    s = c.schedule
    assert (s.name, s.learning_rate, s.warmup_steps, s.factor, s.max_reductions) == \
        ("plateau", 1e-2, 0, 0.1, 3)
    assert (c.warm_start_from, c.pretrained, c.reset_head) == ("", "", False)


@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
def test_paper_recipe_reaches_the_model_the_data_and_the_plateau_rule(name):
    """What the training program builds from the config, not only the keys: the model, the scale
    jitter passed to the input pipeline, and a plateau rule dividing by 10 three times, then never."""
    letter, scale_range, _ = PAPER[name]
    c = _config(name)
    model = checkpoints.model_from_config(c.model.to_dict(), num_classes=1000)
    assert (model.config, model.dropout_rate, model.dtype, model.head) == \
        (letter, 0.5, jnp.bfloat16, "torchvision")
    recording = _Recording()
    data = training.make_data(recording, seed=0, **c.data)
    data.train_batches(c.global_batch_size, start_step=0)
    (_, split, kw), = recording.calls
    assert split == "train" and kw["augment"] == "paper" and kw["scale_range"] == scale_range
    assert kw["batch_size"] == 256 and kw["image_size"] == 224
    _, plateau = training.build_optimizer(c)
    scales = []
    for _ in range(12):  # the validation accuracy never improves again after the first evaluation
        plateau.update(0.5)
        scales.append(plateau.scale)
    assert scales[-1] == pytest.approx(1e-3) and plateau.reductions == 3
    assert sorted(set(scales), reverse=True) == pytest.approx([1.0, 0.1, 0.01, 0.001])


def test_finetune_and_default_recipes():
    f = _config("finetune")
    assert (f.model.config, f.model.batch_norm, f.model.head, f.model.dropout_rate) == \
        ("D", False, "torchvision", 0.5)  # torchvision's vgg16 weights: config D, no BatchNorm
    assert (f.reset_head, f.optim.freeze_features, f.pretrained) == (True, True, "")
    assert (f.data.image_size, f.data.normalization, f.model.dtype) == (224, "torchvision", "float32")
    assert (f.schedule.name, f.schedule.learning_rate, f.optim.weight_decay) == ("cosine", 1e-3, 1e-4)
    d = _config("default")
    assert (d.data.dataset, d.data.image_size, tuple(d.data.scale_range)) == ("sklearn_digits", 32, (0, 0))
    assert (d.model.head, d.model.batch_norm, d.model.dtype, d.model.dropout_rate) == \
        ("small", True, "float32", 0.2)
    assert (d.optim.name, d.optim.momentum, d.optim.nesterov, d.optim.weight_decay) == \
        ("sgd", 0.9, False, 5e-4)
    assert (d.schedule.name, d.schedule.factor, d.schedule.max_reductions) == ("cosine", 0.1, 3)
    assert optim.Plateau().max_reductions == 3 and optim.Plateau().factor == 0.1
