"""Weight files: reading PyTorch/safetensors state dicts safely, hash checks, the project's own format.

Reading is the only place where untrusted bytes meet the library, so it is strict:

- `.safetensors` is read from its documented layout (JSON header, raw data) with plain reads, one
  tensor at a time: no torch needed, no code execution possible.
- `.pth` / `.pt` / `.bin` is read with `torch.load(..., weights_only=True)` only: a pickle
  that asks for anything but tensors and plain containers is refused before any of it runs.
- torchvision-style names carry a sha256 prefix (`vgg16-397923af.pth`, as `torch.hub` checks); it is
  verified when present, and a mismatch is an error (a corrupt or substituted download).

The project's own format is one safetensors file whose keys are the Flax variable paths
(`params/conv1_1/kernel`) and whose metadata (JSON strings) carries the contract of the weights: the
model config, the preprocessing preset, the class names, the source file and its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import numpy as np

FORMAT = "vgg-flax.pretrained.v1"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
# torch.hub's rule (HASH_REGEX): the hex run between the last "-" and the extension.
_HASH_PREFIX = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")
# Checkpoint wrappers seen in the wild around a bare state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# VGG config fields stored with the weights (dtype is a run-time choice, not part of the weights).
MODEL_FIELDS = ("config", "batch_norm", "head", "num_classes", "dropout_rate", "fc_width",
                "small_head_width")


class ConversionError(ValueError):
    """A weight file or state dict that cannot be converted; the message names the key and shapes."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix(path: str | os.PathLike) -> str | None:
    """The sha256 prefix a torchvision-style file name carries (`vgg16-397923af.pth` -> '397923af')."""
    match = _HASH_PREFIX.search(os.path.basename(os.fspath(path)))
    return match.group(1) if match else None


def verify_hash_prefix(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """Checks a file against the hash prefix in its name.

    Returns:
      (prefix, sha256): the verified prefix and the file's sha256, or (None, None) when the name
      carries no prefix (then nothing is hashed, to keep loading fast).
    Raises:
      ConversionError: the file's sha256 does not start with the prefix.
    """
    prefix = hash_prefix(path)
    if prefix is None:
        return None, None
    sha256 = file_sha256(path)
    if not sha256.startswith(prefix):
        raise ConversionError(
            f"{os.fspath(path)}: sha256 {sha256} does not start with the hash prefix {prefix!r} in its "
            "name: the file is corrupt, truncated or not the file its name claims; download it again (or, if "
            "the name only looks like it carries a hash, pass verify_hash=False / --no-verify-hash)")
    return prefix, sha256


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A state dict as {key: numpy array}, from a file or an in-memory mapping.

    Args:
      source: a `.pth`/`.pt`/`.bin` (torch.save) or `.safetensors` path, or a mapping from key to
        torch tensor / numpy array. Files are not hash-checked here (see `verify_hash_prefix`).
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
        return dict(_read_safetensors(path))
    if path.endswith(TORCH_SUFFIXES):
        return _unwrap(_read_torch(path), where=path)
    raise ConversionError(f"{path}: unknown weight file type; expected one of "
                          f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}")


# safetensors dtype names -> numpy dtypes (bfloat16 / float8 from ml_dtypes, a jax dependency).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


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


def _read_safetensors(path: str) -> dict[str, FileTensor]:
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


def to_device(value: Any, dtype: Any, layout=None, shape: tuple[int, ...] | None = None) -> Any:
    """`layout(np.asarray(value)).reshape(shape)` as a jax array of `dtype`, with a single copy.

    `layout` is None (keep the layout) or a transpose that moves the source's first axis last (as
    every conversion rule does). The copy goes block by block of source rows (a `FileTensor` is
    read block by block too, so the source never exists whole), which also keeps the big fc1
    transpose cache-friendly. The destination is a 64-byte aligned host buffer that jax's CPU
    backend adopts without copying again (on accelerators it is the one host-to-device transfer).
    """
    import jax

    source = value if isinstance(value, FileTensor) else np.asarray(value)
    if source.ndim == 0:
        return jax.device_put(np.asarray(source, dtype))
    dtype = np.dtype(dtype)
    out_shape = source.shape if layout is None else layout(np.empty(source.shape, np.bool_)).shape
    nbytes = int(np.prod(out_shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    dst = raw[offset:offset + nbytes].view(dtype).reshape(out_shape)
    row_bytes = max(1, int(np.prod(source.shape[1:]))) * source.dtype.itemsize
    step = max(1, (2 << 20) // row_bytes)  # ~2 MiB of source per block
    for start in range(0, source.shape[0], step):
        stop = min(start + step, source.shape[0])
        block = source.rows(start, stop) if isinstance(source, FileTensor) else source[start:stop]
        if layout is None:
            dst[start:stop] = block
            continue
        # Permute within rows first (contiguous, row-local), then one strided 2-D style copy.
        block = np.ascontiguousarray(np.moveaxis(layout(block), -1, 0))
        dst[..., start:stop] = np.moveaxis(block, 0, -1)
    return jax.device_put(dst if shape is None else dst.reshape(shape))


def _read_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading torch.save files needs torch (pip install "
                              "'vgg-flax[torch]'), or convert it to .safetensors first") from e
    import pickle

    try:
        # weights_only=True: the unpickler only builds tensors and plain containers; any other
        # global (os.system, builtins.exec, a custom class) is refused before it is called.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refused: the pickle asks for Python objects other than tensors, so it was not "
            f"loaded and none of its code ran (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable torch.save file (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from e


def _unwrap(obj: Any, where: str) -> dict[str, np.ndarray]:
    """Finds the state dict inside common checkpoint wrappers and turns every value into numpy."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], where)
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{where}: expected a non-empty state dict (str -> tensor), found "
                              f"{type(obj).__name__}")
    prefix = "module."  # torch.nn.DataParallel / DistributedDataParallel wrappers
    strip = all(str(k).startswith(prefix) for k in obj)
    return {(k[len(prefix):] if strip else k): _to_numpy(v, k, where) for k, v in obj.items()}


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


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in torchvision's (and the weights') output order."""
    text = resources.files("vgg_flax").joinpath("data/imagenet_classes.txt").read_text("utf-8")
    names = text.splitlines()
    assert len(names) == 1000, len(names)
    return names


def flatten_variables(variables: Mapping[str, Any], leaf=np.asarray) -> dict[str, Any]:
    """{"params": {"conv1_1": {"kernel": x}}} -> {"params/conv1_1/kernel": leaf(x)}."""
    flat = {}

    def walk(tree, path):
        for name, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, path + (name,))
            else:
                flat["/".join(path + (name,))] = leaf(value)

    walk(variables, ())
    return flat


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_variables`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def model_config(model: Any) -> dict[str, Any]:
    """The JSON-able fields of a VGG module that, with the weights, rebuild it."""
    config = {name: getattr(model, name) for name in MODEL_FIELDS}
    if not isinstance(config["config"], str):
        config["config"] = [list(e) if isinstance(e, tuple) else e for e in config["config"]]
    return config


def check_variables(model: Any, variables: Mapping[str, Any], where: str) -> None:
    """Raises ConversionError unless `variables` has exactly the model's paths and shapes."""
    import jax
    import jax.numpy as jnp

    size = 224 if model.head in ("torchvision", "dense") else 32
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    expected = flatten_variables(shapes, leaf=lambda v: tuple(v.shape))
    found = flatten_variables(variables, leaf=lambda v: tuple(v.shape))
    problems = [f"missing {k} (expected shape {s})" for k, s in expected.items() if k not in found]
    problems += [f"unexpected {k} (shape {s})" for k, s in found.items() if k not in expected]
    problems += [f"{k}: expected shape {s}, found {found[k]}" for k, s in expected.items()
                 if k in found and found[k] != s]
    if problems:
        raise ConversionError(f"{where}: variables do not fit the model:\n  " + "\n  ".join(problems))


def save_pretrained(path: str | os.PathLike, model: Any, variables: Mapping[str, Any], *,
                    preprocessing: str = "torchvision", classes: list[str] | None = None,
                    source: str | None = None, source_sha256: str | None = None) -> None:
    """Writes weights with their contract to one safetensors file (see the module docstring).

    Args:
      model: the VGG module the variables belong to (its fields are stored as JSON).
      variables: {"params": ..., "batch_stats": ...} as returned by `load_torchvision` or training.
      preprocessing: the `vgg_flax.preprocessing` preset the weights expect.
      classes: class names in output order; None stores ImageNet's when num_classes == 1000.
      source, source_sha256: where the weights came from, for provenance.
    """
    from safetensors.numpy import save_file

    from vgg_flax import preprocessing as pp

    pp.get_preset(preprocessing)  # fail now on a misspelt preset, not at predict time
    check_variables(model, variables, where=os.fspath(path))
    if classes is None and model.num_classes == 1000 and model.head != "none":
        classes = imagenet_classes()
    if classes is not None and len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    metadata = {"format": FORMAT, "model": json.dumps(model_config(model)),
                "preprocessing": preprocessing, "classes": json.dumps(classes),
                "source": source or "", "source_sha256": source_sha256 or ""}
    flat = {k: np.ascontiguousarray(v) for k, v in flatten_variables(variables).items()}
    tmp = os.fspath(path) + ".tmp"
    save_file(flat, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under the real name


def pretrained_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a `save_pretrained` file: model, preprocessing, classes, source."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{os.fspath(path)}: not a readable safetensors file: {e}") from e
    if raw.get("format") != FORMAT:
        raise ConversionError(f"{os.fspath(path)}: not a vgg-flax pretrained file (format "
                              f"{raw.get('format')!r}, expected {FORMAT!r}); for torchvision/timm "
                              "files use load_torchvision")
    meta = dict(raw)
    meta["model"] = json.loads(raw["model"])
    meta["classes"] = json.loads(raw["classes"])
    return meta


def load_pretrained(path: str | os.PathLike, **overrides) -> tuple[Any, dict[str, Any]]:
    """Loads a `save_pretrained` file as (model, variables).

    Args:
      path: the .safetensors file.
      **overrides: VGG fields to change, e.g. head="dense" (same weights) or dtype=jnp.bfloat16.
    Returns:
      (VGG module, {"params": ..., "batch_stats": ...} of jax arrays).
    """
    from vgg_flax.models import VGG

    meta = pretrained_metadata(path)
    config = meta["model"]
    if isinstance(config["config"], list):
        config["config"] = tuple(tuple(e) if isinstance(e, list) else e for e in config["config"])
    model = VGG(**{**config, **overrides})
    flat = _read_safetensors(os.fspath(path))
    check_variables(model, unflatten_variables(flat), where=os.fspath(path))
    return model, unflatten_variables({k: to_device(v, v.dtype) for k, v in flat.items()})
