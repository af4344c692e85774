"""One training program per workdir: a lock file naming its owner (host, pid, start time).

Two programs writing the same workdir would interleave metrics.jsonl rows and overwrite each other's
checkpoints, so `train_and_evaluate` holds `WorkdirLock(workdir)` for the whole run (process 0 only
in a multi-process run: it alone writes the files that could clash). The lock is an exclusive
`flock` on `workdir/train.lock`, which the kernel drops when the owner dies in any way (kill -9
included); the file's JSON content names the owner for the refusal message. Content left behind by
an owner that died without releasing is stale when it names this host and a pid that is not
running: it is taken over with a warning. An owner on another host cannot be checked from here, so
its lock is respected until someone deletes the file. A workdir on a remote file system (`gs://`)
is not locked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time

from vgg_flax.train import workdir as workdir_lib
from vgg_flax.train.errors import WorkdirLockedError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')})"


class WorkdirLock:
    """`with WorkdirLock(workdir, enabled=jax.process_index() == 0):` owns workdir for the block.

    Raises WorkdirLockedError on entry when another live program owns it. On exit (normal, an
    exception, or the SIGTERM/SIGINT the training loop turns into one) the file is removed, and
    so is the workdir when the lock created it and nothing else was written (a run refused by its
    config leaves no trace).
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.path = workdir_lib.path(self.workdir, workdir_lib.LOCK_FILE)
        self.enabled = enabled and "://" not in workdir
        self._fd: int | None = None
        self._created_dir = False

    def __enter__(self) -> WorkdirLock:
        if self.enabled:
            self._created_dir = not os.path.isdir(self.workdir)
            os.makedirs(self.workdir, exist_ok=True)
            while self._fd is None:
                self._fd = self._try_lock()
            self._write_owner()
        return self

    def _try_lock(self) -> int | None:
        """The locked file descriptor, or None when the file was replaced under us (retry)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A releasing owner unlinks the file after we opened it: our lock is on a dead inode.
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                os.close(fd)
                return None
            self._check_stale(self._read(fd))
        except OSError as err:
            owner = self._read_owner_of_held_lock(fd) if err.errno in (errno.EAGAIN, errno.EACCES) else {}
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise self._refusal(owner) from None
            if isinstance(err, FileNotFoundError):
                return None
            raise
        except WorkdirLockedError:
            os.close(fd)
            raise
        return fd

    def _check_stale(self, owner: dict) -> None:
        """Content left by an owner that never released: take it over only if provably gone."""
        if not owner:
            return
        if owner.get("host") != socket.gethostname() or _pid_alive(int(owner.get("pid", -1))):
            raise self._refusal(owner)
        logging.warning("taking over the stale lock %s of %s, which is no longer running",
                        self.path, _describe(owner))

    def _refusal(self, owner: dict) -> WorkdirLockedError:
        who = _describe(owner) if owner else "another program"
        return WorkdirLockedError(f"workdir {self.workdir} is in use by {who}; wait for it to finish, use "
                                  f"another --workdir, or delete {self.path} if that program is gone")

    def _read_owner_of_held_lock(self, fd: int, wait: float = 2.0) -> dict:
        """The owner's record; an owner that has just taken the lock writes it a moment later, so an
        empty file is read again for up to `wait` seconds (the refusal then names the owner)."""
        deadline = time.monotonic() + wait
        owner = self._read(fd)
        while not owner and time.monotonic() < deadline:
            time.sleep(0.05)
            owner = self._read(fd)
        return owner

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            owner = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _write_owner(self) -> None:
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(owner).encode() + b"\n", 0)
        os.fsync(self._fd)

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        os.unlink(self.path)  # before unlocking: a waiting opener then sees a replaced file
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                os.rmdir(self.workdir)
