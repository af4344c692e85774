"""sha256 of weight files and the hash prefix torchvision-style names carry (`vgg16-397923af.pth`)."""

from __future__ import annotations

import hashlib
import os
import re

from vgg_flax.convert.errors import ConversionError

# torch.hub's rule (HASH_REGEX): the hex run between the last "-" and the extension.
_HASH_PREFIX = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: list[str | os.PathLike]) -> str:
    """One sha256 for several files: that of their `sha256sum` lines ("HASH  NAME\n", by base name)."""
    lines = sorted(f"{file_sha256(p)}  {os.path.basename(os.fspath(p))}\n" for p in paths)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


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
