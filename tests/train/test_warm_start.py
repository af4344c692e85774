"""The paper's warm start of deeper nets from net A (Sec. 3.1): net A's first four convs and three FC
layers are copied, kernels and biases (and the BatchNorm that follows a copied conv), and every other
layer is exactly the fresh initialisation a run without warm start gets from the same seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_harness import FakeDatasets, tiny_config, train

import vgg_flax
from vgg_flax.train import checkpoints, warm_start
from vgg_flax.train import loop as training
from vgg_flax.train import workdir as workdir_lib

# Written from the paper, not read from the code: net A = 64 M 128 M 256 256 M ..., so its first four
# convs are conv1_1, conv2_1, conv3_1, conv3_2; then the three FC layers.
COPIED = {"conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc1", "fc2", "fc3"}
# Tiny stand-ins for A and D with the paper's layer names; D adds conv1_2, conv2_2, conv3_3.
ARCH = {"A": "8,M,16,M,32,32,M", "D": "8,8,M,16,16,M,32,32,32,M"}
D_LAYERS = {"conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "fc1", "fc2", "fc3"}


def _config(letter, **overrides):
    return tiny_config(**{"model.config": ARCH[letter], "model.head": "torchvision", "model.fc_width": 16,
                          "model.batch_norm": True}, **overrides)


def _net_a_workdir(workdir: str) -> None:
    """A net A run's workdir (config.json and a checkpoint) with random values in every parameter and
    statistic, as a trained net A has: none equals a fresh initialisation (zero biases, mean 0, var 1)."""
    config = _config("A")
    model = vgg_flax.VGG.from_config(config.model.to_dict(), num_classes=3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), shapes)
    ckpt = checkpoints.Checkpoints(workdir, async_save=False)
    ckpt.save(2, {"step": np.int32(2), **state}, {"num_classes": 3})
    ckpt.close()
    workdir_lib.write_config(workdir, config.to_dict())


def _start(workdir, config) -> dict:
    """The variables a run starts from, as `train_and_evaluate` builds them before its first step."""
    run, state = training.setup(config, str(workdir), FakeDatasets())
    run.ckpt.close()
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def test_paper_warm_start_copies_first_four_convs_and_fcs(tmp_path):
    assert set(warm_start.PAPER_WARM_START_LAYERS) == COPIED
    net_a = str(tmp_path / "a")
    _net_a_workdir(net_a)
    _, a = checkpoints.load_for_inference(net_a)
    # The training program's start (setup: everything before the first step) with warm_start_from,
    # and without: the fresh start of the same seed.
    warm, fresh = (_start(tmp_path / name, _config("D", warm_start_from=src))
                   for name, src in (("warm", net_a), ("fresh", "")))
    bns = {n.replace("conv", "bn") for n in D_LAYERS if n.startswith("conv")}
    assert set(warm["params"]) == set(fresh["params"]) == D_LAYERS | bns
    copied = COPIED | {"bn1_1", "bn2_1", "bn3_1", "bn3_2"}  # a copied conv's BatchNorm follows it
    assert set(warm["batch_stats"]) == {n for n in warm["params"] if n.startswith("bn")}
    for collection in ("params", "batch_stats"):
        for name, layer in warm[collection].items():
            assert set(layer) == ({"kernel", "bias"} if collection == "params" and name[:2] in ("co", "fc")
                                  else {"scale", "bias"} if collection == "params" else {"mean", "var"})
            for leaf, value in layer.items():
                where = f"{collection} {name} {leaf}"
                if name in copied:
                    np.testing.assert_array_equal(value, a[collection][name][leaf], err_msg=where)
                    # net A's values differ from the fresh ones, so a missed copy shows
                    assert not np.array_equal(value, fresh[collection][name][leaf]), where
                else:  # the intermediate layers: initialised randomly, exactly as without warm start
                    np.testing.assert_array_equal(value, fresh[collection][name][leaf], err_msg=where)


def test_fine_tune_from_pretrained_file_new_head(tmp_path):
    """A save_pretrained file (as `vgg-flax convert` writes) with 3 classes into a 5-class run."""
    from vgg_flax.convert import format as weights

    src = train(tmp_path / "src", num_train_steps=1)
    model, _ = checkpoints.load_for_inference(str(tmp_path / "src"))
    variables = {"params": jax.device_get(src.params), "batch_stats": jax.device_get(src.batch_stats)}
    weights.save_pretrained(tmp_path / "w.safetensors", model, variables, preprocessing="symmetric")
    with pytest.raises(warm_start.WeightsMismatchError, match="3 classes but the run has 5"):
        train(tmp_path / "a", **{"data.num_classes": 5}, pretrained=str(tmp_path / "w.safetensors"))
    state = train(tmp_path / "b", num_train_steps=1, reset_head=True,
                   pretrained=str(tmp_path / "w.safetensors"),
                   **{"data.num_classes": 5, "schedule.learning_rate": 0.0})
    np.testing.assert_array_equal(jax.device_get(state.params["conv2_1"]["kernel"]),
                                  variables["params"]["conv2_1"]["kernel"])
    assert state.params["head_out"]["kernel"].shape == (16, 5)
