"""The torch-free .pth reader: bit-equal to torch.load(weights_only=True), and safe without torch."""

import collections
import pickle
import subprocess
import sys

import numpy as np
import pytest

from vgg_flax.convert import readers, torch_pickle
from vgg_flax.convert.errors import ConversionError

torch = pytest.importorskip("torch")

FORMATS = {"zip": True, "legacy": False}


def _tensors():
    """fp32/fp16/bf16/int64 tensors, a transposed view, a slice and two views of one storage."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    shared = torch.randn(40, generator=g)
    state = collections.OrderedDict()
    state["features.0.weight"] = torch.randn(4, 3, 3, 3, generator=g)
    state["half"] = torch.randn(5, 7, generator=g).half()
    state["bf16"] = torch.randn(3, 4, generator=g).bfloat16()
    state["transposed"] = base.t()
    state["slice"] = base[2:5, 1::2]
    state["shared_a"] = shared[:12].view(3, 4)
    state["shared_b"] = shared[10:30]
    state["scalar"] = torch.tensor(1234, dtype=torch.int64)
    state["empty"] = torch.zeros(0, 3)
    state["flags"] = torch.tensor([True, False])
    state["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    return state


def _save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _assert_bit_equal(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        value = value.detach()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: compare the bit patterns
            assert str(got[key].dtype) == "bfloat16", key
            assert np.array_equal(got[key].view(np.uint16), value.view(torch.int16).numpy().view(np.uint16))
            continue
        assert got[key].dtype == value.numpy().dtype and got[key].shape == tuple(value.shape), key
        assert np.array_equal(got[key], value.numpy(), equal_nan=True), key


@pytest.mark.parametrize("fmt", FORMATS)
def test_equal_to_torch_load_bit_for_bit(tmp_path, fmt):
    path = _save(_tensors(), tmp_path / "w.pth", fmt)
    expected = torch.load(path, weights_only=True)
    got = torch_pickle.load(path)
    assert type(got) is collections.OrderedDict
    _assert_bit_equal(got, expected)
    # Views keep sharing their storage, as torch's do.
    assert np.shares_memory(got["shared_a"], got["shared_b"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrap", ["state_dict", "module", "both"])
def test_wrappers_and_module_prefixes(tmp_path, fmt, wrap):
    state = _tensors()
    saved = state
    if wrap in ("module", "both"):
        saved = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
    if wrap in ("state_dict", "both"):
        saved = {"state_dict": saved, "epoch": 3, "arch": "vgg16"}
    path = _save(saved, tmp_path / "w.pth", fmt)
    _assert_bit_equal(readers.read_state_dict(path), state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_state_dict_with_metadata(tmp_path, fmt):
    """A module's state_dict() carries `_metadata` (set by BUILD on the OrderedDict)."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = _save(module.state_dict(), tmp_path / "w.pth", fmt)
    _assert_bit_equal(torch_pickle.load(path), torch.load(path, weights_only=True))


class _Payload:
    """A pickle whose unpickling calls open(marker, "w"): creating the file proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_globals_are_refused_before_they_run(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = _save({"w": torch.zeros(2), "x": _Payload(marker)}, tmp_path / "attack.pth", fmt)
    with pytest.raises(ConversionError, match=r"refused: .*none of its code ran \(Unsupported global: "
                                              r"GLOBAL _?io\.open"):
        readers.read_state_dict(path)
    assert not marker.exists()


def test_truncated_storage_is_an_error(tmp_path):
    path = _save(_tensors(), tmp_path / "w.pth", "legacy")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-100])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        readers.read_state_dict(tmp_path / "cut.pth")


# A meta-path finder that makes `import torch` (and everything under it) fail in the child.
_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def test_reading_and_refusal_without_torch(tmp_path):
    state = _tensors()
    for fmt in FORMATS:
        _save(state, tmp_path / f"{fmt}.pth", fmt)
        _save({"x": _Payload(tmp_path / f"ran_{fmt}")}, tmp_path / f"attack_{fmt}.pth", fmt)
    with open(tmp_path / "attack_plain.pth", "wb") as f:  # a bare pickle, not torch.save's
        pickle.dump({"x": _Payload(tmp_path / "ran_plain")}, f, protocol=2)
    code = _NO_TORCH + f"""
import numpy as np
from vgg_flax.convert import readers
from vgg_flax.convert.errors import ConversionError
for fmt in ("zip", "legacy"):
    s = readers.read_state_dict({str(tmp_path)!r} + f"/{{fmt}}.pth")
    bits = {{k: (v.view(np.uint16) if str(v.dtype) == "bfloat16" else v) for k, v in s.items()}}
    np.savez({str(tmp_path)!r} + f"/{{fmt}}.npz", **bits)
for name in ("zip", "legacy", "plain"):
    try:
        readers.read_state_dict({str(tmp_path)!r} + f"/attack_{{name}}.pth")
    except ConversionError as e:
        print("refused" if "refused" in str(e) else "other: " + str(e))
try:
    import torch
except ImportError:
    print("no torch", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["refused"] * 3 + ["no torch False"], out.stdout
    assert not any((tmp_path / f"ran_{n}").exists() for n in ("zip", "legacy", "plain"))
    for fmt in FORMATS:
        got = dict(np.load(tmp_path / f"{fmt}.npz"))
        for key, value in state.items():
            value = value.detach()
            want = (value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16
                    else value.numpy())
            assert np.array_equal(got[key], want) and got[key].dtype == want.dtype, (fmt, key)
