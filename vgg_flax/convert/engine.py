"""The converter engine: any weight source's layout into Flax variables and back, by its rules.

Neutral: it knows the sources only through their `Layout` rows (`LAYOUTS`: one module per source,
torchvision.py, timm.py, keras.py, keras_hub.py). A conversion reads the file (`read_source`),
detects the layout from the keys, infers the architecture, checks every key and shape before
building anything (one error lists all problems, nothing half-loaded is returned), builds the
variables, and decides the preprocessing preset (`preprocessing_for`, the one place). A source whose
files state their own contract (a keras-hub preset directory: layout, architecture, preset) fixes
those choices in `read_source`, and the caller's explicit arguments still win. A new weight source
is a module that fills in a `Layout`, and a row here. The torch self-check (`torch_check`) depends
on this module, never the reverse: `convert_file` takes the checker as an argument.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from vgg_flax.convert import format as wformat
from vgg_flax.convert import keras, keras_hub, readers, timm, torchvision
from vgg_flax.convert.device import to_device
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.hashing import file_sha256, files_sha256, verify_hash_prefix
from vgg_flax.convert.rules import KINDS, RESHAPES, Architecture, Layout, Rule, check_state
from vgg_flax.models import HEAD_SPECS, VGG, count_params, get_head

# Detection order: the layouts sharing keys are asked most specific first: keras-hub's conv head has
# keras.applications' names (a 4-d fc1), timm's and torchvision's files share `features.*`.
LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (keras_hub.LAYOUT, keras.LAYOUT, timm.LAYOUT,
                                                        torchvision.LAYOUT)}
TORCH_LAYOUTS = ("torchvision", "timm")
SUFFIXES = readers.TORCH_SUFFIXES + readers.SAFETENSORS_SUFFIXES + keras.SUFFIXES
# The heads whose variables the sources' classifiers fill (the others have no such weights).
HEADS = tuple(name for name, spec in HEAD_SPECS.items() if spec.torchvision_layout)


class Converted(NamedTuple):
    """A conversion's result: the model, its variables, what the file held, the preset it needs."""

    model: VGG
    variables: dict[str, Any]
    arch: Architecture
    preprocessing: str


def get_layout(name: str) -> Layout:
    """A source layout by name; KeyError listing the valid names."""
    if name not in LAYOUTS:
        raise KeyError(f"unknown weights layout {name!r}; valid layouts: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(state: Mapping[str, Any], where: str) -> Layout:
    """The first layout of `LAYOUTS` whose keys the state dict has."""
    found = next((lay for lay in LAYOUTS.values() if lay.detect(state)), None)
    if found is None:
        sample = ", ".join(sorted(state)[:5])
        raise ConversionError(f"{where}: not a VGG state dict in a known layout ({', '.join(LAYOUTS)}): "
                              f"found keys such as {sample}")
    return found


def read_weights(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """{key: array} from a state dict, a torch / safetensors file or a Keras .h5 file."""
    if isinstance(source, Mapping):
        return readers.read_state_dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weight file at {path}")
    if path.endswith(keras.SUFFIXES):
        return keras.read_h5(path)
    if not path.endswith(SUFFIXES):
        raise ConversionError(f"{path}: unknown weight file type; expected one of {SUFFIXES}")
    return readers.read_state_dict(path)


def read_source(source: str | os.PathLike | Mapping[str, Any], head: str = "torchvision",
                preprocessing: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, the `convert_state` arguments the source's own files fix): {} but for keras-hub presets.

    A keras-hub preset (`keras_hub.is_preset`: a directory, or its model.weights.h5) states its
    layout, architecture and preset in JSON; `preprocessing`, when given, is recorded instead.
    """
    if not isinstance(source, Mapping) and keras_hub.is_preset(source):
        return keras_hub.read_preset(source, with_head=head != "none", preprocessing=preprocessing)
    return read_weights(source), {}


def _with_defaults(found: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` keyword arguments over what the source fixed (`read_source`); None is "not given"."""
    return {**found, **{k: v for k, v in given.items() if v is not None or k not in found}}


def source_sha256(source: str | os.PathLike) -> str:
    """sha256 of a weight file; of a keras-hub preset, `files_sha256` of the files conversion reads."""
    if keras_hub.is_preset(source):
        return files_sha256(keras_hub.preset_files(source))
    return file_sha256(source)


def preprocessing_for(layout: Layout, nan_classifier: bool = False) -> str:
    """The preset a layout's weights expect (a NaN classifier: its features-only file's)."""
    return layout.nan_classifier_preprocessing if nan_classifier else layout.preprocessing


def _nan_layers(variables: Mapping[str, Any]) -> list[str]:
    """Variable paths holding NaN (np.min propagates NaN without allocating a mask)."""
    flat = wformat.flatten_variables(variables, leaf=lambda v: v)
    return [path for path, v in flat.items() if np.isnan(np.min(np.asarray(v)))]


def _build(state: dict[str, Any], rules: list[Rule], dtype) -> dict[str, Any]:
    """Applies the rules, largest tensor first, dropping each source tensor once converted.

    Each tensor is copied once, straight from the source layout into the Flax layout (see
    `to_device`), so the peak is about the source plus the largest converted tensor.
    """
    variables: dict[str, Any] = {}
    nodes = {}
    for rule in rules:  # the tree in network order, filled below in size order
        node = variables
        for name in rule.path[:-1]:
            node = node.setdefault(name, {})
        nodes[rule] = node
    for rule in sorted(rules, key=lambda r: -int(np.prod(r.shape))):
        shape = RESHAPES[rule.kind](rule.shape) if rule.kind in RESHAPES else None
        nodes[rule][rule.path[-1]] = to_device(state.pop(rule.key), dtype, KINDS[rule.kind][0], shape)
    return variables


def without_head(variables: Mapping[str, Any], head: str) -> dict[str, Any]:
    """The variables less the layers of `head` (its `Head.layers`): the feature extractor's."""
    layers = get_head(head).layers
    return {**variables, "params": {k: v for k, v in variables["params"].items() if k not in layers}}


def _drop_nan_classifier(variables, head, layout, where) -> tuple[dict[str, Any], bool]:
    """(variables, nan_classifier): a NaN classifier of a features-only file is dropped with a warning."""
    nan = _nan_layers(variables)
    if not nan:
        return variables, False
    head_paths = tuple(f"params/{layer}/" for layer in get_head(head).layers)
    if layout.nan_classifier_preprocessing is None or not all(p.startswith(head_paths) for p in nan):
        raise ConversionError(f"{where}: NaN weights in {', '.join(nan)}: a corrupt file")
    warnings.warn(f"{where}: the classifier weights are NaN (torchvision's IMAGENET1K_FEATURES "
                  "file): loading the features only (head='none'). These weights expect "
                  f"{layout.nan_classifier_preprocessing!r} input: normalise with vgg_flax."
                  f"preprocessing.get_preset({layout.nan_classifier_preprocessing!r}).", stacklevel=4)
    return without_head(variables, head), True


def convert_state(state: dict[str, Any], head: str = "torchvision", *, where: str = "the state dict",
                  layout: str | None = None, preprocessing: str | None = None,
                  **model_kwargs) -> Converted:
    """A read state dict into a `Converted` (consumes `state`): detect, infer, check, then build.

    Args:
      layout: a `LAYOUTS` name to insist on; None detects it from the keys.
      preprocessing: the preset to record (a registry entry's); None: `preprocessing_for`.
      **model_kwargs: VGG fields; config / batch_norm / num_classes / fc_width win over the weights.
    """
    if head not in HEADS:
        raise ConversionError(f"head {head!r} has no converted weights; use one of {HEADS}")
    lay = get_layout(layout) if layout else detect_layout(state, where)
    try:
        arch = lay.infer(state, **model_kwargs)
    except ConversionError as e:  # the layouts' inference knows the keys, not the file's name
        raise ConversionError(f"{where}: {e}") from e
    if head != "none" and not arch.has_classifier:
        raise ConversionError(f"{where} holds no classifier weights (no {lay.classifier_key}): pass "
                              "head='none' to load the features only")
    rules, ignored = lay.rules(arch, head != "none")
    check_state(state, rules, ignored, where)
    variables = _build(state, rules, dtype=model_kwargs.get("param_dtype", np.float32))
    state.clear()  # the remaining (ignored) source tensors
    variables, nan_classifier = _drop_nan_classifier(variables, head, lay, where)
    fields = {**model_kwargs, "config": arch.config, "batch_norm": arch.batch_norm,
              "num_classes": arch.num_classes, "fc_width": arch.fc_width,
              "head": "none" if nan_classifier else head}
    model = VGG.from_config(fields)
    wformat.check_variables(model, variables, where)
    return Converted(model, variables, arch, preprocessing or preprocessing_for(lay, nan_classifier))


def convert_source(source: str | os.PathLike | Mapping[str, Any], head: str = "torchvision", *,
                   verify_hash: bool = True, **kwargs) -> Converted:
    """`convert_state` of a file or a state dict, checking a hash prefix in the file's name."""
    return _read_and_convert(source, head, verify_hash, kwargs)[0]


def _read_and_convert(source, head: str, verify_hash: bool, kwargs: Mapping[str, Any]
                      ) -> tuple[Converted, str | None, str | None]:
    """(converted, the file name's verified hash prefix, the file's sha256 if it was hashed) of a
    file, a keras-hub preset directory (no name prefix to check) or a state dict."""
    where = "the state dict" if isinstance(source, Mapping) else os.fspath(source)
    is_file = not isinstance(source, Mapping) and not os.path.isdir(source)
    prefix, sha256 = verify_hash_prefix(source) if verify_hash and is_file else (None, None)
    state, found = read_source(source, head, kwargs.get("preprocessing"))
    return convert_state(state, head, where=where, **_with_defaults(found, kwargs)), prefix, sha256


def load_weights(source: str | os.PathLike | Mapping[str, Any], head: str = "torchvision", *,
                 layout: str | None = None, verify_hash: bool = True,
                 **model_kwargs) -> tuple[VGG, dict[str, Any]]:
    """VGG weights of any source layout (torchvision, timm, keras, keras_hub) as a Flax `VGG`.

    Args:
      source: a `.pth`/`.pt`/`.bin`/`.safetensors`/`.h5` path, a keras-hub preset directory
        (`save_to_preset`) or a state dict (str -> array).
      head: "torchvision", "dense" (same weights, the paper's dense evaluation) or "none".
      layout: a `LAYOUTS` name to insist on; None detects it from the keys.
      verify_hash: check the sha256 prefix of torchvision-style file names (`vgg16-397923af.pth`).
      **model_kwargs: other VGG fields (dtype, dropout_rate, ...); config / batch_norm /
        num_classes / fc_width are inferred from the weights unless given.
    Returns:
      (model, {"params": ..., "batch_stats": ...}): `model.apply(variables, x)` reproduces the
      source's logits for x = its input in NHWC, preprocessed by the layout's preset.
    Raises:
      ConversionError: naming every missing/unexpected key and wrong shape, a hash mismatch, a
        refused pickle or an unreadable file. FileNotFoundError for a missing path.
    """
    converted = convert_source(source, head, verify_hash=verify_hash, layout=layout, **model_kwargs)
    return converted.model, converted.variables


def load_torchvision(source: str | os.PathLike | Mapping[str, Any], head: str = "torchvision", *,
                     verify_hash: bool = True, **model_kwargs) -> tuple[VGG, dict[str, Any]]:
    """`load_weights` for torchvision's (`features.*`, `classifier.0/3/6`) or timm's
    (`pre_logits.fc1/fc2`, `head.fc`) layout: `model.apply(variables, x)` reproduces torchvision's
    logits for x = the NHWC version of torchvision's NCHW input."""
    where = "the state dict" if isinstance(source, Mapping) else os.fspath(source)
    if verify_hash and not isinstance(source, Mapping):
        verify_hash_prefix(source)
    state = read_weights(source)
    layout = detect_layout(state, where).name
    if layout not in TORCH_LAYOUTS:
        raise ConversionError(f"{where} holds {layout}'s layout, not torchvision's or timm's: load it "
                              "with vgg_flax.load_weights (or from_pretrained)")
    converted = convert_state(state, head, where=where, layout=layout, **model_kwargs)
    return converted.model, converted.variables


def export_weights(model: VGG, variables: Mapping[str, Any], layout: str = "torchvision"
                   ) -> dict[str, np.ndarray]:
    """Flax variables as a state dict of numpy arrays in a source layout: the rules run backwards.

    Pure transposes: `load_weights(export_weights(m, v, layout))` gives back `v` bit for bit.
    """
    if not get_head(model.head).torchvision_layout:
        raise ConversionError(f"the {model.head!r} head has no {layout} counterpart; export head='none' "
                              "variables for the features")
    arch = Architecture(model.config, model.batch_norm, model.num_classes, model.fc_width, layout,
                        model.head != "none")
    rules, _ = get_layout(layout).rules(arch, arch.has_classifier)
    flat = wformat.flatten_variables(variables)
    state = {}
    for rule in rules:
        path = "/".join(rule.path)
        if path not in flat:
            raise ConversionError(f"variables lack {path} (for {rule.key}, shape {rule.shape})")
        state[rule.key] = np.array(KINDS[rule.kind][1](flat[path], rule.shape), order="C")
        if state[rule.key].shape != rule.shape:
            raise ConversionError(f"{path}: shape {flat[path].shape} does not give {rule.key}'s "
                                  f"{rule.shape}")
    return state


def to_torchvision(model: VGG, variables: Mapping[str, Any], layout: str = "torchvision"
                   ) -> dict[str, np.ndarray]:
    """Exports Flax variables as a torchvision (or timm) state dict of numpy arrays.

    `torchvision.models.vgg16().load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts
    it (BatchNorm's `num_batches_tracked`, not tracked in Flax, is exported as 0).
    """
    if layout not in TORCH_LAYOUTS:
        raise KeyError(f"unknown torch layout {layout!r}; valid layouts: {TORCH_LAYOUTS}")
    state = {}
    for key, value in export_weights(model, variables, layout).items():
        state[key] = value
        if key.endswith(".running_var"):  # torchvision's key order: the counter comes last
            state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return state


def convert_file(source: str | os.PathLike, destination: str | os.PathLike, *,
                 head: str = "torchvision", verify_hash: bool = True,
                 check: Callable[[VGG, Mapping[str, Any]], tuple[float, float]] | None = None,
                 provenance: Mapping[str, Any] | None = None, **kwargs) -> dict[str, Any]:
    """`vgg-flax convert`: a torchvision / timm / Keras file or a keras-hub preset directory into a
    `save_pretrained` file, with a report.

    Args:
      check: an optional self-check `(model, variables) -> (max abs diff, max abs output)`, e.g.
        `torch_check.self_check` (the caller picks it, so conversion never imports torch code).
      provenance: stored with the weights (see `save_pretrained`).
      **kwargs: `convert_state`'s layout / preprocessing, and config / batch_norm / ... when the
        file's layout is not a paper config.
    Returns a dict: config, batch_norm, layout, num_classes, head, params (count), preprocessing,
    sha256, hash_prefix (verified, or None), max_abs_diff / max_abs_logit (None without a check).
    """
    (model, variables, arch, preset), prefix, sha256 = _read_and_convert(source, head, verify_hash, kwargs)
    sha256 = sha256 or source_sha256(source)
    wformat.save_pretrained(destination, model, variables, preprocessing=preset,
                            source=os.path.basename(os.path.normpath(source)), source_sha256=sha256,
                            provenance=provenance)
    report = {"config": model.config, "batch_norm": model.batch_norm, "layout": arch.layout,
              "num_classes": model.num_classes, "head": model.head,
              "features_only": model.head == "none" and head != "none",
              "params": count_params(variables), "preprocessing": preset, "sha256": sha256,
              "hash_prefix": prefix, "max_abs_diff": None, "max_abs_logit": None}
    if check is not None:
        report["max_abs_diff"], report["max_abs_logit"] = check(model, variables)
    return report
