"""vgg_flax.parallel on one process: batch checks, the global-array round trip. (Equal batch
counts with masked padding are the input pipeline's: tests/data. Several devices and processes:
tests/train and tests/evaluation/test_evaluation.py.)"""

import jax
import numpy as np
import pytest

from vgg_flax import parallel


def test_check_batch_divides_names_what_does_not_divide():
    parallel.check_batch_divides(global_batch_size=16, num_devices=8, grad_accum_steps=2)
    with pytest.raises(ValueError, match="does not divide over 8 devices"):
        parallel.check_batch_divides(global_batch_size=12, num_devices=8)
    with pytest.raises(ValueError, match="over 3 processes"):
        parallel.check_batch_divides(global_batch_size=8, num_devices=1, num_processes=3)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        parallel.check_batch_divides(global_batch_size=8, num_devices=2, grad_accum_steps=3)


def test_global_array_round_trip_and_sums():
    mesh = parallel.create_mesh()
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    g = parallel.global_array(x, mesh)
    assert g.shape == (4 * jax.process_count(), 3) and g.sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(parallel.local_rows(g, mesh), x)
    np.testing.assert_array_equal(parallel.sum_over_processes(np.asarray([1, 2])), [1, 2])
