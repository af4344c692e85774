"""Every dotted `vgg_flax.` name in the package's docstrings and comments, docs/ and the README
resolves to a module or an attribute of one (a stale name after a move fails here)."""

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = re.compile(r"(?<![\w./-])vgg_flax(?:\.[A-Za-z_]\w*)+")


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _dotted_names() -> dict[str, set[str]]:
    files = [*(ROOT / "vgg_flax").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    found: dict[str, set[str]] = {}
    for path in files:
        for match in NAME.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(match.group(0), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_dotted_name_in_docstrings_and_docs_resolves():
    names = _dotted_names()
    assert "vgg_flax.data.pipeline.create_dataset" in names  # the scan sees the docs
    stale = {name: sorted(where) for name, where in names.items() if not _resolves(name)}
    assert stale == {}


def test_a_stale_name_is_caught():
    assert not _resolves("vgg_flax.input_pipeline.create_dataset")
    assert not _resolves("vgg_flax.train.steps.eval_step")
    assert _resolves("vgg_flax.train.steps.train_step") and _resolves("vgg_flax.nnx.vgg16")
