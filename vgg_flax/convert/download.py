"""Downloads into the cache that lose nothing: temp name, sha256 check, atomic rename, resume.

A file is written to `<name>.part`, resumed with an HTTP Range request where the server allows it
(after a cut connection, within the call and on the next call), checked against the expected size
and sha256 prefix, and only then renamed into place: a cut, short or substituted download never
leaves a file under the real name. Environment:

    VGG_FLAX_HOME     the cache (default ~/.cache/vgg_flax); `cache_dir=` wins
    TORCH_HOME        torch hub's cache (default ~/.cache/torch): files in hub/checkpoints/ are
                      used in place (hash-checked), never downloaded again
    VGG_FLAX_MIRROR   replaces torchvision's download base (air-gapped mirrors, tests)
    VGG_FLAX_OFFLINE  1: never touch the network; a missing file is an error naming the place
"""

from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.error
import urllib.request

from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.hashing import file_sha256

_CHUNK = 1 << 20
_ATTEMPTS = 3  # a cut connection is resumed this many times within one call


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """cache_dir, else $VGG_FLAX_HOME, else ~/.cache/vgg_flax."""
    root = cache_dir or os.environ.get("VGG_FLAX_HOME") or os.path.join("~", ".cache", "vgg_flax")
    return os.path.expanduser(os.fspath(root))


def torch_hub_file(name: str) -> str:
    """Where torch.hub keeps a downloaded checkpoint of this file name."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join("~", ".cache", "torch")
    return os.path.join(os.path.expanduser(torch_home), "hub", "checkpoints", name)


def offline() -> bool:
    return os.environ.get("VGG_FLAX_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def mirrored(url: str, base: str) -> str:
    """`url` with `base` replaced by $VGG_FLAX_MIRROR when it is set."""
    mirror = os.environ.get("VGG_FLAX_MIRROR")
    if mirror and url.startswith(base + "/"):
        return mirror.rstrip("/") + url[len(base):]
    return url


def check_file(path: str, what: str, sha256_prefix: str | None, fate: str = "it was not kept") -> str:
    """The file's sha256 when it starts with the prefix; otherwise ConversionError naming `what`
    (the URL or the file), both hashes and `fate` (what became of the file)."""
    digest = file_sha256(path)
    if sha256_prefix and not digest.startswith(sha256_prefix):
        raise ConversionError(f"{what}: sha256 {digest} does not start with the expected {sha256_prefix}: "
                              f"a corrupt or substituted file; {fate}")
    return digest


def fetch(url: str, destination: str, *, sha256_prefix: str | None = None,
          progress: bool = True) -> str:
    """Downloads `url` to `destination` (a file path), checked; returns its sha256.

    Raises:
      ConversionError: the connection failed or was cut `_ATTEMPTS` times (the `.part` file is kept
        for a later resume), or the size or sha256 is wrong (nothing kept). Each names the URL.
    """
    part = destination + ".part"
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            _download(url, part, progress)
            break
        except urllib.error.HTTPError as e:
            if e.code != 416 or attempt == _ATTEMPTS:  # 416: the .part is not a prefix; restart
                raise ConversionError(f"{url}: HTTP {e.code} {e.reason}") from e
            os.remove(part)
        except (OSError, http.client.HTTPException) as e:
            if attempt == _ATTEMPTS:
                got = os.path.getsize(part) if os.path.exists(part) else 0
                raise ConversionError(f"{url}: download failed after {got:,} bytes ({e}); {part} is "
                                      "kept so that the next call resumes it") from e
    try:
        digest = check_file(part, url, sha256_prefix)
    except ConversionError:
        os.remove(part)
        raise
    os.replace(part, destination)
    return digest


def _download(url: str, part: str, progress: bool) -> None:
    """One request: appends to `part` from where it stops (Range), or restarts it on a 200."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = _Progress(os.path.basename(url), total, have) if progress and sys.stderr.isatty() else None
        with open(part, "ab" if resumed else "wb") as f:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    if bar:
                        bar.update(have)
            except http.client.IncompleteRead as e:
                f.write(e.partial)
                have += len(e.partial)
        if bar:
            bar.close()
    if total is not None and have != total:
        raise ConnectionError(f"the connection closed at byte {have:,} of {total:,}")


class _Progress:
    """A one-line bar on stderr: percent, MB done of total, MB/s, ETA."""

    def __init__(self, name: str, total: int | None, start: int):
        self.name, self.total, self.start, self.t0, self.last = name, total, start, time.monotonic(), 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        text = f"\r{self.name}: {done / 1e6:,.1f} MB"
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            eta_text = time.strftime("%M:%S", time.gmtime(eta)) if eta < 360000 else "--:--"
            text += f" / {self.total / 1e6:,.1f} MB ({done / self.total:4.0%}) ETA {eta_text}"
        sys.stderr.write(f"{text}  {rate / 1e6:.1f} MB/s ")
        sys.stderr.flush()

    def close(self) -> None:
        self.update(self.total or 0, force=True) if self.total else None
        sys.stderr.write("\n")
