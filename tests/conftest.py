"""Import order guard: torchvision imported after TensorFlow segfaults here (both bundle their own
native libraries), so when torch is installed it is loaded before any test module imports TensorFlow."""

import importlib.util

if importlib.util.find_spec("torchvision") is not None:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
