"""The training program in fresh processes: 1 vs 8 devices, 2 processes vs 1, kill -9 and SIGTERM
then resume, bit-exact (subprocesses of tests/train/train_harness.py, so XLA_FLAGS and
jax.distributed can be set before JAX starts)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import train_harness
from train_harness import flat_params, train

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
    one = flat_params(train(tmp_path / "work1", **kw))
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
    saved = train_harness.latest_checkpoint(work)
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
    stopped_at = train_harness.latest_checkpoint(work)
    assert 3 <= stopped_at < 6  # saved where the signal found it (mid-run), not only at the regular saves
    assert max(r["step"] for r in _rows(work / "metrics.jsonl")) == stopped_at
    said = [line for line in err.splitlines() if "signal" in line]
    assert len(said) == 1 and said[0].endswith(f"stopped by signal 15 after saving step {stopped_at}"), err
    assert "Traceback" not in err, err
    resumed = _run(work, tmp_path / "out.npz", PLATEAU, extra_args=("--data-log", str(starts)))
    _assert_resumed(work, before, stopped_at, train_harness.read_data_log(starts), reference, resumed)
