"""Stopping a run on SIGTERM/SIGINT between steps, after a checkpoint, at one step on every process."""

from __future__ import annotations

import logging
import os
import signal

import jax
from jax.experimental import multihost_utils


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the state was checkpointed at `step` before stopping."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after saving step {step}")
        self.signum, self.step = signum, step


class StopFlag:
    """SIGTERM/SIGINT: checkpoint and stop between steps, at the same step on every process.

    One process: Python handlers record the signal and the loop stops after the step it is in.
    Several processes (jax.distributed): each host gets its maintenance SIGTERM at its own moment,
    and a process that stopped on its own would enter the checkpoint save (a collective) while the
    others enter the next step's all-reduce, and the run would hang. So SIGTERM is left to JAX's
    preemption notifier, a C signal handler that `jax.distributed.initialize` installs (a Python
    handler would replace it), which tells the coordination service; every process then learns the
    same stop step from `multihost_utils.reached_preemption_sync_point`: the fastest process's step
    count + 1 (TSL's PreemptionSyncManager). SIGINT, which the notifier does not watch, is recorded
    and handed on to it as a SIGTERM to this process.
    """

    def __init__(self):
        self.signum = 0
        self._old = {}
        self._synced = False

    def __enter__(self):
        self._synced = preemption_sync_available()
        try:
            for sig in (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, _frame):
        self.signum = signum
        if self._synced:
            os.kill(os.getpid(), signal.SIGTERM)  # to the preemption notifier

    def stop_signal(self, count: int) -> int:
        """The signal to stop with after this run's `count`-th step (0: go on); called every step,
        with the same counts on every process (counting from 1 at the step after the resumed one)."""
        if not self._synced:
            return self.signum
        if multihost_utils.reached_preemption_sync_point(count):
            return self.signum or signal.SIGTERM  # the processes that got no signal stop as by SIGTERM
        return 0

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def preemption_sync_available() -> bool:
    """Whether the processes can agree on a stop step (several processes, preemption service on)."""
    if jax.process_count() == 1:
        return False
    try:
        multihost_utils.reached_preemption_sync_point(0)  # step counts start at 1
    except RuntimeError as err:  # jax_enable_preemption_service is off
        logging.warning("%s: a SIGTERM stops only the process that gets it, and the others hang", err)
        return False
    return True
