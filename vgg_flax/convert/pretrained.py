"""Pretrained VGGs in one call: `from_pretrained("vgg16")` and `list_pretrained()`.

A registry name or a URL is downloaded once (or found in torch hub's cache), converted once, and
kept in the cache as the project's safetensors format: every later load is a lazy read of that
file that needs neither the `.pth` parser nor the network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from vgg_flax.convert import download, engine, hub, registry
from vgg_flax.convert import format as wformat
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.hashing import hash_prefix, verify_hash_prefix
from vgg_flax.data.classes import imagenet_classes
from vgg_flax.models import MODELS

HEADS = engine.HEADS
# What conversion must know of a file that is not in a paper config's layout.
ARCH_FIELDS = ("config", "batch_norm", "num_classes", "fc_width")


def list_pretrained() -> list[dict[str, Any]]:
    """One row per registry entry: name, parameters, acc@1/acc@5, file size, URL, license, preset."""
    rows = []
    for e in registry.REGISTRY.values():
        rows.append({"name": e.name, "aliases": [a for a, n in registry.ALIASES.items() if n == e.name],
                     "params": e.params, "acc1": e.acc1, "acc5": e.acc5, "gmacs": e.gmacs,
                     "file_size_mb": e.file_size_mb, "url": e.url, "license": e.license,
                     "layout": e.layout, "preprocessing": e.preprocessing, "features_only": e.features_only,
                     "hub": e.hub and hub.PREFIX + e.hub})
    return rows


def from_pretrained(source: str | os.PathLike | Mapping[str, Any], *, head: str = "torchvision",
                    cache_dir: str | os.PathLike | None = None, progress: bool = True,
                    return_metadata: bool = False, **model_kwargs):
    """A pretrained VGG as (model, variables), by name, hub repo, URL, path or state dict.

    Args:
      source: a registry name (`list_pretrained()`: "vgg16", timm's "vgg16.tv_in1k",
        "vgg16.features"), "hf-hub:ORG/REPO", an http(s) URL of a torchvision-style file, a local
        file (torchvision/timm/Keras weights or a `save_pretrained` file), a keras-hub preset
        directory (`task.save_to_preset(dir)`) or a state dict.
      head: "torchvision", "dense" (same weights, dense evaluation) or "none" (features only).
      cache_dir: where downloads and converted weights live (default $VGG_FLAX_HOME or
        ~/.cache/vgg_flax).
      progress: a progress bar on stderr while downloading (only when stderr is a terminal).
      return_metadata: also return the weights' contract (preprocessing, classes, source,
        provenance, path), as `pretrained_metadata` reads it from a `save_pretrained` file.
      **model_kwargs: other VGG fields (dtype, dropout_rate, ...).
    Returns:
      (model, variables), or (model, variables, metadata) with return_metadata.
    """
    if head not in HEADS:
        raise ConversionError(f"head {head!r} has no pretrained weights; use one of {HEADS}")
    arch = {k: model_kwargs[k] for k in ARCH_FIELDS if k in model_kwargs}
    path = _resolve(source, cache_dir, progress, arch)
    if path is None or not _is_pretrained_file(path):
        model, variables, _, preset = engine.convert_source(
            source if path is None else path, head, **model_kwargs)
        meta = {"preprocessing": preset, "classes": imagenet_classes() if model.num_classes == 1000
                else None, "source": "the state dict" if path is None else os.fspath(path),
                "provenance": {}}
    else:
        meta = wformat.pretrained_metadata(path)
        stored = meta["model"]["head"]
        keep = head == "none" or stored == "none" or stored not in HEADS  # e.g. the small head
        model, variables = wformat.load_pretrained(path, head=stored if keep else head, **model_kwargs)
        if head == "none" and model.head != "none":
            variables = engine.without_head(variables, model.head)
            model = model.clone(head="none")
    meta["path"] = path  # the file the weights were read from (the cache's converted file)
    return (model, variables, meta) if return_metadata else (model, variables)


def _resolve(source, cache_dir, progress, arch) -> str | None:
    """A local file for `source` (downloading and converting into the cache); None for a mapping."""
    if isinstance(source, Mapping):
        return None
    text = os.fspath(source)
    if text.startswith(hub.PREFIX):
        return hub.hub_file(text)
    if text.startswith(("http://", "https://")):
        return _cached(text, None, cache_dir, progress, arch)
    if os.path.exists(text) or os.sep in text or text.endswith(engine.SUFFIXES):
        if not (os.path.isfile(text) or os.path.isdir(text)):  # a directory: a keras-hub preset
            raise FileNotFoundError(f"no weight file at {text}")
        return text
    entry = registry.get(text)
    builder = MODELS[entry.builder].keywords  # the file must be the architecture its entry names
    arch = {"config": builder["config"], "batch_norm": bool(builder.get("batch_norm")), **arch}
    return _cached(download.mirrored(entry.url, entry.base), entry, cache_dir, progress, arch)


def _is_pretrained_file(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return False
    try:
        wformat.pretrained_metadata(path)
    except ConversionError:
        return False
    return True


def converted_path(url: str, cache_dir=None) -> str:
    """The cache file of a URL's converted weights (its file name, plus the URL's hash if unhashed)."""
    name = os.path.basename(url.split("?")[0])
    stem = os.path.splitext(name)[0]
    if hash_prefix(name) is None:
        stem += "-url" + hashlib.sha256(url.encode()).hexdigest()[:12]
    return os.path.join(download.cache_root(cache_dir), "converted", stem + ".safetensors")


def _cached(url: str, entry: registry.Pretrained | None, cache_dir, progress, arch) -> str:
    """The converted weights of `url` in the cache: converting them once from a download."""
    converted = converted_path(url, cache_dir)
    if os.path.isfile(converted):
        return converted
    raw, downloaded = _raw_file(url, entry, cache_dir, progress)
    provenance = {"url": url, "name": entry.name if entry else None,
                  "license": entry.license if entry else None,
                  "acc1": entry.acc1 if entry else None, "acc5": entry.acc5 if entry else None}
    os.makedirs(os.path.dirname(converted), exist_ok=True)
    if entry is not None:  # the entry's contract, not a guess from the keys
        arch = {**arch, "layout": entry.layout, "preprocessing": entry.preprocessing}
    engine.convert_file(raw, converted, verify_hash=False, provenance=provenance, **arch)
    if downloaded:  # the converted file replaces it; torch hub's copy is the user's and stays
        os.remove(raw)
    return converted


def _raw_file(url: str, entry, cache_dir, progress) -> tuple[str, bool]:
    """(path of the checked torchvision file, whether we downloaded it) from a cache or the network."""
    name = entry.file if entry else os.path.basename(url.split("?")[0])
    prefix = hash_prefix(name)
    hub_copy = download.torch_hub_file(name)
    if os.path.isfile(hub_copy):
        verify_hash_prefix(hub_copy)
        return hub_copy, False
    target = os.path.join(download.cache_root(cache_dir), "downloads", name)
    if os.path.isfile(target):  # placed by hand (offline) or left by an interrupted conversion
        download.check_file(target, target, prefix, fate="it is left in place for you to inspect; "
                            "delete it to download the file again")
        return target, True
    if download.offline():
        raise ConversionError(f"VGG_FLAX_OFFLINE=1 and {name} is in no cache: download {url} and "
                              f"place it at {target} (or {hub_copy}), or unset VGG_FLAX_OFFLINE")
    download.fetch(url, target, sha256_prefix=prefix, progress=progress)
    return target, True
