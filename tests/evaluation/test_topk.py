"""vgg_flax.evaluation.topk: one tie rule (lower index first), the same for numpy and JAX inputs,
as lax.top_k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax.evaluation.topk import topk_hits


def test_hand_examples_with_ties():
    scores = np.asarray([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 3.0], [0.1, 0.7, 0.2, 0.0]])
    # Row 0: a three-way tie ranks 0, 1, 2; row 1: 3 first, then the tie 1 before 2.
    expected = {1: [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]],
                2: [[1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 1, 0]],
                3: [[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0]],
                4: [[1, 1, 1, 1]] * 3}
    for k, rows in expected.items():
        for label in range(4):
            labels = np.full(3, label)
            got = np.asarray(topk_hits(scores, labels, k))
            np.testing.assert_array_equal(got, np.asarray(rows, bool)[:, label], err_msg=f"k={k} {label=}")
    assert np.all(topk_hits(scores, np.zeros(3, int), 10))  # k beyond the class count: every row


@pytest.mark.parametrize("k", [1, 2, 5])
def test_equals_lax_top_k_membership_and_numpy_equals_jax(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties
    labels = rng.integers(0, 7, size=200)
    top = np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])
    expected = (top == labels[:, None]).any(-1)
    np.testing.assert_array_equal(np.asarray(topk_hits(scores, labels, k)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(topk_hits, static_argnums=2)(
        jnp.asarray(scores), jnp.asarray(labels), k)), expected)
    stable = np.argsort(-scores, axis=-1, kind="stable")[:, :k]  # evaluation's former rule
    np.testing.assert_array_equal(expected, (stable == labels[:, None]).any(-1))
