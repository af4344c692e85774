"""vgg_flax.train.aot and `vgg-flax compile`: the run's train and eval steps compiled for a TPU slice
(v5e:2x2) by libtpu's compiler, on this machine with no TPU.

Needs libtpu (the `tpu` extra). Where it has no wheel these tests skip with the reason; under CI=true
(the dev extra installs it) a skip fails the run (tests/conftest.py).
"""

import importlib.util
import inspect

import jax
import pytest

from vgg_flax.cli.main import main as cli_main
from vgg_flax.configs import default
from vgg_flax.ops import conv
from vgg_flax.train import aot, tpu_slices

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (the `tpu` extra, pip install 'vgg-flax[tpu]'; no wheel for this "
           "platform): TPU programs cannot be compiled here")
TOPOLOGY, CHIPS, SIZE = "v5e:2x2", 4, 32


def hand_forward_flops(widths, head_width=64, classes=10):
    """2 x multiply-adds of one 32 px image: 3x3 "same" convs with a 2x2 pool after each, then the
    small head (global average pool, Dense to head_width, Dense to classes)."""
    side, cin, flops = SIZE, 3, 0
    for width in widths:
        flops += 2 * side * side * 9 * cin * width
        side, cin = side // 2, width
    return flops + 2 * cin * head_width + 2 * head_width * classes


def hand_train_flops(widths):
    """Forward, input and filter gradients (3x), less the first conv's input gradient."""
    return 3 * hand_forward_flops(widths) - 2 * SIZE * SIZE * 9 * 3 * widths[0]


VARIANTS = {  # name: (conv widths, model section overrides, grad_accum_steps)
    "fp32": ((64, 64), dict(batch_norm=False, dtype="float32"), 1),
    "batchnorm": ((16, 32), dict(batch_norm=True, dtype="float32"), 1),
    "bf16_accum2": ((64, 64), dict(batch_norm=False, dtype="bfloat16"), 2),
}
# Per chip: 16 images, micro-batches of 8 (the TPU pads a conv's batch below 8, and so its FLOPs).
BATCH = 64


def tiny_config(widths, model, accum, *, batch=BATCH):
    c = default.get_config()
    c.unlock()
    c.model.config = ",".join(f"{w},M" for w in widths)
    c.model.update(model)
    c.data.num_classes = 10
    c.global_batch_size = batch
    c.eval.batch_size = batch
    c.step.grad_accum_steps = accum
    return c


@pytest.fixture(scope="module", params=list(VARIANTS))
def compiled(request):
    widths, model, accum = VARIANTS[request.param]
    report, executables = aot.compile_for_tpu(tiny_config(widths, model, accum), TOPOLOGY,
                                              keep_executables=True)
    return request.param, report, executables


@needs_libtpu
def test_both_programs_fit_with_positive_memory(compiled):
    _, report, _ = compiled
    assert [p.name for p in report.programs] == ["train_step", "eval_step"]
    for p in report.programs:
        assert p.chips == CHIPS and p.batch_per_chip == BATCH // CHIPS
        assert p.argument_bytes > 0 and p.output_bytes > 0
        assert 0 < p.total_bytes < p.capacity_bytes == 16 * 2**30
    assert report.programs[0].temp_bytes > 0 and report.programs[0].alias_bytes > 0  # state donated
    report.check_fits()
    assert report.versions["libtpu"]


@needs_libtpu
def test_compiled_flops_match_a_hand_count(compiled):
    widths, report = VARIANTS[compiled[0]][0], compiled[1]
    train, evaluate = report.programs
    per_chip = BATCH // CHIPS
    assert train.flops == pytest.approx(hand_train_flops(widths) * per_chip, rel=0.10)
    assert evaluate.flops == pytest.approx(hand_forward_flops(widths) * per_chip, rel=0.10)
    assert train.analytic_flops == hand_train_flops(widths) * per_chip  # the library's own count
    assert train.images_per_second > 0 and 0 < train.peak_fraction <= 1


@needs_libtpu
def test_programs_hold_xla_convolutions_and_none_of_the_cpu_path(compiled):
    widths, executables = VARIANTS[compiled[0]][0], compiled[2]
    cpu_path = [name for name, fn in vars(conv).items()
                if (isinstance(fn, jax.custom_vjp) or inspect.isfunction(fn))
                and getattr(fn, "__module__", conv.__name__) == conv.__name__
                and name not in ("resolve_impl", "make_conv_general_dilated", "_is_same_conv")]
    assert "winograd_conv3x3" in cpu_path
    for name, exe in executables.items():
        text = exe.as_text()
        # forward; and for training the input gradients (not the first conv's) and filter gradients
        assert text.count(" convolution(") >= (3 * len(widths) - 1 if name == "train_step" else len(widths))
        assert "reduce-window(" in text  # XLA's max-pool
        assert [n for n in cpu_path if n in text] == []


@needs_libtpu
def test_gradients_are_all_reduced_once_per_step(compiled):
    widths, model, _ = VARIANTS[compiled[0]]
    cin, params = 3, 0
    for width in widths:
        params, cin = params + 9 * cin * width + width, width
    params += cin * 64 + 64 + 64 * 10 + 10  # the small head
    # BatchNorm: its scale and offset gradients, and its batch statistics (sums over the global
    # batch: forward and backward, 2 per channel each)
    extra = 6 * sum(widths) if model["batch_norm"] else 0
    grads = compiled[1].programs[0].collective_bytes("all-reduce")  # fp32, with a few scalars
    assert 4 * params <= grads <= 4 * (params + extra) + 64


@needs_libtpu
def test_the_printed_report(compiled):
    from vgg_flax.cli import compile_app

    text = compile_app.format_report(compiled[1])
    assert text.startswith("v5e-4 (v5e:2x2): TPU v5e, 16 GiB HBM")
    assert "train_step: 4 chips, batch 16 per chip" in text and "eval_step" in text
    assert "all-reduce x" in text and "images/s" in text


@needs_libtpu
def test_cli_a_run_that_does_not_fit_is_one_line_and_status_2(capsys):
    status = cli_main(["compile", "--topology", TOPOLOGY, "--config.model.config=64,M,64,M",
                       "--config.data.num_classes=10", f"--config.global_batch_size={4 * 65536}",
                       "--config.eval.batch_size=32", "--config.model.batch_norm=False"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(
        "vgg-flax compile: error: train_step does not fit on v5e:2x2 (TPU v5e, batch 65536 per chip): "
        "XLA needs "), err
    assert "GiB available per chip" in err and "grad_accum_steps" in err and "remat" in err


@needs_libtpu
def test_cli_a_batch_that_does_not_divide_is_trains_error(capsys):
    status = cli_main(["compile", "--topology", TOPOLOGY, "--config.global_batch_size=30",
                       "--config.data.num_classes=10"])
    err = capsys.readouterr().err
    assert status == 2 and err == ("vgg-flax compile: error: global batch size 30 does not divide over "
                                   "4 devices; use a multiple of 4\n")


def test_cli_unknown_topology_lists_the_valid_ones(capsys):
    status = cli_main(["compile", "--topology", "v9:1x1", "--config.data.num_classes=10"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("vgg-flax compile: error: unknown TPU topology 'v9:1x1'; valid: ")
    for s in tpu_slices.SLICES.values():
        assert f"{s.topology} ({s.name})" in err


def test_cli_without_libtpu_is_one_line(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else
                        real(name, *a))
    status = cli_main(["compile", "--topology", TOPOLOGY, "--config.data.num_classes=10"])
    err = capsys.readouterr().err
    assert status == 2 and err == ("vgg-flax compile: error: compiling for a TPU needs libtpu, the TPU "
                                   "compiler: pip install 'vgg-flax[tpu]' (jax[tpu] at the installed "
                                   "jax's version; Linux x86-64)\n")


def test_cli_unknown_config_key_is_one_line(capsys):
    status = cli_main(["compile", "--topology", TOPOLOGY, "--config.model.no_such_key=1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "no_such_key" in err, err


def test_collectives_are_parsed_from_compiled_hlo():
    hlo = """
  %all-reduce.21 = (f32[16]{0:T(128)S(1)}, /*index=1*/bf16[3,3,3,16]{3,2,1,0:T(4,128)}) all-reduce(%a)
  %ag = (f32[8]{0}, f32[32]{0}) all-gather-start(%c), dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ag)
  ROOT %cp.1 = s32[] collective-permute(%d), source_target_pairs={{0,1}}
  %get-tuple-element.45 = f32[16]{0} get-tuple-element(%all-reduce.21), index=1
"""
    found = aot.parse_collectives(hlo)
    assert [(c.op, c.shapes, c.bytes) for c in found] == [
        ("all-reduce", ("f32[16]", "bf16[3,3,3,16]"), 16 * 4 + 432 * 2),
        ("all-gather", ("f32[32]",), 128),
        ("collective-permute", ("s32[]",), 4)]
