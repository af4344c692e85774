"""The commands' mistakes as one stderr line and exit status 2 (`--debug`: the traceback), packaged
configs by name, and the training program's own one-line errors (bad config, unknown config name,
unknown dataset, a locked workdir, a NaN loss with or without a checkpoint, a damaged checkpoint)
and exit statuses after a signal."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import vgg_flax
from vgg_flax import cli
from vgg_flax.cli import train_app
from vgg_flax.convert.format import save_pretrained
from vgg_flax.train import lock
from vgg_flax.train import loop as training
from vgg_flax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "train"))
from train_harness import FakeDatasets, tiny_config  # noqa: E402

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
HARNESS = os.path.join(ROOT, "tests", "train", "train_harness.py")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = vgg_flax.VGG(config=(8, "M", 8, "M"), head="small", small_head_width=0, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_pretrained(path, model, variables, preprocessing="symmetric", classes=["a", "b", "c"])
    return str(path)


def _not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are notes, not pixels")
    return str(path)


def _mistakes(tmp_path, weights):
    """(argv, words the line must contain) for each mistake a newcomer makes."""
    return [
        (["predict", "--weights", weights, _not_an_image(tmp_path)], "notes.jpg"),
        (["eval", "--weights", str(tmp_path / "missing.safetensors"), "--dataset", "sklearn_digits"],
         "missing.safetensors"),
        (["eval", "--weights", weights, "--dataset", "no_such_dataset", "--image-size", "32"],
         "no_such_dataset"),
        (["eval", "--weights", weights, "--dataset", f"folder:{tmp_path / 'nowhere'}"], "nowhere"),
        (["models", "--head", "no_such_head"], "no_such_head"),
        (["predict", "--weights", _not_an_image(tmp_path), _not_an_image(tmp_path)], "notes.jpg"),
    ]


def test_each_cli_mistake_is_one_stderr_line_and_status_2(tmp_path, weights, capsys):
    for argv, words in _mistakes(tmp_path, weights):
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"vgg-flax {argv[0]}: error: "), (argv, err)
        assert words in err and "Traceback" not in err, (argv, err)


_WARNS = """
import sys, warnings
from vgg_flax.cli import errors
def warns():
    warnings.warn("no preprocessor.json: storing\\n the 'torchvision' preset", UserWarning)
    warnings.warn("old API", DeprecationWarning)
    return 0
sys.exit(errors.run_command("vgg-flax convert", warns, debug=sys.argv[1] == "debug"))
"""


def test_user_warnings_are_one_stderr_line_unless_debug():
    # A child process: pytest records warnings instead of formatting them.
    out = {mode: subprocess.run([sys.executable, "-W", "always", "-c", _WARNS, mode], capture_output=True,
                                text=True, timeout=120) for mode in ("plain", "debug")}
    lines = out["plain"].stderr.splitlines()
    assert out["plain"].returncode == 0 and lines[0] == ("vgg-flax convert: warning: no preprocessor.json: "
                                                         "storing the 'torchvision' preset"), lines
    assert "DeprecationWarning: old API" in out["plain"].stderr  # other categories: Python's format
    assert "UserWarning: no preprocessor.json" in out["debug"].stderr


def test_debug_shows_the_traceback(tmp_path, weights):
    for argv, _ in _mistakes(tmp_path, weights):
        with pytest.raises((ValueError, KeyError, OSError)):
            cli.main([*argv, "--debug"])


def test_installed_command_exit_status_and_debug_traceback(tmp_path):
    argv = [sys.executable, "-m", "vgg_flax.cli", "eval", "--weights", str(tmp_path / "missing.safetensors"),
            "--dataset", "x"]
    quiet = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and len(quiet.stderr.splitlines()) == 1, quiet.stderr
    loud = subprocess.run([*argv, "--debug"], env=ENV, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "missing.safetensors" in loud.stderr


def test_packaged_configs_by_name_or_path():
    path = train_app.config_path("vgg11")
    assert path == os.path.join(os.path.dirname(vgg_flax.configs.__file__), "vgg11.py")
    assert os.path.isfile(path)
    assert train_app.config_path("configs/vgg11.py") == "configs/vgg11.py"  # a path stays a path
    assert train_app.config_path("imagenet_vgg16:arg") == train_app.config_path("imagenet_vgg16") + ":arg"
    assert {"default", "imagenet_vgg16", "vgg11", "vgg16", "vgg19", "finetune"} <= set(train_app.CONFIG_NAMES)
    assert train_app.resolve_config_names(["--config", "vgg16", "--config=finetune", "--workdir", "d"]) == [
        "--config", train_app.config_path("vgg16"), f"--config={train_app.config_path('finetune')}",
        "--workdir", "d"]
    with pytest.raises(train_app.app.UsageError, match="no config named 'vgg17' .*vgg16"):
        train_app.config_path("vgg17")


def _train_py(tmp_path, *flags, cwd=None):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(tmp_path / "w"), *flags]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd or tmp_path)


@pytest.mark.parametrize("flags, words", [
    (("--config", "finetune", "--config.num_train_steps=0"), "config.num_train_steps must be positive"),
    (("--config", "vgg17"), "no config named 'vgg17'"),
    (("--config.optim.name=adamm",), "unknown optimizer 'adamm'"),
    (("--config.num_train_steps=ten",), "flag --config.num_train_steps=ten: invalid literal"),
    (("--config.no_such_key=1",), "no_such_key"),
])
def test_training_program_mistakes_are_one_line(tmp_path, flags, words):
    out = _train_py(tmp_path, *flags)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr[-3000:]
    assert not os.path.exists(tmp_path / "w")  # refused before creating anything


def test_training_program_unknown_dataset_and_locked_workdir(tmp_path):
    out = _train_py(tmp_path, "--config.data.dataset=no_such_dataset")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr[-3000:]
    assert "dataset 'no_such_dataset'" in out.stderr
    with lock.WorkdirLock(str(tmp_path / "w")):
        out = _train_py(tmp_path)
        assert out.returncode == 2, out.stderr[-3000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"train: error: workdir {tmp_path / 'w'} is in use by pid {os.getpid()} on "
            f"{socket.gethostname()} (started "), out.stderr[-3000:]
        assert os.listdir(tmp_path / "w") == [workdir_lib.LOCK_FILE]  # no step, no file written


@pytest.mark.parametrize("nan_at, says", [(1, "no checkpoint yet"),
                                          (5, "the checkpoint of step 4 is intact")])
def test_nan_loss_names_the_checkpoint_kept(tmp_path, nan_at, says):
    with pytest.raises(training.NonFiniteLossError, match=f"at step {nan_at}; {says}$"):
        training.train_and_evaluate(tiny_config(), str(tmp_path), datasets=FakeDatasets(nan_at_step=nan_at))


def test_corrupt_checkpoint_fallback_is_one_warning_line(tmp_path):
    """Array data damaged (not the metadata): orbax's error carries the whole TensorStore spec, and
    the reads gathered with the failing one died after the warning as asyncio tracebacks ("Event
    loop is closed", "Exception ignored in coroutine ..."). The fallback run, through the training
    program's entry point on 8 devices (8 reads per array), prints the warning and nothing else."""
    training.train_and_evaluate(tiny_config(), str(tmp_path), datasets=FakeDatasets())
    data = tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
    for f in os.listdir(data):
        (data / f).write_bytes(b"\x00garbage")
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "VGG_FLAX_COMPILATION_CACHE": "off"}
    cmd = [sys.executable, HARNESS, str(tmp_path), str(tmp_path / "unused.npz"), "{}", "--entry"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at step 4" in out.stdout, out.stdout
    warnings = [line for line in out.stderr.splitlines() if "unreadable" in line]
    assert len(warnings) == 1, out.stderr[-3000:]
    assert "checkpoint step 6" in warnings[0] and warnings[0].endswith("falling back to the previous one")
    noise = ("Traceback", "Event loop is closed", "Exception ignored", "_read_array_index_and_device_put",
             "never retrieved", "destroyed but it is pending", "TensorStore(")
    assert [n for n in noise if n in out.stderr] == [], out.stderr[-3000:]


def test_interrupted_training_exit_status_is_128_plus_the_signal_and_one_line(caplog):
    """What train.py exits with: SIGTERM 143 and SIGINT 130 after the loop saved (the step named),
    a Ctrl-C outside the steps (setup, compilation) 130 with one line, not a KeyboardInterrupt
    traceback. The signals themselves: tests/train/test_training.py (SIGTERM through this entry point)."""
    def stopped(signum):
        def train():
            raise training.Interrupted(signum, 4)
        return train

    def ctrl_c():
        raise KeyboardInterrupt

    for train, status, says in [
            (stopped(15), 143, "stopped by signal 15 after saving step 4"),
            (stopped(2), 130, "stopped by signal 2 after saving step 4"),
            (ctrl_c, 130, "stopped by signal 2 outside the training steps: nothing unsaved")]:
        caplog.clear()
        try:
            assert train_app.exit_status(train) == status
        except KeyboardInterrupt:  # escaping, it would end the pytest session
            pytest.fail("KeyboardInterrupt escaped: a traceback, not one line")
        assert [r.getMessage() for r in caplog.records] == [says]


def test_importing_the_cli_runs_nothing_and_loads_no_training_loop():
    """cli.errors names the training errors without importing the loop (every subcommand would pay
    for orbax and the input pipeline), and train_app defines its flags without exiting on a bad
    --config.KEY in sys.argv at import (it is reported when the program runs)."""
    code = ("import sys; sys.argv = ['train.py', '--config.no_such_key=1']\n"
            "import vgg_flax.cli.main\n"
            "assert 'vgg_flax.train.loop' not in sys.modules and 'orbax.checkpoint' not in sys.modules\n"
            "import vgg_flax.cli.train_app\n"
            "print('imported')")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr[-3000:]
