"""Session setup for the suite.

- Import order guard: torchvision imported after TensorFlow segfaults here (both bundle their own
  native libraries), so when torch is installed it is loaded before any test module imports TensorFlow.
- One persistent JAX compilation cache per test session, in a fresh temporary directory, shared by
  this process and the training programs the tests start: many tests compile the same programs (the
  same tiny model's init, train and eval steps), and a fresh directory keeps runs independent of each
  other and of the user's own cache. Set before any test module imports JAX (JAX reads these
  variables at import).
"""

import importlib.util
import os
import shutil
import tempfile

_JAX_CACHE = tempfile.mkdtemp(prefix="vgg_flax_tests_jax_cache_")
os.environ["VGG_FLAX_COMPILATION_CACHE"] = _JAX_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

if importlib.util.find_spec("torchvision") is not None:
    import torch  # noqa: F401
    import torchvision  # noqa: F401


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true (.ci/run) a skipped test fails the run: CI installs every extra, so a skip there
    is a missing dependency, not an optional one."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("CI") == "true" and exitstatus == 0 and skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped; failing the run", red=True)
        session.exitstatus = 1


def pytest_unconfigure(config):
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)
