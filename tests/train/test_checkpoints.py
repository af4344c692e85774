"""What a training run leaves in its workdir for later use: config.json (the whole config used) and
checkpoints that `load_for_inference` reads, the latest or the best by eval top-1."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_harness import FakeDatasets, load_config_module, tiny_config

import vgg_flax
from vgg_flax.train import checkpoints
from vgg_flax.train import loop as training
from vgg_flax.train import workdir as workdir_lib

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
    assert saved == workdir_lib.read_config(workdir)
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
    assert model == vgg_flax.VGG.from_config(config.model.to_dict(), num_classes=3, dtype="float32")


def test_checkpoints_keep_the_latest_k_and_the_best(tmp_path):
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2, async_save=True)
    top1 = {2: 0.9, 4: 0.5, 6: 0.7}
    for step in range(1, 7):
        state = {"w": jnp.full((3,), float(step))}
        ckpt.save(step, state, {"num_classes": 3}, {"eval_top1": top1[step]} if step in top1 else None)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6] and ckpt.best_step() == 2
    ckpt.close()
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)  # a restarted run still knows the best
    ckpt.save(7, {"w": jnp.zeros(3)}, {"num_classes": 3})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6, 7] and ckpt.best_step() == 2
    restored, meta = ckpt.restore(2, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], [2.0, 2.0, 2.0])
    assert meta == {"num_classes": 3}


def test_a_failed_orbax_read_leaves_no_pending_task(monkeypatch):
    """orbax runs a read in a fresh event loop and closes it when the read raises; the reads
    gathered with the failing one must not outlive it (they printed "Exception ignored in coroutine
    _read_array_index_and_device_put" / "Event loop is closed" after a damaged checkpoint's warning).
    The same pattern as orbax's array read: any exception, GeneratorExit included, is re-raised."""
    import asyncio
    import gc

    from orbax.checkpoint._src import asyncio_utils

    async def slow_read():
        try:
            await asyncio.sleep(5)
        except BaseException as err:
            raise Exception("a read outliving its loop") from err

    async def damaged_read():
        await asyncio.sleep(0)
        raise OSError("damaged file")

    async def restore():
        await asyncio.gather(damaged_read(), slow_read(), slow_read())

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    policy = asyncio.get_event_loop_policy()
    with checkpoints._tidy_reads(), pytest.raises(OSError, match="damaged file"):
        asyncio_utils.run_sync(restore())
    gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []
    assert asyncio.get_event_loop_policy() is policy  # put back


def test_a_step_saved_between_evaluations_warns_nothing_and_ranks_below_evaluated_ones(tmp_path, caplog):
    """orbax warns "Requested `tracked_metric`; did not provide metrics." at each save without
    metrics once the best step is tracked; such a step is saved with {} and is never the best while
    an evaluated step is kept (and is the best only when no kept step was evaluated)."""
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
