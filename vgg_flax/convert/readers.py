"""State dicts from untrusted files, as numpy: safetensors, torch.save (zip or legacy), wrappers.

Reading is the only place where untrusted bytes meet the library, so it is strict:

- `.safetensors` is read from its documented layout (JSON header, raw data) with plain reads, one
  tensor at a time: no torch needed, no code execution possible.
- `.pth` / `.pt` / `.bin` is read by `torch_pickle`, a restricted unpickler that builds only
  tensors and plain containers (no torch needed): a pickle that asks for anything else is refused
  before any of it runs.
- Checkpoint wrappers (`{"state_dict": ...}`) and `module.` prefixes (DataParallel) are removed.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_flax.convert import torch_pickle
from vgg_flax.convert.errors import ConversionError

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Checkpoint wrappers seen in the wild around a bare state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_DP_PREFIX = "module."  # torch.nn.DataParallel / DistributedDataParallel wrappers
# safetensors dtype names -> numpy dtypes (bfloat16 / float8 from ml_dtypes, a jax dependency).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A state dict as {key: numpy array}, from a file or an in-memory mapping.

    Args:
      source: a `.pth`/`.pt`/`.bin` (torch.save) or `.safetensors` path, or a mapping from key to
        torch tensor / numpy array. Files are not hash-checked here (see `hashing`).
    Returns:
      {key: array}: numpy arrays (sharing torch tensors' memory where numpy can view it), or for
      safetensors files `FileTensor`s, which read their data when `np.asarray` is called on them.
    """
    if isinstance(source, Mapping):
        return _unwrap({str(k): v for k, v in source.items()}, where="the state dict")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path}")
    if path.endswith(SAFETENSORS_SUFFIXES):
        return dict(read_safetensors(path))
    if path.endswith(TORCH_SUFFIXES):
        return _unwrap(read_torch(path), where=path)
    raise ConversionError(f"{path}: unknown weight file type; expected one of "
                          f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}")


def read_torch(path: str | os.PathLike) -> Any:
    """A torch.save file's object (tensors as numpy), refusing anything but tensors and containers."""
    path = os.fspath(path)
    try:
        return torch_pickle.load(path)
    except torch_pickle.UnsafePickleError as e:
        raise ConversionError(
            f"{path}: refused: the pickle asks for Python objects other than tensors, so it was not "
            f"loaded and none of its code ran ({str(e).splitlines()[0]})") from e
    except ConversionError as e:
        raise ConversionError(f"{path}: not a readable torch.save file (truncated or corrupt?): {e}") from e
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError,
            IndexError, AttributeError) as e:
        raise ConversionError(f"{path}: not a readable torch.save file (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


class FileTensor:
    """A tensor inside a safetensors file, read on demand with a plain read (`np.asarray(t)`).

    Reading lazily, one tensor at a time and without a memory map, keeps conversion's peak memory
    near the size of the converted weights instead of twice it (mapped pages count as resident).
    """

    def __init__(self, path: str, dtype: np.dtype, shape: tuple[int, ...], offset: int):
        self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset
        self.ndim = len(shape)

    def __array__(self, dtype=None, copy=None):
        value = self.rows(0, self.shape[0] if self.shape else 1).reshape(self.shape)
        return value if dtype is None else value.astype(dtype)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis (the whole tensor for a scalar)."""
        row = int(np.prod(self.shape[1:]))
        count = (stop - start) * row
        value = np.fromfile(self.path, dtype=self.dtype, count=count,
                            offset=self.offset + start * row * self.dtype.itemsize)
        if value.size != count:
            raise ConversionError(f"{self.path}: truncated: a tensor ends past the end of the file")
        return value.reshape((stop - start, *self.shape[1:]))


def read_safetensors(path: str) -> dict[str, FileTensor]:
    """The tensors of a safetensors file (format: u64 header size, JSON header, raw data), lazily."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy)

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 2 <= header_len <= min(size - 8, 100 << 20):
                raise ValueError(f"header size {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
        start, tensors = 8 + header_len, {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != int(np.prod(shape)) * dtype.itemsize or start + end > size:
                raise ValueError(f"tensor {key!r} {shape} {info['dtype']} needs bytes {begin}..{end} "
                                 f"of {size - start} data bytes")
            tensors[key] = FileTensor(path, dtype, shape, start + begin)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if not tensors:
        raise ConversionError(f"{path}: the safetensors file holds no tensors")
    return tensors


def _unwrap(obj: Any, where: str) -> dict[str, np.ndarray]:
    """Finds the state dict inside common checkpoint wrappers and turns every value into numpy."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], where)
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{where}: expected a non-empty state dict (str -> tensor), found "
                              f"{type(obj).__name__}")
    strip = all(str(k).startswith(_DP_PREFIX) for k in obj)
    return {(k[len(_DP_PREFIX):] if strip else k): _to_numpy(v, k, where) for k, v in obj.items()}


def _to_numpy(value: Any, key: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen those
        t = value.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):
            t = t.float()
        return t.numpy()
    if np.isscalar(value):
        return np.asarray(value)
    raise ConversionError(f"{where}: key {key!r} holds a {type(value).__name__}, not a tensor or array")
