"""Programs for a platform other than the host's (`jax.export`), with that platform's conv path.

`VGG(conv_impl="auto")` chooses how its convs and pools are computed when it is traced, from the
host's backend: on a CPU host that is the CPU path (`vgg_flax.ops.conv`: Winograd and im2col convs,
blocked filter gradients, elementwise pools, custom VJPs), right for running there and wrong for a
program lowered on that host for a GPU or TPU, which should get plain XLA convs (cuDNN, TPU convs).
`for_platform` fixes the choice for the target before the step is built:

    from jax import export
    model = for_platform(vgg_flax.vgg16(dtype=jnp.bfloat16), ("cuda",))
    step = steps.make_train_step(mesh, sharding, model=model, tx=tx)
    exported = export.export(step, platforms=("cuda",))(state_shapes, batch_shapes)

tests/test_export.py lowers the real train and eval steps this way for "cuda" and "tpu" on a CPU
machine and checks that the modules hold XLA convolutions and none of the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence

from vgg_flax.ops.conv import resolve_impl


def for_platform(model, platforms: str | Sequence[str]):
    """The VGG module with `conv_impl` resolved for the target platform(s) instead of the host.

    Args:
      model: a `vgg_flax.VGG`.
      platforms: "cpu", "cuda", "rocm", "tpu" or several of them (a multi-platform export).
    Returns:
      model.clone(conv_impl=...): "auto" becomes "cpu" only when every target is the CPU, else the
      portable "xla" (the CPU path is a speed choice for the CPU alone); "xla" and "cpu" are kept.
    """
    targets = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    if not targets:
        raise ValueError("for_platform needs at least one platform, e.g. ('cuda',)")
    impls = {resolve_impl(model.conv_impl, platform) for platform in targets}
    return model.clone(conv_impl=impls.pop() if len(impls) == 1 else "xla")
