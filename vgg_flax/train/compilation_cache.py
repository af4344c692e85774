"""Process-level speed settings: JAX's persistent compilation cache.

Why: compiling a VGG16 train step takes tens of seconds on a small CPU machine; with the persistent
cache a restarted run (resume after preemption, a second evaluation) loads the compiled executable
from disk instead. The cache is per user and configurable: an explicit directory, else the
`VGG_FLAX_COMPILATION_CACHE` environment variable ("off" disables it), else JAX's own
`JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/vgg_flax/jax` (`~/.cache/vgg_flax/jax`).
"""

from __future__ import annotations

import os

ENV_VAR = "VGG_FLAX_COMPILATION_CACHE"


def default_cache_dir() -> str | None:
    """The cache directory the environment asks for, or None when it is switched off."""
    value = os.environ.get(ENV_VAR, os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vgg_flax", "jax")


def enable_compilation_cache(cache_dir: str | None = None, *, min_compile_seconds: float = 1.0
                             ) -> str | None:
    """Turns on JAX's persistent compilation cache; returns the directory used (None: left off).

    Args:
      cache_dir: where to keep compiled executables; None for `default_cache_dir()`.
      min_compile_seconds: only programs that took at least this long to compile are stored, so the
        cache holds the train/eval steps rather than hundreds of tiny helper programs.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = cache_dir if cache_dir is not None else default_cache_dir()
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        # JAX opens its cache at the first compilation and keeps that directory: reopen it here.
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
