"""A two-process run (jax.distributed on localhost) stopped by SIGTERM: every process saves the same
step, says so in one line and exits 143, within a bounded time (a hang fails the test instead of
stalling the suite); the same command then resumes and ends bit-exact with a run never stopped.

The processes run the training program's entry point (train.py's `train_app.run`, through
tests/train/train_harness.py --entry), so the console of each process is checked as a user sees it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_harness

from vgg_flax.train import checkpoints

HARNESS = os.path.join(train_harness.ROOT, "tests", "train", "train_harness.py")
STEPS = 16  # at 0.3 s a batch, a signal at step 3 leaves ~4 s for the processes to agree
# Plateau rule with every evaluation "stalling": the learning-rate scale changes at step 3 and must
# survive the stop and resume like the parameters.
RUN = {"num_train_steps": STEPS, "schedule.name": "plateau", "schedule.patience": 1,
       "schedule.min_delta": 2.0}
SLEEP = "0.3"  # seconds per training batch, so that a signal lands mid-run
STOP_TIMEOUT = 60  # seconds from the signal to both exits: a stop takes a few, a hang forever


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_pair(workdir, sleep: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run of `RUN` in `workdir`, one CPU device each; `sleep` seconds
    before each training batch (the same run, only slower)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=train_harness.ROOT, VGG_FLAX_COMPILATION_CACHE="off",
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2")
    cmd = [sys.executable, HARNESS, str(workdir), os.devnull, json.dumps(RUN), "--entry", "--sleep", sleep]
    return [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


@contextlib.contextmanager
def _pair(workdir, sleep: str = SLEEP):
    procs = _launch_pair(workdir, sleep)
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _outputs(procs, timeout: float) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; fails (and kills both) if one runs past `timeout`."""
    deadline, out = time.time() + timeout, []
    for i, p in enumerate(procs):
        try:
            stdout, stderr = p.communicate(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {i} did not exit within {timeout} s: the run hangs")
        out.append((p.returncode, stdout, stderr))
    return out


def _rows(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        with contextlib.suppress(json.JSONDecodeError):  # a row being written
            rows.append(json.loads(line))
    return rows


def _wait_for_step(workdir, step: int, procs, timeout=120) -> int:
    """Until process 0's metrics.jsonl has a row of `step` or later; returns the step reached."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, p.communicate()
        reached = max((r["step"] for r in _rows(workdir)), default=0)
        if reached >= step:
            return reached
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def _final_state(workdir) -> tuple[int, dict]:
    """(latest step, its saved state: parameters, statistics, optimizer state, step, key, as numpy)."""
    ckpt = checkpoints.Checkpoints(str(workdir), async_save=False)
    try:
        step = ckpt.latest_step()
        state = ckpt.read_state_numpy(step)
    finally:
        ckpt.close()
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


# JAX's preemption notifier logs this when its SIGTERM handler fires; jaxlib's C++ logging reads its
# level (TF_CPP_MIN_LOG_LEVEL) once, when jax is imported, so only the environment can hide it.
NOTIFIER_LINE = "] SIGTERM caught at "


def _assert_quiet(outputs, signalled: tuple[int, ...] = ()):
    """Process 0 prints its header and summary on stdout, process 1 nothing; on stderr each prints
    nothing but its stop line (and the notifier's line where the SIGTERM arrived): no Gloo connection
    line, no orbax warning ("Requested `tracked_metric`", "Reached preemption sync point")."""
    for i, (_, out, err) in enumerate(outputs):
        assert "[Gloo]" not in out + err, out + err
        assert out.startswith("model ") if i == 0 else out == "", out
        allowed = ("] stopped by signal 15 after saving step ", *((NOTIFIER_LINE,) if i in signalled else ()))
        assert [line for line in err.splitlines() if not any(a in line for a in allowed)] == [], err


def _assert_stopped_together(outputs, workdir, signalled_at: int) -> int:
    """Both exited 143 with one line naming the same saved step, the latest checkpoint; returns it."""
    said = []
    for status, out, err in outputs:
        assert status == 128 + signal.SIGTERM, (status, out[-2000:], err[-2000:])
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if "signal" in line]
        assert len(lines) == 1, err
        said.append(lines[0].rpartition("]")[2].strip())
    step = _final_state(workdir)[0]
    assert said == [f"stopped by signal 15 after saving step {step}"] * 2, said
    assert signalled_at <= step < STEPS, (signalled_at, step)  # mid-run, where the signal found it
    assert max(r["step"] for r in _rows(workdir)) == step
    return step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final state of the same two-process command never stopped."""
    work = tmp_path_factory.mktemp("uninterrupted") / "work"
    with _pair(work, sleep="0") as procs:
        outputs = _outputs(procs, timeout=300)
    assert [status for status, _, _ in outputs] == [0, 0], outputs
    _assert_quiet(outputs)
    assert outputs[0][2] == outputs[1][2] == "", outputs  # not a single line on stderr
    step, state = _final_state(work)
    assert step == STEPS
    return state


def _resume_and_compare(work, uninterrupted):
    with _pair(work, sleep="0") as procs:
        outputs = _outputs(procs, timeout=300)
    assert [status for status, _, _ in outputs] == [0, 0], outputs
    step, state = _final_state(work)
    assert step == STEPS and state.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_sigterm_to_one_process_stops_both_at_the_same_step(uninterrupted, tmp_path):
    """A maintenance SIGTERM reaches process 1 only: process 0, never signalled, stops with it."""
    work = tmp_path / "work"
    with _pair(work) as procs:
        reached = _wait_for_step(work, 3, procs)
        procs[1].send_signal(signal.SIGTERM)
        outputs = _outputs(procs, timeout=STOP_TIMEOUT)
    _assert_stopped_together(outputs, work, reached)
    _assert_quiet(outputs, signalled=(1,))
    _resume_and_compare(work, uninterrupted)


def test_sigterm_to_both_processes_at_different_steps(tmp_path):
    """Process 1 is signalled at one step, process 0 at a later one: one stop step for both."""
    work = tmp_path / "work"
    with _pair(work) as procs:
        reached = _wait_for_step(work, 2, procs)
        procs[1].send_signal(signal.SIGTERM)
        _wait_for_step(work, reached + 1, procs, timeout=STOP_TIMEOUT)
        procs[0].send_signal(signal.SIGTERM)
        outputs = _outputs(procs, timeout=STOP_TIMEOUT)
    _assert_stopped_together(outputs, work, reached)
    _assert_quiet(outputs, signalled=(0, 1))
