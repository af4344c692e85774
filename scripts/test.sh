#!/usr/bin/env bash
# Install (into .venv, once) and run the whole test suite. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
exec .venv/bin/python -m pytest -q "$@"
