#!/usr/bin/env bash
# The README's main-job command: install (into .venv, once) and train configs/default.py (a small
# BatchNorm VGG on the embedded digits, no download) in runs/default. Extra arguments go to train.py,
# e.g. `bash scripts/train.sh --config.num_train_steps=1000`. Re-running resumes (or, when the run
# is finished, only reports); set WORKDIR to start elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh train
workdir="${WORKDIR:-runs/default}"
.venv/bin/python train.py --workdir "$workdir" "$@"
.venv/bin/vgg-flax plot "$workdir"   # training curves: $workdir/curves.png
