"""vgg_flax.parallel on one process: batch checks, equal batch counts with masked padding, the
global-array round trip. (Several devices and processes: tests/train and tests/test_evaluation.py.)"""

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


def test_every_process_gets_the_largest_shares_batch_count():
    # 50 examples over 3 processes: shares 17, 17, 16; batches of 4: 5 each (the last partly padding).
    assert parallel.batches_per_process(50, 4, 3) == 5
    assert parallel.batches_per_process(48, 4, 3) == 4
    assert parallel.batches_per_process(7, 2, 2) == 2


def test_padded_appends_all_masked_batches():
    real = [{"image": np.ones((2, 4, 4, 3), np.float32), "label": np.ones(2, np.int32),
             "mask": np.array([True, False])}]
    out = list(parallel.padded(real, 3, parallel.blank_batch(2, (4, 4, 3))))
    assert len(out) == 3 and out[0] is real[0]
    for blank in out[1:]:
        assert not blank["mask"].any() and blank["image"].shape == (2, 4, 4, 3)
        assert blank["label"].dtype == np.int32
    with pytest.raises(ValueError, match="more than the 3 batches"):
        list(parallel.padded(real * 4, 3, out[1]))  # never drop real examples


def test_global_array_round_trip_and_sums():
    mesh = parallel.create_mesh()
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    g = parallel.global_array(x, mesh)
    assert g.shape == (4 * jax.process_count(), 3) and g.sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(parallel.local_rows(g, mesh), x)
    np.testing.assert_array_equal(parallel.sum_over_processes(np.asarray([1, 2])), [1, 2])
