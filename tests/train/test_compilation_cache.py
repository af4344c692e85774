"""JAX's persistent compilation cache (vgg_flax.train.compilation_cache): where it goes, and that
enabling it writes compiled programs there that a later compilation reads back."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from vgg_flax.train import compilation_cache as perf

OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def jax_cache_options():
    """Puts JAX's cache options back afterwards, so no later test writes into a deleted directory."""
    old = {name: getattr(jax.config, name) for name in OPTIONS}
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    for var in (perf.ENV_VAR, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert perf.default_cache_dir() == str(tmp_path / "xdg" / "vgg_flax" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")
    assert perf.default_cache_dir() == "/jax/own"
    monkeypatch.setenv(perf.ENV_VAR, "/ours")  # ours comes first
    assert perf.default_cache_dir() == "/ours"
    for off in ("off", "OFF", "0", "", "none", "false"):
        monkeypatch.setenv(perf.ENV_VAR, off)
        assert perf.default_cache_dir() is None, off


def test_enabled_cache_writes_entries_that_a_recompilation_reads(tmp_path, monkeypatch, jax_cache_options):
    monkeypatch.setenv(perf.ENV_VAR, "off")
    before = jax.config.jax_compilation_cache_dir
    assert perf.enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir == before
    cache = tmp_path / "cache"
    assert perf.enable_compilation_cache(str(cache), min_compile_seconds=0) == str(cache)
    assert jax.config.jax_compilation_cache_dir == str(cache)
    events = []
    listener = lambda event, **_: events.append(event)
    jax.monitoring.register_event_listener(listener)
    try:
        f = jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)  # a program no other test compiles
        x = jnp.arange(7.0)
        expected = f(x)
        entries = [e for e in os.listdir(cache) if e.startswith("jit__lambda")]
        assert entries, os.listdir(cache)
        jax.clear_caches()  # the in-memory executables: the next call compiles again, from disk
        events.clear()
        assert jnp.array_equal(f(x), expected)
        assert "/jax/compilation_cache/cache_hits" in events, events
    finally:
        jax.monitoring.unregister_event_listener(listener)
