"""Device prefetch (vgg_flax.train.prefetch): same batches in the same order, bounded, errors propagate."""

import threading
import time

import numpy as np
import pytest

from vgg_flax.train import prefetch


def test_prefetch_yields_the_same_batches_in_order():
    batches = [{"x": np.full((2, 3), i)} for i in range(20)]
    got = list(prefetch.to_device(iter(batches), lambda b: {"x": b["x"] * 2}, size=2))
    assert [int(b["x"][0, 0]) for b in got] == [2 * i for i in range(20)]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_prefetch_is_never_more_than_size_ahead(size):
    produced, lock = [], threading.Lock()

    def source():
        for i in range(50):
            with lock:
                produced.append(i)
            yield i

    it = prefetch.to_device(source(), lambda b: b, size=size)
    for consumed in range(1, 10):
        assert next(it) == consumed - 1
        time.sleep(0.05)  # Let the thread run as far ahead as it may.
        with lock:
            ahead = len(produced) - consumed
        # The queue holds `size`; the thread may hold one more it has put() but not queued yet.
        assert ahead <= size + 1, (consumed, ahead)
    assert ahead >= size  # It does run ahead.
    it.close()


def test_source_and_put_exceptions_propagate_where_the_batch_was_due():
    def source():
        yield 0
        yield 1
        raise OSError("disk gone")

    it = prefetch.to_device(source(), lambda b: b, size=2)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(OSError, match="disk gone"):
        next(it)

    def bad_put(b):
        if b == 2:
            raise ValueError("bad batch")
        return b

    it = prefetch.to_device(iter(range(5)), bad_put, size=1)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad batch"):
        next(it)
    with pytest.raises(ValueError, match="at least 1"):
        next(prefetch.to_device(iter([]), bad_put, size=0))
