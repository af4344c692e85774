"""The paper's warm start of deeper nets from net A (Sec. 3.1): net A's first four convs and three FC
layers are copied, kernels and biases (and the BatchNorm that follows a copied conv), and every other
layer is exactly the fresh initialisation a run without warm start gets from the same seed."""

import jax
import numpy as np
from train_harness import FakeDatasets, tiny_config

from vgg_flax.train import checkpoints, warm_start
from vgg_flax.train import loop as training

# Written from the paper, not read from the code: net A = 64 M 128 M 256 256 M ..., so its first four
# convs are conv1_1, conv2_1, conv3_1, conv3_2; then the three FC layers.
COPIED = {"conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc1", "fc2", "fc3"}
# Tiny stand-ins for A and D with the paper's layer names; D adds conv1_2, conv2_2, conv3_3.
ARCH = {"A": "8,M,16,M,32,32,M", "D": "8,8,M,16,16,M,32,32,32,M"}
D_LAYERS = {"conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "fc1", "fc2", "fc3"}


def _config(letter, batch_norm=False, **overrides):
    return tiny_config(**{"model.config": ARCH[letter], "model.head": "torchvision", "model.fc_width": 16,
                          "model.batch_norm": batch_norm}, **overrides)


def _train(workdir, letter, batch_norm=False, **overrides):
    state = training.train_and_evaluate(_config(letter, batch_norm, **overrides), str(workdir),
                                        datasets=FakeDatasets())
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def test_paper_warm_start_copies_first_four_convs_and_fcs(tmp_path):
    assert set(warm_start.PAPER_WARM_START_LAYERS) == COPIED
    net_a = str(tmp_path / "a")
    _train(net_a, "A", batch_norm=True, num_train_steps=2)  # 2 steps: net A's values are not its init
    _, a = checkpoints.load_for_inference(net_a)
    # Through the training program: warm_start_from, one step at rate 0 (parameters left as started).
    config = _config("D", batch_norm=True, warm_start_from=net_a, num_train_steps=1,
                     **{"schedule.learning_rate": 0.0})
    state = training.train_and_evaluate(config, str(tmp_path / "d"), datasets=FakeDatasets())
    run = jax.device_get(state.params)
    # The same start computed directly, and the fresh one from the same key (the key setup() uses).
    model = checkpoints.model_from_config(config.model.to_dict(), num_classes=3)
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    warm = training.initial_variables(model, init_rng, image_size=32, warm_start_from=net_a)
    fresh = training.initial_variables(model, init_rng, image_size=32)
    bns = {n.replace("conv", "bn") for n in D_LAYERS if n.startswith("conv")}
    assert set(run) == set(warm["params"]) == D_LAYERS | bns
    for name in run:
        for leaf in run[name]:
            np.testing.assert_array_equal(run[name][leaf], warm["params"][name][leaf], err_msg=name)
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
                    # net A trained: its values differ from the fresh ones, so a missed copy shows
                    assert not np.array_equal(value, fresh[collection][name][leaf]), where
                else:  # the intermediate layers: initialised randomly, exactly as without warm start
                    np.testing.assert_array_equal(value, fresh[collection][name][leaf], err_msg=where)
