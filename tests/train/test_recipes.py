"""The shipped configs against the paper's recipe, written here by hand (not read from the configs).

Simonyan & Zisserman, Sec. 3.1 and Table 3: SGD with momentum 0.9, batch 256, weight decay 5e-4,
dropout 0.5 on the first two FC layers, learning rate 1e-2 divided by 10 when the validation accuracy
stops improving (3 times in all), 370K iterations; 224 crops of the image rescaled to a short side S:
nets A, A-LRN and B were trained at S = 256 only, C, D and E also with scale jitter S in [256, 512]
(their best single nets, which the configs use). Net A from N(0, 1e-2).
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
import train_harness

import vgg_flax
from vgg_flax.train import loop as training
from vgg_flax.train import optim, programs

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
    assert (c.warm_start_from, c.pretrained, c.reset_head) == (None, None, False)


@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
def test_paper_recipe_reaches_the_model_the_data_and_the_plateau_rule(name):
    """What the training program builds from the config, not only the keys: the model, the scale
    jitter passed to the input pipeline, and a plateau rule dividing by 10 three times, then never."""
    letter, scale_range, _ = PAPER[name]
    c = _config(name)
    model = vgg_flax.VGG.from_config(c.model.to_dict(), num_classes=1000)
    assert (model.config, model.dropout_rate, model.dtype, model.head) == \
        (letter, 0.5, jnp.bfloat16, "torchvision")
    recording = _Recording()
    data = training.make_data(recording, seed=0, **c.data)
    data.train_batches(c.global_batch_size, start_step=0)
    (_, split, kw), = recording.calls
    assert split == "train" and kw["augment"] == "paper" and kw["scale_range"] == scale_range
    assert kw["batch_size"] == 256 and kw["image_size"] == 224
    _, plateau = programs.build_optimizer(c)
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
    assert (f.reset_head, f.optim.freeze_features, f.pretrained) == (True, True, None)
    assert (f.data.image_size, f.data.normalization, f.model.dtype) == (224, "torchvision", "float32")
    assert (f.schedule.name, f.schedule.learning_rate, f.optim.weight_decay) == ("cosine", 1e-3, 1e-4)
    d = _config("default")
    assert (d.data.dataset, d.data.image_size, d.data.scale_range) == ("sklearn_digits", 32, None)
    assert (d.model.head, d.model.batch_norm, d.model.dtype, d.model.dropout_rate) == \
        ("small", True, "float32", 0.2)
    assert (d.optim.name, d.optim.momentum, d.optim.nesterov, d.optim.weight_decay) == \
        ("sgd", 0.9, False, 5e-4)
    assert (d.schedule.name, d.schedule.factor, d.schedule.max_reductions) == ("cosine", 0.1, 3)
    assert optim.Plateau().max_reductions == 3 and optim.Plateau().factor == 0.1


def test_unset_values_are_none_and_the_command_line_sets_them_with_their_type(monkeypatch):
    """Unset keys are None (not "", 0 or (0, 0)); --config.KEY=VALUE gives them typed values."""
    import os

    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(train_harness.ROOT, "configs", "default.py")
    c = _config("default")
    assert (c.data.data_dir, c.data.scale_range, c.data.num_classes, c.pretrained, c.warm_start_from) == \
        (None, None, None, None, None)
    assert training.make_data(_Recording(), seed=0, **c.data).num_classes == 1000  # the dataset's
    argv = ["train.py", f"--config={default}", "--config.data.num_classes=5", "--config.data.data_dir=/x",
            "--config.data.scale_range=(256, 512)", "--config.pretrained=vgg16"]
    monkeypatch.setattr("sys.argv", argv)  # ml_collections reads the overrides at definition
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default, flag_values=fv, lock_config=True)
    fv(argv)
    c = fv.config
    assert (c.data.num_classes, c.data.data_dir, tuple(c.data.scale_range), c.pretrained) == \
        (5, "/x", (256, 512), "vgg16")


CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(train_harness.ROOT, "configs"))
                      if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_is_locked_valid_and_builds(name):
    sys.path.insert(0, train_harness.ROOT)
    config = train_harness.load_config_module(name).get_config()
    assert config.is_locked
    tx, plateau = programs.build_optimizer(config)  # each section checks itself where it is used
    assert (plateau is not None) == (config.schedule.name == "plateau")
    training.EvalSpec(**config.eval), training.LogSpec(**config.log)
    model = vgg_flax.VGG.from_config(config.model.to_dict(), num_classes=7)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert shapes["params"][{"small": "head_out"}.get(model.head, "fc3")]["bias"].shape == (7,)
    # The paper's values of each recipe: tests/train/test_recipes.py.
