# Sourced by scripts/*.sh: create .venv and install the project with the given extra, once.
# Re-installs when pyproject.toml or the no-deps line below changes (both are in .venv/.vgg_flax_installed).
extra="${1:-train}"
python_bin="${PYTHON:-python3}"
# The dev extra's keras-hub (tests/convert/test_keras_hub.py), installed without its requirements:
# they pull tensorflow-text and with it the full `tensorflow` beside our tensorflow-cpu. Beyond what
# the dev extra installs (keras, absl-py, numpy, packaging, rich, huggingface_hub), keras_hub 0.32
# imports only regex and tokenizers; kagglehub, sentencepiece and tensorflow-text are optional imports.
nodeps=""
if [ "$extra" = "dev" ]; then
  nodeps="keras-hub==0.32.0 regex==2026.12.2 tokenizers==0.23.3"
fi
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.vgg_flax_installed"
want="$extra $(sha256sum pyproject.toml | cut -c1-16)${nodeps:+ $nodeps}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extra]"
  if [ -n "$nodeps" ]; then
    # shellcheck disable=SC2086  # one argument per requirement
    .venv/bin/python -m pip install -q --no-deps $nodeps
  fi
  echo "$want" > "$stamp"
fi
