"""Training program: 1 vs 8 devices, 2 processes vs 1, kill -9 + resume bit-exact, SIGTERM, NaN guard,
corrupt-checkpoint fallback, bad-config errors, gradient accumulation, optimizers and warm starts.

Runs that need a fresh JAX (forced device counts, jax.distributed) are subprocesses of
tests/train/train_harness.py; the rest run in this process on its single CPU device.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_harness
from train_harness import FakeDatasets, flat_params, tiny_config

from vgg_flax import parallel
from vgg_flax.train import checkpoints, optim, warm_start
from vgg_flax.train import loop as training

HARNESS = os.path.join(train_harness.ROOT, "tests", "train", "train_harness.py")
# The reference runs use the paper's plateau rule with every evaluation "stalling" (min_delta 2), so
# the eval at step 3 divides the rate by 10: resumes and multi-process runs must carry that scale.
PLATEAU = {"schedule.name": "plateau", "schedule.patience": 1, "schedule.min_delta": 2.0}


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_P"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=train_harness.ROOT, VGG_FLAX_COMPILATION_CACHE="off", **extra)
    return env


def _launch(workdir, out, overrides=None, devices=1, extra_args=(), stderr=subprocess.STDOUT, **env):
    cmd = [sys.executable, HARNESS, str(workdir), str(out), json.dumps(overrides or {}), *extra_args]
    return subprocess.Popen(cmd, env=_env(devices, **env), stdout=subprocess.PIPE, stderr=stderr, text=True)


def _run(workdir, out, overrides=None, devices=1, extra_args=()):
    proc = _launch(workdir, out, overrides, devices, extra_args)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    return dict(np.load(out))


def _assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        scale = float(np.abs(a[k]).max()) + 1e-12
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-5 * scale + 1e-7, err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-device subprocess run every multi-device/resume run is compared with."""
    d = tmp_path_factory.mktemp("ref")
    return _run(d / "work", d / "out.npz", PLATEAU)


def test_eight_devices_equal_one(reference, tmp_path):
    """Batch sharded over 8 devices, BatchNorm statistics over the global batch: same parameters."""
    eight = _run(tmp_path / "work", tmp_path / "out.npz", PLATEAU, devices=8)
    assert any(k.startswith("batch_stats") for k in eight)
    _assert_close(reference, eight)


def test_eight_devices_equal_one_with_grad_accumulation(tmp_path):
    """Micro-batches keep the data sharding: 2 micro-batches of 8 over 8 devices == on 1 device."""
    kw = {"step.grad_accum_steps": 2, "global_batch_size": 16, "num_train_steps": 3}
    eight = _run(tmp_path / "work8", tmp_path / "out.npz", overrides=kw, devices=8)
    one = flat_params(_train(tmp_path / "work1", **kw))
    _assert_close(one, eight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(reference, tmp_path):
    """jax.distributed on localhost: each process feeds its half of every global batch."""
    port = _free_port()
    procs = [_launch(tmp_path / "work", tmp_path / "out.npz", PLATEAU,
                     JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    _assert_close(reference, dict(np.load(tmp_path / "out.npz")))


def _wait_for_step(workdir, step: int, proc, checkpoint: int | None = None, timeout=120):
    """Until metrics.jsonl has a row of `step` or later (and `checkpoint` is a finished step)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        # orbax writes a step under a temporary name and renames it to the bare step when complete.
        saved = checkpoint is None or os.path.isdir(os.path.join(workdir, "checkpoints", str(checkpoint)))
        if saved and any(r["step"] >= step for r in _rows(path)):
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def _rows(path) -> list[dict]:
    """metrics.jsonl's complete rows (a row cut short by a kill is skipped)."""
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _latest_checkpoint(workdir) -> int | None:
    saved = checkpoints.Checkpoints(str(workdir), async_save=False)
    try:
        return saved.latest_step()
    finally:
        saved.close()


def _assert_resumed(work, before: str, saved: int, starts, reference, resumed):
    """The second run continued the first from its checkpoint `saved`: it opened the data at `saved`
    (never at 0), kept the first run's rows up to `saved` byte for byte (their images_per_sec is
    wall-clock: a run starting over rewrites them with other values) and ends bit-exact."""
    assert starts == [0, saved], starts
    kept = [line for line in before.splitlines(keepends=True)
            if line.endswith("\n") and json.loads(line)["step"] <= saved]
    assert sum("train_loss" in line for line in kept) == saved  # one train row per step (log.every_steps 1)
    after = open(work / "metrics.jsonl").read()
    assert after.startswith("".join(kept)), (kept, after)
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)


def test_kill9_then_resume_is_bit_exact(reference, tmp_path):
    """SIGKILL mid-run, after step 5 (the data of step 6 held back), checkpoints at 2 and 4; the same
    command again resumes from step 4 (the newest, not the oldest, nor step 0) and ends bit-exact."""
    work, starts = tmp_path / "work", tmp_path / "starts.txt"
    proc = _launch(work, tmp_path / "out.npz", PLATEAU,
                   extra_args=("--stall-at", "6", "--data-log", str(starts)))
    _wait_for_step(work, 5, proc, checkpoint=4)
    proc.kill()
    proc.wait()
    assert not os.path.exists(tmp_path / "out.npz")
    before = open(work / "metrics.jsonl").read()
    done = max(r["step"] for r in _rows(work / "metrics.jsonl"))
    assert done == 5, done  # the kill landed mid-run: some steps done, not all
    saved = _latest_checkpoint(work)
    assert saved == 4, saved
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')  # as if killed in the middle of writing a row
    resumed = _run(work, tmp_path / "out.npz", PLATEAU, extra_args=("--data-log", str(starts)))
    _assert_resumed(work, before, saved, train_harness.read_data_log(starts), reference, resumed)
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    train_keys = {"step", "train_loss", "train_accuracy", "learning_rate", "images_per_sec"}
    eval_keys = {"step", "eval_loss", "eval_top1", "eval_top5"}
    assert all(set(r) in (train_keys, eval_keys) for r in rows)
    assert [r["step"] for r in rows if "eval_top1" in r] == [3, 6]
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert train_steps == list(range(1, 7))  # no duplicated, no missing rows


def test_sigterm_saves_then_resume_is_bit_exact(reference, tmp_path):
    """SIGTERM through the training program's entry point (train.py's `train_app.run`): it saves
    the step it was at, says so in one line and exits 143 (128 + 15); the same command resumes."""
    work, starts = tmp_path / "work", tmp_path / "starts.txt"
    proc = _launch(work, tmp_path / "out.npz", PLATEAU, stderr=subprocess.PIPE,
                   extra_args=("--sleep", "0.4", "--data-log", str(starts), "--entry"))
    _wait_for_step(work, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out[-2000:], err[-2000:])
    before = open(work / "metrics.jsonl").read()
    stopped_at = _latest_checkpoint(work)
    assert 3 <= stopped_at < 6  # saved where the signal found it (mid-run), not only at the regular saves
    assert max(r["step"] for r in _rows(work / "metrics.jsonl")) == stopped_at
    said = [line for line in err.splitlines() if "signal" in line]
    assert len(said) == 1 and said[0].endswith(f"stopped by signal 15 after saving step {stopped_at}"), err
    assert "Traceback" not in err, err
    resumed = _run(work, tmp_path / "out.npz", PLATEAU, extra_args=("--data-log", str(starts)))
    _assert_resumed(work, before, stopped_at, train_harness.read_data_log(starts), reference, resumed)


class _SignalAt(FakeDatasets):
    """Sends this process `signum` when the training batch of `step` is produced (in the prefetch
    thread: Python runs the handler in the main thread, inside the training loop)."""

    def __init__(self, signum: int, step: int):
        super().__init__()
        self.signum, self.step = signum, step

    def _train(self, batch_size, seed, start_step, pi, pc):
        for step, batch in enumerate(super()._train(batch_size, seed, start_step, pi, pc), start_step + 1):
            if step == self.step:
                os.kill(os.getpid(), self.signum)
            yield batch


def test_sigint_saves_and_stops_like_sigterm(tmp_path):
    """Ctrl-C in the training loop: the step reached is checkpointed, then `Interrupted` (signal 2;
    the entry point exits 130 with its one line, tests/cli/test_cli.py)."""
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(training.Interrupted) as stop:
        _train(tmp_path, _SignalAt(signal.SIGINT, 3), **PLATEAU)
    assert stop.value.signum == signal.SIGINT and 1 <= stop.value.step < 6
    assert _latest_checkpoint(tmp_path) == stop.value.step
    assert max(r["step"] for r in _rows(tmp_path / "metrics.jsonl")) == stop.value.step
    assert signal.getsignal(signal.SIGINT) is handler  # the loop puts the handler back


def _train(workdir, datasets=None, optimizer=None, **overrides):
    return training.train_and_evaluate(tiny_config(**overrides), str(workdir),
                                       datasets=datasets or FakeDatasets(), optimizer=optimizer)


def test_nan_loss_names_step_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(training.NonFiniteLossError, match="at step 5"):
        _train(tmp_path, FakeDatasets(nan_at_step=5))
    ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    assert ckpt.latest_step() == 4
    state = ckpt.read_state_numpy(4)
    ckpt.close()
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


def _corrupt_step(workdir, step):
    step_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    """Step 6 damaged: step 4 (the previous, not an older one) is restored with the plateau rule's
    state, so the eval at step 6 makes the second reduction (scale 0.01, as in an unbroken run)."""
    kw = PLATEAU
    done = _train(tmp_path / "a", **kw)
    expected = flat_params(done)
    _train(tmp_path / "b", **kw)
    _corrupt_step(tmp_path / "b", 6)
    starts = tmp_path / "starts.txt"
    state = _train(tmp_path / "b", FakeDatasets(log_path=str(starts)), **kw)  # restores 4, retrains 5 and 6
    assert train_harness.read_data_log(starts) == [4]
    final = flat_params(state)
    assert "step 6" in caplog.text and "unreadable" in caplog.text
    assert [d.split("-")[0] for d in os.listdir(tmp_path / "b" / "checkpoints_corrupt")] == ["6"]
    for k in expected:
        np.testing.assert_array_equal(final[k], expected[k], err_msg=k)
    scales = [float(optax.tree_utils.tree_get(s.opt_state, optim.LR_SCALE)) for s in (done, state)]
    assert scales[1] == scales[0] == pytest.approx(0.01)  # without the restored rule: 0.1 (one reduction)
    metas = []
    for d in "ab":  # the plateau rule's state came back too: 2 reductions (steps 3 and 6) in both
        ckpt = checkpoints.Checkpoints(str(tmp_path / d), async_save=False)
        metas.append(ckpt.read_meta(6)["plateau"])
        ckpt.close()
    assert metas[0] == metas[1] and metas[0]["reductions"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["learning_rate"] for r in rows if r["step"] in (3, 4) and "learning_rate" in r] == \
        pytest.approx([0.05, 0.005])  # min_delta 2: every eval "stalls", so the eval at 3 divided by 10
    model, variables = checkpoints.load_for_inference(str(tmp_path / "b"))
    np.testing.assert_array_equal(variables["params"]["head_out"]["kernel"],
                                  expected["params['head_out']['kernel']"])
    logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 3)


def test_bad_configs_fail_before_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "FakeDatasets", _OpenCounting)  # what `_train` builds
    monkeypatch.setattr(_OpenCounting, "opened", [])
    with pytest.raises(KeyError, match="learning_rat"):
        tiny_config(**{"schedule.learning_rat": 0.1})  # the ConfigDict is locked: typos are errors
    with pytest.raises(KeyError, match="num_train_step"):
        tiny_config(num_train_step=3)
    with pytest.raises(KeyError, match="unknown optimizer"):
        _train(tmp_path / "a", **{"optim.name": "adam_typo"})
    with pytest.raises(ValueError, match="does not divide over 8 devices"):
        parallel.check_batch_divides(global_batch_size=12, num_devices=8)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        _train(tmp_path / "b", **{"step.grad_accum_steps": 3})
    with pytest.raises(ValueError, match="dataset 'no_such_data'"):
        _train(tmp_path / "c", **{"data.dataset": "no_such_data"})
    with pytest.raises(KeyError, match="unknown schedule"):
        _train(tmp_path / "d", **{"schedule.name": "cosin"})
    with pytest.raises(ValueError, match="config.eval.batch_size must be positive"):
        _train(tmp_path / "e", **{"eval.batch_size": 0})
    with pytest.raises(ValueError, match="config.checkpoints.keep must be positive"):
        _train(tmp_path / "f", **{"checkpoints.keep": 0})
    with pytest.raises(ValueError, match="config.model.dtype must be one of"):
        _train(tmp_path / "g", **{"model.dtype": "float64"})
    with pytest.raises(KeyError, match="no injected 'lr_scale'"):  # plateau with a plain optax optimizer
        _train(tmp_path / "h", optimizer=optax.sgd(0.1), **{"schedule.name": "plateau"})
    for d in "abcdefgh":
        assert not os.path.exists(tmp_path / d / "checkpoints" / "2")
        assert not os.path.exists(tmp_path / d / "checkpoints"), d  # nothing created, not even empty
        assert not os.path.exists(tmp_path / d / "metrics.jsonl"), d
    assert _OpenCounting.opened == [], _OpenCounting.opened  # the dataset was never opened


class _OpenCounting(FakeDatasets):
    """Records every `create_dataset` call (shared by all instances: `_train` builds a fresh one)."""

    opened: list = []

    def create_dataset(self, name, split, **kw):
        _OpenCounting.opened.append((name, split))
        return super().create_dataset(name, split, **kw)


def test_class_count_mismatch_is_one_clear_error(tmp_path):
    _train(tmp_path / "a", num_train_steps=2)
    with pytest.raises(warm_start.WeightsMismatchError, match="3 classes but the run has 5"):
        _train(tmp_path / "a", num_train_steps=4, **{"data.num_classes": 5})  # another class count
    # A net A workdir with 3 classes warm-starting a 5-class deeper net.
    with pytest.raises(warm_start.WeightsMismatchError, match="has 3 classes but the run has 5"):
        _train(tmp_path / "b", warm_start_from=str(tmp_path / "a"), **{"data.num_classes": 5},
               **_fc_model("D"))


def test_another_architecture_is_one_clear_error_never_corrupt(tmp_path, caplog):
    """A workdir of one architecture resumed with another of the same class count: an error naming
    both, and the checkpoints left where they are (treated as "corrupt" they would be moved aside and
    the run would start over). 8,M,8,M and 8,8,M even have the same array shapes (conv2_1 vs conv1_2)."""
    _train(tmp_path, num_train_steps=2, **{"model.config": "8,M,8,M"})
    with pytest.raises(checkpoints.CheckpointError, match=r"of model '8,M,8,M, BatchNorm, small head', "
                       r"this run's is '8,8,M, BatchNorm, small head'"):
        _train(tmp_path, num_train_steps=4, **{"model.config": "8,8,M"})
    # Checkpoints saved without their model (older runs): the array names tell, still never "corrupt".
    ckpt = checkpoints.Checkpoints(str(tmp_path), async_save=False)
    saved = ckpt.read_state_numpy(2)
    saved["params"]["conv1_2"] = saved["params"].pop("conv2_1")  # the same shapes, another name
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
    with pytest.raises(checkpoints.CheckpointError, match="this run has params/conv1_2/bias, they do not"):
        ckpt.restore_latest_good(abstract)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert not os.path.exists(tmp_path / "checkpoints_corrupt") and "unreadable" not in caplog.text
    vgg11 = {"config": "vgg11", "batch_norm": False, "head": "torchvision"}
    with pytest.raises(checkpoints.CheckpointError, match="of model 'vgg11, torchvision head', this "
                       "run's is 'vgg13, torchvision head'"):
        checkpoints.check_same_architecture(vgg11, {**vgg11, "config": "vgg13"}, "d")
    checkpoints.check_same_architecture(vgg11, {**vgg11, "config": "A"}, "d")  # vgg11 is A
    checkpoints.check_same_architecture(None, vgg11, "d")  # no model saved: the arrays decide


def _fc_model(letter: str) -> dict:
    """Tiny stand-ins for the paper's A and D (same layer names), torchvision head."""
    arch = {"A": "8,M,16,M,32,32,M", "D": "8,8,M,16,16,M,32,32,32,M"}[letter]
    return {"model.config": arch, "model.head": "torchvision", "model.fc_width": 16,
            "model.batch_norm": False}


def test_grad_accumulation_matches_full_batch(tmp_path):
    """Without BatchNorm and dropout, 2 micro-batches give the full batch's gradient."""
    kw = {"model.batch_norm": False, "model.dropout_rate": 0.0, "num_train_steps": 3}
    one = flat_params(_train(tmp_path / "a", **kw))
    two = flat_params(_train(tmp_path / "b", **{"step.grad_accum_steps": 2}, **kw))
    _assert_close(one, two)


def test_sgd_weight_decay_equals_l2_penalty_in_the_loss():
    """add_decayed_weights before the momentum trace == gradient of wd/2 ||w||^2 (the paper's)."""
    params = {"k": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = {"k": jnp.full((2, 3), 0.5), "b": jnp.full(3, 0.25)}
    tx = optim.direction(name="sgd", momentum=0.9, weight_decay=5e-4)
    updates, _ = tx.update(grads, tx.init(params), params)
    penalty = jax.grad(lambda p: 5e-4 / 2 * jnp.sum(p["k"] ** 2))(params)
    np.testing.assert_allclose(updates["k"], grads["k"] + penalty["k"], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], grads["b"])  # biases are not decayed
    ref = optax.sgd(1.0, momentum=0.9)
    ref_updates, _ = ref.update(jax.tree_util.tree_map(jnp.add, grads, penalty), ref.init(params))
    np.testing.assert_allclose(-updates["k"], ref_updates["k"], rtol=1e-6)


def test_plateau_divides_by_ten_after_patience_and_at_most_max_times():
    p = optim.Plateau(patience=2, max_reductions=2)
    history = [p.update(a) for a in [0.5, 0.6, 0.6, 0.59, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]]
    assert history == [False, False, False, True, False, False, True, False, False, False, False]
    assert p.scale == pytest.approx(0.01) and p.reductions == 2
    p.update(np.float32(0.5))  # numpy scalars (what evaluation returns) keep the state JSON-able
    json.dumps(p.state_dict())
    q = optim.Plateau()
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedules(name):
    s, plateau = optim.make_schedule(name=name, learning_rate=1.0, num_steps=100, warmup_steps=10,
                                     boundaries=(50,))
    assert (plateau is not None) == (name == "plateau")
    steps = (0, 5, 10, 40, 60, 100)
    lr = [float(s(jnp.asarray(t))) for t in steps]
    assert lr[:3] == [0.0, pytest.approx(0.5), pytest.approx(1.0)]  # linear warmup over 10 steps
    # After the warmup, by hand: cosine 0.5 * (1 + cos(pi * (t - 10) / 90)) down to 0 at step 100;
    # "step" x0.1 from its boundary at 50; the flat ones stay at 1 (the plateau acts via lr_scale).
    cosine = [0.5 * (1 + np.cos(np.pi * (t - 10) / 90)) for t in steps[3:]]
    expected = {"constant": [1.0] * 3, "plateau": [1.0] * 3, "step": [1.0, 0.1, 0.1],
                "cosine": cosine}[name]
    np.testing.assert_allclose(lr[3:], expected, rtol=1e-6, atol=1e-7)


def test_architecture_strings():
    assert checkpoints.parse_architecture("vgg16") == "vgg16"
    assert checkpoints.parse_architecture("8,LRN,M,16x1,m") == (8, "LRN", "M", (16, 1), "M")
    with pytest.raises(ValueError, match="bad model.config entry 'Q'"):
        checkpoints.parse_architecture("8,Q")


def test_fine_tune_from_pretrained_file_new_head(tmp_path):
    """A save_pretrained file (as `vgg-flax convert` writes) with 3 classes into a 5-class run."""
    from vgg_flax.convert import format as weights

    src = _train(tmp_path / "src", num_train_steps=1)
    model, _ = checkpoints.load_for_inference(str(tmp_path / "src"))
    variables = {"params": jax.device_get(src.params), "batch_stats": jax.device_get(src.batch_stats)}
    weights.save_pretrained(tmp_path / "w.safetensors", model, variables, preprocessing="symmetric")
    with pytest.raises(warm_start.WeightsMismatchError, match="3 classes but the run has 5"):
        _train(tmp_path / "a", **{"data.num_classes": 5}, pretrained=str(tmp_path / "w.safetensors"))
    state = _train(tmp_path / "b", num_train_steps=1, reset_head=True,
                   pretrained=str(tmp_path / "w.safetensors"),
                   **{"data.num_classes": 5, "schedule.learning_rate": 0.0})
    np.testing.assert_array_equal(jax.device_get(state.params["conv2_1"]["kernel"]),
                                  variables["params"]["conv2_1"]["kernel"])
    assert state.params["head_out"]["kernel"].shape == (16, 5)


def test_remat_is_the_same_computation_and_half_precision_trains(tmp_path, caplog):
    """bfloat16 and float16 compute (float32 parameters) train with finite losses; float16 is really
    float16: nearer float32's parameters than bfloat16 (3 more mantissa bits), not equal to them; and
    its missing loss scaling is said in a warning."""
    kw = {"num_train_steps": 2, "checkpoints.every_steps": 100, "eval.every_steps": 100}
    plain = flat_params(_train(tmp_path / "a", **kw))
    remat = flat_params(_train(tmp_path / "b", **{"step.remat": True}, **kw))
    _assert_close(plain, remat)
    error = {}
    for dtype in ("bfloat16", "float16"):
        caplog.clear()
        half = _train(tmp_path / dtype, **{"model.dtype": dtype}, **kw)
        assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(jnp.float32)}
        rows = [json.loads(line) for line in open(tmp_path / dtype / "metrics.jsonl")]
        losses = [r["train_loss"] for r in rows if "train_loss" in r]
        assert len(losses) == 2 and np.isfinite(losses).all(), losses
        error[dtype] = np.sqrt(sum(np.sum((v - plain[k]) ** 2) for k, v in flat_params(half).items()))
        assert (training.FLOAT16_WARNING in caplog.text) == (dtype == "float16")
    assert 0 < error["float16"] < error["bfloat16"] / 4, error


CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(train_harness.ROOT, "configs"))
                      if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_is_locked_valid_and_builds(name):
    sys.path.insert(0, train_harness.ROOT)
    config = train_harness.load_config_module(name).get_config()
    assert config.is_locked
    tx, plateau = training.build_optimizer(config)  # each section checks itself where it is used
    assert (plateau is not None) == (config.schedule.name == "plateau")
    training.EvalSpec(**config.eval), training.LogSpec(**config.log)
    model = checkpoints.model_from_config(config.model.to_dict(), num_classes=7)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert shapes["params"][{"small": "head_out"}.get(model.head, "fc3")]["bias"].shape == (7,)
    # The paper's values of each recipe: tests/train/test_recipes.py.


def test_metrics_log_rows_tensorboard_and_resume_truncation(tmp_path):
    from vgg_flax.train import metrics_log

    log = metrics_log.MetricsLogger(str(tmp_path), total_steps=4, tensorboard=True, progress="lines")
    for step in (1, 2, 3):
        log.write({"step": step, "train_loss": 1.0 / step, "train_accuracy": 0.5, "learning_rate": 0.1,
                   "images_per_sec": 10.0})
    log.write({"step": 3, "eval_loss": 0.5, "eval_top1": 0.75, "eval_top5": 1.0})
    log.close()
    import tensorflow as tf

    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    scalars = {(e.step, v.tag): v.simple_value for f in events
               for e in tf.compat.v1.train.summary_iterator(str(tmp_path / f)) for v in e.summary.value}
    assert scalars[(2, "train_loss")] == pytest.approx(0.5) and scalars[(3, "eval_top1")] == 0.75
    metrics_log.MetricsLogger(str(tmp_path), total_steps=4, start_step=2, tensorboard=False,
                              progress="none").close()  # a run resumed from step 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


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


def test_a_user_built_optax_optimizer_trains_through_the_loop(tmp_path):
    """optax's own adamw (rate injected, so it is logged) in place of config.optim/config.schedule."""
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
    state0 = _train(tmp_path / "a", num_train_steps=1, **{"schedule.learning_rate": 0.0})
    state = _train(tmp_path / "b", optimizer=tx, num_train_steps=3)
    assert isinstance(optax.tree_utils.tree_get(state.opt_state, "mu"), dict)  # Adam's first moment
    p0, p = jax.device_get(state0.params), jax.device_get(state.params)
    assert not np.array_equal(p["conv1_1"]["kernel"], p0["conv1_1"]["kernel"])
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["learning_rate"] for r in rows if "train_loss" in r] == pytest.approx([1e-3] * 3)
