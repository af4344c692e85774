"""A folder of class-named subfolders of images (torchvision's ImageFolder layout) as a dataset.

    root/train/cat/001.jpg, root/train/dog/002.png, root/val/cat/...   (split = subfolder), or
    root/cat/001.jpg ...                                                 (split "train" or "all")

Labels are the sorted class-folder names' indices (as torchvision's ImageFolder). Every file with an
image extension is checked once by `scan_folder` (PIL; JPEGs in fast draft mode); files PIL cannot
decode are skipped and listed in `FolderIndex.skipped`, so that a long run never dies on one bad JPEG
and split sizes stay exact. `load_rgb` converts grayscale, palette, RGBA, CMYK and 16-bit images to RGB
as torchvision's loader does (`Image.convert("RGB")`). Pure Python and PIL: TensorFlow is only touched
by the pipeline that reads the index.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_NAMES = ("train", "validation", "val", "test")
_SLICE = re.compile(r"^(?P<base>[\w-]+)(\[(?P<start>-?\d*%?):(?P<end>-?\d*%?)\])?$")


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The readable images of one split folder.

    Attributes:
      directory: the folder whose subfolders are the classes.
      class_names: sorted class-folder names; label i is class_names[i].
      files: readable image paths, sorted by (class, file name).
      labels: int32[len(files)].
      skipped: (path, reason) of every image-extension file that could not be decoded.
    """

    directory: str
    class_names: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray
    skipped: tuple[tuple[str, str], ...]


def load_rgb(path: str) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of any PIL-readable image; raises on unreadable files."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits.
            wide = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(wide.max()), 1.0)
            gray = np.clip(np.round(wide * 255.0 / peak), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        with warnings.catch_warnings():  # "Palette images with transparency ..." is expected here.
            warnings.simplefilter("ignore")
            rgb = image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)


def split_directory(root: str, split: str) -> tuple[str, str]:
    """(class folder, slice spec) for a split such as "train", "val[:100]" or "train[10%:]"."""
    match = _SLICE.match(split)
    if not match:
        raise ValueError(f"bad split {split!r} for folder {root!r}: expected NAME or NAME[start:end]")
    base = match.group("base")
    candidate = os.path.join(root, base)
    if os.path.isdir(candidate) and _has_class_folders(candidate):
        directory = candidate
    elif base in ("train", "all") and _has_class_folders(root) and not split_folders(root):
        directory = root
    else:
        raise FileNotFoundError(f"no split folder {candidate!r} with class subfolders (a root with class "
                                "folders directly is only the split 'train' or 'all')")
    return directory, split[len(base):]


def split_folders(root: str) -> list[str]:
    """The usual split names that exist as subfolders of root (then root is not a class folder)."""
    return [name for name in SPLIT_NAMES if os.path.isdir(os.path.join(root, name))]


def _has_class_folders(path: str) -> bool:
    return any(e.is_dir() for e in os.scandir(path))


def apply_slice(n: int, spec: str) -> slice:
    """The index range of a TFDS-style slice spec ("", "[:100]", "[10%:]", "[-50:]") of n examples."""
    if not spec:
        return slice(0, n)
    start, end = spec[1:-1].split(":")

    def bound(text, default):
        if not text:
            return default
        if text.endswith("%"):
            return int(round(int(text[:-1]) * n / 100.0))
        return int(text)

    return slice(*slice(bound(start, 0), bound(end, n)).indices(n)[:2])


def check_image(path: str) -> str | None:
    """None if PIL decodes the file, else why not. JPEGs are decoded in draft mode (scaled 1/8 in the
    DCT domain): every compressed byte is still read, so truncation and corruption show, for a fraction
    of the cost of a full decode."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))  # No-op for formats other than JPEG.
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files.
        return f"{type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=16)
def scan_folder(directory: str) -> FolderIndex:
    """Lists and checks every image once (in threads; PIL decodes without the GIL); unreadable ones are
    skipped and recorded."""
    from concurrent.futures import ThreadPoolExecutor

    class_names = tuple(sorted(e.name for e in os.scandir(directory) if e.is_dir()))
    if not class_names:
        raise FileNotFoundError(f"{directory!r} has no class subfolders")
    candidates = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(directory, name)
        for file_name in sorted(os.listdir(class_dir)):
            path = os.path.join(class_dir, file_name)
            if file_name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                candidates.append((path, label))
    with ThreadPoolExecutor(max_workers=min(32, 2 * (os.cpu_count() or 1))) as pool:
        problems = list(pool.map(check_image, [path for path, _ in candidates]))
    files = [(path, label) for (path, label), problem in zip(candidates, problems, strict=True)
             if problem is None]
    skipped = [(path, problem) for (path, _), problem in zip(candidates, problems, strict=True) if problem]
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) skipped under {directory!r}, e.g. "
                      f"{skipped[0][0]} ({skipped[0][1]})", stacklevel=2)
    return FolderIndex(directory=directory, class_names=class_names, files=tuple(p for p, _ in files),
                       labels=np.asarray([label for _, label in files], np.int32), skipped=tuple(skipped))


def folder_split(root: str, split: str) -> tuple[FolderIndex, slice]:
    """The index of a split's folder and the slice of it that `split` selects."""
    directory, spec = split_directory(root, split)
    index = scan_folder(os.path.abspath(directory))
    return index, apply_slice(len(index.files), spec)
