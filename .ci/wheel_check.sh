#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it with the `train` extra into a fresh
# venv outside the checkout and train a few steps of the packaged `default` config from an empty
# temporary directory, so a file missing from the wheel (a config, the embedded data, class names)
# fails CI. Downloads come from pip's cache after the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# setuptools stages the package in ./build: a stale copy there could hide a file the wheel lacks.
rm -rf build
"$python_bin" -m pip wheel --no-deps -q -w "$tmp/dist" .
rm -rf build
"$python_bin" -m venv "$tmp/venv"
wheel="$(ls "$tmp"/dist/vgg_flax-*.whl)"
"$tmp/venv/bin/python" -m pip install -q "$wheel[train]"
cd "$tmp"
# No checkout on the path: only the installed package can answer.
env -u PYTHONPATH "$tmp/venv/bin/vgg-flax" train --workdir "$tmp/w" --config default \
  --config.num_train_steps=4 --config.eval.every_steps=4 --config.checkpoints.every_steps=4
env -u PYTHONPATH "$tmp/venv/bin/vgg-flax" plot "$tmp/w"
test -s "$tmp/w/metrics.jsonl" && test -d "$tmp/w/checkpoints/4" && test -s "$tmp/w/curves.png"
echo "wheel check: $(basename "$wheel") installed and trained from $tmp"
