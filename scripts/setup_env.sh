# Sourced by scripts/*.sh: create .venv and install the project with the given extra, once.
# Re-installs when pyproject.toml changes (its hash is kept in .venv/.vgg_flax_installed).
extra="${1:-train}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.vgg_flax_installed"
want="$extra $(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extra]"
  echo "$want" > "$stamp"
fi
