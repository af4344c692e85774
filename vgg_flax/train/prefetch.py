"""Device prefetch: the next batches are built and transferred on a background thread while the
current step runs.

    batches = prefetch.to_device(local_batches, lambda b: parallel.global_batch(b, mesh), size=2)

The order is the source's, unchanged (exact resume depends only on the source), and at most `size`
batches are ever ahead of the consumer: a bounded queue, so device memory holds at most size + 1
input batches. An exception in the source or in `put` is raised by the `next` call that would have
returned the failed batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def to_device(batches: Iterable, put: Callable, *, size: int = 2) -> Iterator:
    """put(batch) for each batch, computed up to `size` batches ahead on a daemon thread.

    Args:
      batches: host batches (e.g. numpy dicts), consumed in order.
      put: host batch -> device batch (e.g. `parallel.global_batch(batch, mesh)`).
      size: how many batches may be ready ahead of the consumer (>= 1).
    """
    if size < 1:
        raise ValueError(f"prefetch size must be at least 1, not {size}")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item) -> bool:
        """Queues `item` unless the consumer stops first; True when queued."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not offer(put(batch)):
                    return
            offer(_END)
        except BaseException as error:  # Handed to the consumer, raised where the batch was due.
            offer(_Failure(error))

    thread = threading.Thread(target=produce, name="device-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        # The consumer stopped (closed, garbage collected): the thread finishes the batch it is on
        # and ends. Joined, so no thread is left inside TensorFlow or JAX when the interpreter
        # exits (Python 3.13 aborts the process with "terminate called" otherwise).
        stop.set()
        thread.join(timeout=60)
