#!/usr/bin/env bash
# VGG16 bf16 training on one GPU, ours vs PyTorch, same card, same run (under 8 minutes).
#
# For a machine with JAX (CUDA), PyTorch and torchvision preinstalled and no internet:
#   bash bench/gpu.sh [PEAK_TFLOPS]       # default 989: H100 SXM dense bf16; H200 is the same chip
# Prints, per batch size (128, 256): ours (vgg_flax.steps.train_step, dtype bfloat16, fp32 params)
# vs torchvision's vgg16 in eager mode (channels_last + autocast bf16) and under torch.compile;
# images/s, model FLOPs utilisation against PEAK_TFLOPS (VGG16 training ~92.8 GFLOP per image)
# and against a measured 8192^3 bf16 matmul, compile time and device memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK="${1:-989}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# JAX and torch share the card: let JAX allocate on demand instead of taking 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
for BATCH in 128 256; do
  echo "=== VGG16 bf16, batch $BATCH ==="
  timeout 220 "$PY" bench/train_step.py --models vgg16 --batch "$BATCH" --image-size 224 \
      --dtype bfloat16 --channels-last --torch eager,compile --warmup 3 --repeats 10 \
      --peak-tflops "$PEAK" --no-inference \
    || echo "batch $BATCH: failed or timed out (exit $?)"
done
