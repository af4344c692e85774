"""What a training run leaves in its workdir for later use: config.json (the whole config used) and
checkpoints that `load_for_inference` reads, the latest or the best by eval top-1."""

import json

import jax
import numpy as np
import pytest
from train_harness import FakeDatasets, load_config_module, tiny_config

from vgg_flax.train import checkpoints
from vgg_flax.train import loop as training

TOP1 = {3: 0.9, 6: 0.5}  # the eval at step 3 is the best; the latest (step 6) is worse


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """6 steps, eval and checkpoint every 3, keep=1: only the latest and the best are kept."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(**{"checkpoints.every_steps": 3, "checkpoints.keep": 1,
                            "data.scale_range": (40, 48), "optim.grad_clip_norm": 5.0})
    real = training.evaluate_run

    def evaluate(run_, state):  # real metrics, with the top-1 set so that step 3 is the best
        return {**real(run_, state), "eval_top1": TOP1[int(state.step)]}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "evaluate_run", evaluate)
        state = training.train_and_evaluate(config, workdir, datasets=FakeDatasets())
    return workdir, config, jax.device_get(state.params)


def _saved_params(workdir, step):
    ckpt = checkpoints.Checkpoints(workdir, async_save=False)
    try:
        return ckpt.read_state_numpy(step)["params"]
    finally:
        ckpt.close()


def _equal(a, b) -> bool:
    leaves = jax.tree_util.tree_leaves
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


def test_which_best_restores_the_best_checkpoint_not_the_latest(run):
    workdir, _, final = run
    ckpt = checkpoints.Checkpoints(workdir, async_save=False)
    try:
        assert ckpt.all_steps() == [3, 6] and ckpt.best_step() == 3 and ckpt.latest_step() == 6
    finally:
        ckpt.close()
    step3, step6 = _saved_params(workdir, 3), _saved_params(workdir, 6)
    assert _equal(step6, final) and not _equal(step3, step6)
    _, best = checkpoints.load_for_inference(workdir, which="best")
    _, latest = checkpoints.load_for_inference(workdir)
    assert _equal(best["params"], step3)
    assert _equal(latest["params"], step6)
    with pytest.raises(ValueError, match="which must be 'latest' or 'best', not 'bestest'"):
        checkpoints.load_for_inference(workdir, which="bestest")


def test_config_json_is_the_whole_config_and_round_trips(run):
    workdir, config, _ = run
    with open(f"{workdir}/config.json") as f:
        saved = json.load(f)
    assert saved == checkpoints.read_config(workdir)
    # Every section and key, nested as in the ConfigDict, with the run's values (tuples as lists).
    assert saved == json.loads(json.dumps(config.to_dict()))
    assert set(saved) == {"seed", "num_train_steps", "global_batch_size", "warm_start_from", "pretrained",
                          "reset_head", "data", "model", "step", "optim", "schedule", "eval",
                          "checkpoints", "log"}
    assert saved["data"]["scale_range"] == [40, 48] and saved["optim"]["grad_clip_norm"] == 5.0
    assert saved["checkpoints"] == {"every_steps": 3, "keep": 1, "async_save": True}
    again = load_config_module("default").get_config()  # locked: a key config.json invents is an error
    again.update(saved)
    assert again == config and again.data.scale_range == (40, 48)
    model, _ = checkpoints.load_for_inference(workdir)
    assert model == checkpoints.model_from_config(config.model.to_dict(), num_classes=3, dtype="float32")


def test_a_step_saved_between_evaluations_warns_nothing_and_ranks_below_evaluated_ones(tmp_path, caplog):
    """orbax warns "Requested `tracked_metric`; did not provide metrics." at each save without
    metrics once the best step is tracked; such a step is saved with {} and is never the best while
    an evaluated step is kept (and is the best only when no kept step was evaluated)."""
    import jax.numpy as jnp

    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=1, async_save=False)
    try:
        ckpt.save(1, {"w": jnp.ones(2)}, {"num_classes": 3})
        assert ckpt.best_step() == 1  # nothing evaluated yet: the latest
        ckpt.save(2, {"w": jnp.ones(2)}, {"num_classes": 3}, {"eval_top1": 0.0})
        ckpt.save(3, {"w": jnp.ones(2)}, {"num_classes": 3})
        assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2
    finally:
        ckpt.close()
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()], caplog.text
