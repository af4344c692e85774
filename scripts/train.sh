#!/usr/bin/env bash
# The README's main-job command: install (into .venv, once) and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh train
exec .venv/bin/vgg-flax models "$@"
