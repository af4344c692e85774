"""torch.save files (zip archives and the legacy pre-1.6 stream) read into numpy, without torch.

A `torch.save` file is a pickle whose tensors point, through persistent ids, at raw storages kept
beside it: records `<archive>/data/<key>` of a zip archive, or for the legacy format (torchvision's
2017 VGG files) a stream of pickles (magic number, protocol 1001, system info, the object, the
storage keys) followed by each storage as int64 element count + raw little-endian bytes.

The unpickler resolves only the globals that build tensors and their containers, the subset of
`torch.load(weights_only=True)`'s allowlist a state dict needs: `collections.OrderedDict`,
`torch._utils._rebuild_tensor{,_v2}` / `_rebuild_parameter` and the typed storage classes. Any other
global (`builtins.open`, `os.system`, a custom class) stops the load before it is called: pickle
only ever calls what `find_class` returns, so a refused payload never runs.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

from vgg_flax.convert.errors import ConversionError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_READ_CHUNK = 16 << 20
# torch's typed storage classes -> numpy dtype names (bfloat16 from ml_dtypes, a jax dependency).
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
                  "BoolStorage": "bool"}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (nothing it asked for was called)."""


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_tensor(_v2): a strided view of the storage, as torch builds it."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not size:
        return storage[offset:offset + 1].reshape(())
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if 0 in size:
        return np.empty(size, storage.dtype)
    if offset < 0 or min(stride) < 0 or needed > storage.size:
        raise ConversionError(f"a tensor of size {size} and stride {stride} at offset {offset} "
                              f"overruns its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                           [s * storage.itemsize for s in stride], writeable=False)
    return view


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {("collections", "OrderedDict"): _ordered_dict,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


class _Unpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals and storage classes; storages come from `load_storage`."""

    def __init__(self, file: BinaryIO, load_storage):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise UnsafePickleError(f"Unsupported global: GLOBAL {module}.{name} is not a tensor, "
                                "storage or plain container")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"Unsupported persistent id {str(pid)[:80]}")
        return self._load_storage(*pid[1:])


def load(path: str | os.PathLike) -> Any:
    """The object a torch.save file holds, with every tensor as a (read-only) numpy array.

    Raises:
      UnsafePickleError: a global other than tensors' and containers' is asked for.
      ConversionError / pickle.UnpicklingError / EOFError / ValueError: a truncated or corrupt file.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _load_zip(archive)
    with open(path, "rb") as f:
        return _load_legacy(f)


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ConversionError(f"a zip archive but not a torch.save file (data.pkl records: {pickles})")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = prefix + "byteorder"
    big = byteorder in archive.namelist() and archive.read(byteorder) == b"big"
    storages: dict[str, np.ndarray] = {}

    def load_storage(kind: _StorageType, key, location, numel):
        if key not in storages:
            name = f"{prefix}data/{key}"
            size = archive.getinfo(name).file_size
            array = np.empty(size // kind.dtype.itemsize, kind.dtype.newbyteorder(">") if big else kind.dtype)
            with archive.open(name) as member:
                if _read_into(member, array) != array.nbytes:
                    raise ConversionError(f"storage {key} is cut short: the file is truncated")
            storages[key] = array.astype(kind.dtype) if big else array
        return storages[key]

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _load_legacy(f: BinaryIO) -> Any:
    header = [_Unpickler(f, None).load() for _ in range(3)]  # magic, protocol, system info
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL or not isinstance(header[2], dict):
        raise ConversionError("not a torch.save file (no torch magic number; a tar-format file from "
                              "torch < 0.4 is not supported)")
    if not header[2].get("little_endian", True):
        raise ConversionError("a big-endian legacy torch.save file is not supported")
    roots: dict[str, np.ndarray] = {}
    views: dict[str, np.ndarray] = {}

    def load_storage(kind: _StorageType, key, location, numel, view_metadata=None):
        if key not in roots:
            roots[key] = np.empty(int(numel), kind.dtype)
        if view_metadata is None:
            return roots[key]
        view_key, offset, view_size = view_metadata
        views.setdefault(view_key, roots[key][int(offset):int(offset) + int(view_size)])
        return views[view_key]

    obj = _Unpickler(f, load_storage).load()
    keys = _Unpickler(f, None).load()
    for key in keys:
        _read_storage(f, roots[str(key)], key)
    return obj


def _read_storage(f: BinaryIO, storage: np.ndarray, key) -> None:
    numel = int.from_bytes(f.read(8), "little")
    if numel != storage.size:
        raise ConversionError(f"storage {key}: {numel} elements in the file, {storage.size} expected")
    if _read_into(f, storage) != storage.nbytes:
        raise ConversionError(f"storage {key} is cut short: the file is truncated")


def _read_into(f: BinaryIO, array: np.ndarray) -> int:
    """Fills `array` from `f` in 16 MiB reads (one huge buffered readinto is several times slower)."""
    view, done = memoryview(array.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        got = f.readinto(view[done:done + _READ_CHUNK])
        if not got:
            break
        done += got
    return done
