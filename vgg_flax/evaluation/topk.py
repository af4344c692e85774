"""Top-k hits with one tie rule, shared by the train loop's eval step and `vgg_flax.evaluation`.

The tie rule (that of `jax.lax.top_k` and of a stable descending sort): a class ranks before another
when it scores higher, or scores the same and has the lower index. A label is among the top k when
fewer than k classes rank before it. Written as a count rather than a sort, so it is exact, needs no
sort on an accelerator, and gives the same answer for numpy and JAX inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_hits(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """bool[N]: whether each row's label ranks among its k best classes (ties: lower index first).

    Args:
      scores: float[N, C] logits or posteriors (any monotone transform gives the same hits).
      labels: int[N] class indices.
      k: how many of the best classes count; k >= C counts every row.
    """
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    own = jnp.take_along_axis(scores, labels[:, None], axis=-1)
    before = (scores > own) | ((scores == own) & (jnp.arange(scores.shape[-1]) < labels[:, None]))
    return jnp.sum(before, axis=-1) < k
