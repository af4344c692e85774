"""The real train and eval steps lower for "cuda" and "tpu" with jax.export on this CPU machine, with
the target's conv path: XLA convolutions and pools, none of the CPU path (vgg_flax.ops.conv's
Winograd, im2col, blocked filter gradients, elementwise pools), which the host default still takes."""

import functools
import inspect
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export

import vgg_flax
from vgg_flax import evaluation, parallel
from vgg_flax.ops import conv, routing
from vgg_flax.ops.routing import for_platform
from vgg_flax.train import optim, steps

SMALL = (64, "M", 64, "M", 64, "M")  # 32 px: 32, 16 and 8 px maps, where the CPU path is Winograd
BATCH = 16
# Every function of the CPU path: the module's own functions, less the routing that the XLA path
# passes through too. Their names are in the lowered module's locations when the path was traced.
_ROUTING = {"resolve_impl", "make_conv_general_dilated", "_is_same_conv"}
CPU_PATH = sorted(name for name, fn in vars(conv).items() if name not in _ROUTING
                  and (isinstance(fn, jax.custom_vjp)
                       or (inspect.isfunction(fn) and fn.__module__ == conv.__name__)))


def _model(config, *, dtype="float32", batch_norm=False, conv_impl="auto"):
    return vgg_flax.VGG(config=config, batch_norm=batch_norm, head="small", small_head_width=0,
                        num_classes=10, dtype=jnp.dtype(dtype), conv_impl=conv_impl)


def _abstract(model, mesh):
    """(tx, state shapes, batch shapes) of a real TrainState (SGD momentum, as the paper)."""
    tx = optim.make_optimizer(learning_rate=0.01, name="sgd", momentum=0.9, weight_decay=5e-4)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    state = jax.eval_shape(
        lambda v: steps.create_state(model=model, tx=tx, variables=v, rng=jax.random.key(1)), variables)
    batch = {"image": jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((BATCH,), jnp.bool_)}
    return tx, state, batch


def lower(model, platforms, *, kind="train", grad_accum_steps=1, mesh=None):
    """The StableHLO text of the real jitted train (or eval) step, exported for `platforms`."""
    mesh = mesh or parallel.create_mesh()
    tx, state, batch = _abstract(model, mesh)
    sharding = steps.state_sharding_like(state, mesh)
    if kind == "train":
        step = steps.make_train_step(mesh, sharding, model=model, tx=tx,
                                     grad_accum_steps=grad_accum_steps)
        exported = export.export(step, platforms=platforms)(state, batch)
    else:  # the evaluator's program (training evaluates with its "center" protocol)
        step = evaluation.posterior_fn(model, "center", shards=mesh.size)
        exported = export.export(step, platforms=platforms)(steps.variables(state), batch["image"])
    assert exported.platforms == tuple(platforms)
    return exported.mlir_module()


def count(text, op):
    return len(re.findall(rf"stablehlo\.{op}\b", text))


def cpu_markers(text):
    return [name for name in CPU_PATH if re.search(rf'loc\("{re.escape(name)}"', text)]


def check_xla_path(text, config, *, kind, platforms=1):
    """XLA's convs and pools in the module, a whole multiple of one (micro-)batch's, no CPU path.

    A module for several platforms repeats the ops whose lowering differs per platform (one case
    branch each), so there each op only has to come in whole multiples.
    """
    convs = sum(1 for e in config if e != "M")
    pools = config.count("M")
    per_batch = {"convolution": 3 * convs - 1, "reduce_window": pools, "select_and_scatter": pools}
    if kind == "eval":
        per_batch = {"convolution": convs, "reduce_window": pools}
    found = {op: count(text, op) for op in per_batch}
    copies = found["convolution"] // per_batch["convolution"]
    if platforms == 1:
        assert copies >= 1 and found == {op: copies * n for op, n in per_batch.items()}, found
    else:
        assert all(found[op] >= n and found[op] % n == 0 for op, n in per_batch.items()), found
    assert cpu_markers(text) == []


def test_the_markers_are_the_cpu_path():
    assert {"winograd_conv3x3", "filter_grad_blocked", "conv_same_im2col", "_pool_even",
            "conv_same_cpu"} <= set(CPU_PATH)
    assert not _ROUTING & set(CPU_PATH)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype,batch_norm,accum", [("float32", False, 1), ("bfloat16", True, 1),
                                                    ("bfloat16", False, 2)])
def test_train_step_lowers_with_the_target_conv_path(platform, dtype, batch_norm, accum):
    model = for_platform(_model(SMALL, dtype=dtype, batch_norm=batch_norm), (platform,))
    assert model.conv_impl == "xla"
    text = lower(model, (platform,), grad_accum_steps=accum)
    check_xla_path(text, SMALL, kind="train")
    assert ("bf16" in text) == (dtype == "bfloat16")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_eval_step_lowers_with_the_target_conv_path(platform):
    model = for_platform(_model(SMALL, dtype="bfloat16", batch_norm=True), platform)
    check_xla_path(lower(model, (platform,), kind="eval"), SMALL, kind="eval")


def test_vgg16_conv_stack_lowers_for_cuda_and_tpu_in_one_module():
    """VGG16's 13 convs and 5 pools (at 32 px), bf16 with BatchNorm, one export for both targets."""
    config = vgg_flax.models.resolve_config("D")
    model = for_platform(_model(config, dtype="bfloat16", batch_norm=True), ("cuda", "tpu"))
    check_xla_path(lower(model, ("cuda", "tpu")), config, kind="train", platforms=2)


def test_the_host_default_still_takes_the_cpu_path():
    """Without for_platform an "auto" model lowered on this CPU host carries the CPU path, also
    into a cuda export: the checks above would catch the host's choice leaking into a GPU program."""
    assert jax.default_backend() == "cpu" and routing.resolve_impl("auto") == "cpu"
    host = _model(SMALL)
    assert for_platform(host, "cpu").conv_impl == "cpu"
    for platforms in [("cpu",), ("cuda",)]:
        text = lower(host, platforms)
        assert {"winograd_conv3x3", "_pool_even"} <= set(cpu_markers(text)), platforms
        assert count(text, "select_and_scatter") == 0
    with pytest.raises(AssertionError):
        check_xla_path(lower(host, ("cuda",)), SMALL, kind="train")


def test_for_platform_resolution():
    auto = _model(SMALL)
    assert [for_platform(auto, p).conv_impl for p in ("cpu", "cuda", "rocm", "tpu")] == \
        ["cpu", "xla", "xla", "xla"]
    assert for_platform(auto, ("cpu", "cuda")).conv_impl == "xla"  # portable for a mixed export
    assert for_platform(_model(SMALL, conv_impl="cpu"), "cuda").conv_impl == "cpu"  # explicit: kept
    assert routing.resolve_impl("auto", "gpu") == "xla"
    with pytest.raises(ValueError, match="at least one platform"):
        for_platform(auto, ())


_EIGHT_DEVICES = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import sys
sys.path.insert(0, sys.argv[1])
import jax
import test_export as t
from vgg_flax import evaluation, parallel
assert jax.device_count() == 8
mesh = parallel.create_mesh()
for platform, accum in [("cuda", 1), ("tpu", 2)]:
    model = t.for_platform(t._model(t.SMALL, dtype="bfloat16", batch_norm=True), platform)
    text = t.lower(model, (platform,), grad_accum_steps=accum, mesh=mesh)
    t.check_xla_path(text, t.SMALL, kind="train")
    assert "mhlo.num_partitions = 8" in text, text[:2000]
print("ok")
"""


def test_train_step_lowers_on_an_8_device_mesh():
    """The data-parallel step over 8 devices (forced host devices, in a subprocess) for cuda/tpu."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
