"""bench/gpu.sh's step benchmark runs with tensorflow and ml_collections absent (as on the GPU
machine), ours alone at tiny sizes; the whole dry run (`bash bench/gpu.sh --dry-run`, with both torch
sides) takes minutes here and is documented in docs/PERFORMANCE.md instead."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_bench_runs_without_tensorflow_and_ml_collections():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--models", "vgg11",
           "--batch", "2", "--image-size", "32", "--head", "small", "--classes", "10",
           "--dtype", "bfloat16", "--warmup", "0", "--repeats", "1", "--matmul-size", "64",
           "--peak-tflops", "989", "--no-torch", "--no-inference",
           "--block-imports", "tensorflow,ml_collections"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| vgg11 | train |" in out.stdout and "ours % matmul" in out.stdout


def test_blocked_imports_are_absent():
    script = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import common; "
              "common.block_imports(['tensorflow', 'ml_collections']); "
              "assert importlib.util.find_spec('tensorflow') is None\n"
              "try:\n    import ml_collections\nexcept ModuleNotFoundError:\n    print('absent')")
    out = subprocess.run([sys.executable, "-c", script, os.path.join(ROOT, "bench")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "absent", out.stderr[-2000:]
