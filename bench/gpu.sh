#!/usr/bin/env bash
# VGG16 bf16 training on one GPU, ours vs PyTorch, same card, same run (under 8 minutes).
#
# For a machine with JAX (CUDA), flax, optax, orbax, PyTorch and torchvision preinstalled, no
# tensorflow, no ml_collections and no internet:
#   bash bench/gpu.sh [PEAK_TFLOPS]       # default 989: H100 SXM dense bf16; H200 is the same chip
#   bash bench/gpu.sh --dry-run           # the same script end to end on CPU, tiny sizes (~1 min)
# Prints, per batch size (128, 256): ours (vgg_flax.train.steps.train_step, dtype bfloat16, fp32 params)
# vs torchvision's vgg16 in eager mode (channels_last + autocast bf16) and under torch.compile;
# images/s, model FLOPs utilisation against PEAK_TFLOPS (VGG16 training ~92.8 GFLOP per image)
# and against a measured 8192^3 bf16 matmul, compile time and device memory. Importing tensorflow
# or ml_collections fails in every run (--block-imports), as it would on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PEAK="${1:-989}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# JAX and torch share the card: let JAX allocate on demand instead of taking 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMON=(--models vgg16 --dtype bfloat16 --channels-last --torch eager,compile --peak-tflops "$PEAK"
        --no-inference --block-imports tensorflow,ml_collections)
if [ "$DRY" = 1 ]; then
  echo "=== dry run on CPU: tiny sizes, same script and flags ==="
  BATCHES="2 4"; LIMIT=300
  SIZES=(--image-size 32 --head small --classes 10 --warmup 1 --repeats 2 --matmul-size 256 --threads 2)
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
else
  BATCHES="128 256"; LIMIT=220
  SIZES=(--image-size 224 --warmup 3 --repeats 10)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
fi
STATUS=0
for BATCH in $BATCHES; do
  echo "=== VGG16 bf16, batch $BATCH ==="
  timeout "$LIMIT" "$PY" bench/train_step.py --batch "$BATCH" "${COMMON[@]}" "${SIZES[@]}" \
    || { STATUS=$?; echo "batch $BATCH: failed or timed out (exit $STATUS)"; }
done
# The dry run fails loudly (a test runs it); the GPU run goes on to the next batch size instead.
[ "$DRY" = 1 ] && exit "$STATUS"
exit 0
