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

    def produce():
        try:
            for batch in batches:
                item = put(batch)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_END)
        except BaseException as error:  # Handed to the consumer, raised where the batch was due.
            ready.put(_Failure(error))

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
        stop.set()  # The consumer stopped (closed, garbage collected): the thread ends.
