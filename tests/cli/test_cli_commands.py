"""The `vgg-flax` subcommands doing their job, on values: `models` (every builder and its parameter
count), `train` (the real entry point on the embedded digits: a checkpoint, metrics, config.json
with the --config.KEY=VALUE overrides) and `plot` (a PNG from that run's metrics.jsonl)."""

import json
import os
import subprocess
import sys

import pytest

from vgg_flax import cli, models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torchvision's published counts (1000 classes) for its eight builders; vgg11_lrn is A (LRN has no
# parameters) and vgg16_c is D with 3x3 -> 1x1 in the third conv of blocks 3-5:
# 138,357,544 - 8 * (256 * 256 + 512 * 512 + 512 * 512) = 133,638,952.
PARAMS = {"vgg11": ("A", "no", 132_863_336), "vgg11_bn": ("A", "yes", 132_868_840),
          "vgg11_lrn": ("A-LRN", "no", 132_863_336), "vgg13": ("B", "no", 133_047_848),
          "vgg13_bn": ("B", "yes", 133_053_736), "vgg16_c": ("C", "no", 133_638_952),
          "vgg16": ("D", "no", 138_357_544), "vgg16_bn": ("D", "yes", 138_365_992),
          "vgg19": ("E", "no", 143_667_240), "vgg19_bn": ("E", "yes", 143_678_248)}


def test_models_lists_every_builder_with_its_parameter_count(capsys, monkeypatch):
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["builder", "config", "bn"]
    rows = {cols[0]: (cols[1], cols[2], int(cols[3].replace(",", ""))) for cols in map(str.split, lines[1:])}
    assert rows == PARAMS and list(rows) == list(models.MODELS)
    # --num-classes reaches the classifier: fc3 is 4096 x 10 + 10 instead of 4096 x 1000 + 1000.
    monkeypatch.setattr(models, "MODELS", {"vgg16": models.MODELS["vgg16"]})
    assert cli.main(["models", "--num-classes", "10"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["vgg16", "D", "no", "134,301,514"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`python -m vgg_flax.cli train` on the digits (built locally into a temporary data_dir)."""
    tmp = tmp_path_factory.mktemp("train")
    workdir, cache = tmp / "w", tmp / "cache"
    overrides = {"model.config": "8,M,16,M", "model.small_head_width": 0, "num_train_steps": 2,
                 "global_batch_size": 8, "eval.every_steps": 2, "eval.batch_size": 120,
                 "checkpoints.every_steps": 2, "log.every_steps": 1, "log.tensorboard": False,
                 "log.progress": "none", "schedule.warmup_steps": 0, "data.data_dir": str(tmp / "tfds")}
    cmd = [sys.executable, "-m", "vgg_flax.cli", "train", "--workdir", str(workdir),
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VGG_FLAX_COMPILATION_CACHE": str(cache)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, cache, out.stdout


def test_train_writes_a_checkpoint_metrics_and_the_config_it_ran(trained):
    workdir, cache, stdout = trained
    assert os.listdir(workdir / "checkpoints") == ["2"]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2]
    (ev,) = [r for r in rows if "eval_top1" in r]
    assert ev["step"] == 2 and 0 <= ev["eval_top1"] <= ev["eval_top5"] <= 1
    config = json.load(open(workdir / "config.json"))
    assert (config["model"]["config"], config["model"]["small_head_width"], config["num_train_steps"]) == \
        ("8,M,16,M", 0, 2)
    assert config["data"]["dataset"] == "sklearn_digits"  # the default config, overridden key by key
    assert "done      step 2" in stdout and "10 classes" in stdout
    assert cache.is_dir()  # VGG_FLAX_COMPILATION_CACHE: the program turned the cache on there


def test_plot_writes_a_png_of_the_run_s_metrics(trained, tmp_path, capsys):
    import matplotlib.image

    workdir = trained[0]
    assert cli.main(["plot", str(workdir)]) == 0
    default = capsys.readouterr().out.strip()
    assert default == str(workdir / "curves.png")
    out = tmp_path / "mine.png"
    assert cli.main(["plot", str(workdir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    for path in (default, out):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.05
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2  # no metrics.jsonl: one error line
    assert "nowhere" in capsys.readouterr().err
