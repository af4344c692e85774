"""The workdir lock: two programs started together on one workdir (one refused, naming the owner, the
other's metrics.jsonl one clean run), a stale lock taken over, foreign and live owners respected."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import train_harness
from train_harness import FakeDatasets, tiny_config

from vgg_flax.train import lock
from vgg_flax.train import loop as training
from vgg_flax.train import workdir as workdir_lib

HARNESS = os.path.join(train_harness.ROOT, "tests", "train", "train_harness.py")
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")},
       "JAX_PLATFORMS": "cpu", "PYTHONPATH": train_harness.ROOT}


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **owner):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
        json.dump({"started": "2026-01-01T00:00:00+00:00", **owner}, f)


def test_two_programs_on_one_workdir_one_is_refused(tmp_path):
    work = tmp_path / "work"
    procs = [subprocess.Popen([sys.executable, HARNESS, str(work), str(tmp_path / f"out{i}.npz"), "{}",
                               "--sleep", "0.3"], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(c == 0 for c in codes) == [False, True], "\n".join(logs)
    ok, refused = (0, 1) if codes[0] == 0 else (1, 0)
    last = logs[refused].strip().splitlines()[-1]
    assert f"is in use by pid {procs[ok].pid} on {socket.gethostname()}" in last, logs[refused][-2000:]
    assert "WorkdirLockedError" in last
    assert "train_loss" not in logs[refused] and not os.path.exists(tmp_path / f"out{refused}.npz")
    rows = _rows(work)  # exactly one run's rows: steps 1..6 once each, evals at 3 and 6
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_top1" in r] == [3, 6]
    assert not os.path.exists(work / workdir_lib.LOCK_FILE)  # released at exit


def test_stale_lock_of_a_dead_program_is_taken_over(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, host=socket.gethostname(), pid=pid)
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path), datasets=FakeDatasets())
    assert f"stale lock {tmp_path / workdir_lib.LOCK_FILE} of pid {pid}" in caplog.text
    assert [r["step"] for r in _rows(tmp_path) if "train_loss" in r] == [1, 2]
    assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)


@pytest.mark.parametrize("owner", ["live_pid_here", "other_host"])
def test_lock_of_a_live_or_foreign_owner_is_respected(tmp_path, owner):
    # A live pid without the flock (a file system without flock) or a host we cannot check.
    host, pid = ((socket.gethostname(), os.getppid()) if owner == "live_pid_here" else ("elsewhere-7", 4242))
    _write_lock(tmp_path, host=host, pid=pid)
    with pytest.raises(lock.WorkdirLockedError, match=f"in use by pid {pid} on {host} .*delete"):
        training.train_and_evaluate(tiny_config(), str(tmp_path), datasets=FakeDatasets())
    assert sorted(os.listdir(tmp_path)) == [workdir_lib.LOCK_FILE]  # nothing created, the lock left alone


def test_lock_is_released_on_error_and_a_refused_config_leaves_no_workdir(tmp_path):
    with pytest.raises(KeyError, match="unknown optimizer"):
        training.train_and_evaluate(tiny_config(**{"optim.name": "nope"}), str(tmp_path / "new"),
                                    datasets=FakeDatasets())
    assert not os.path.exists(tmp_path / "new")
    with lock.WorkdirLock(str(tmp_path)) as held:
        owner = json.load(open(held.path))
        assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid())
        other = subprocess.run([sys.executable, "-c", "import sys; from vgg_flax.train import lock; "
                                "lock.WorkdirLock(sys.argv[1]).__enter__()", str(tmp_path)],
                               env=ENV, capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
    assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
    with lock.WorkdirLock(str(tmp_path)):  # free again
        pass


def test_refusal_names_an_owner_that_writes_its_record_just_after_locking(tmp_path):
    """Two programs started together: the second can find the lock held and the file still empty (the
    owner writes its record just after taking the lock); the refusal still names the owner."""
    import fcntl
    import threading

    path = tmp_path / workdir_lib.LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, still empty
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}).encode()
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, record, 0))
    writer.start()
    try:
        with pytest.raises(lock.WorkdirLockedError, match=f"in use by pid {os.getpid()} on "):
            with lock.WorkdirLock(str(tmp_path)):
                pass
    finally:
        writer.join()
        os.close(fd)
