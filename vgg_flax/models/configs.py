"""The paper's config table (Table 1), its names, and the layer-name contract derived from a config.

A config is a sequence of entries: a conv width (3x3 conv), "M" (2x2/2 max-pool), "LRN" (local
response normalisation) or a (width, kernel_size) pair for other square kernels such as config C's
1x1. Its layers are named by block b and position k, both counted from 1; these names are the weight
converter's, the optimizer's and the warm start's contract, so they are made here and nowhere else:

    conv{b}_{k}   k-th conv of block b        bn{b}_{k}    its BatchNorm (`bn_name`)
    relu{b}_{k}   its ReLU (a tap)            lrn{b}       an LRN
    stage{b}      block b's output before its pool (a tap, `stage_name`)
    pool{b}       block b's pool
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ConfigEntry = int | str | tuple[int, int]

CONFIGS: dict[str, tuple[ConfigEntry, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "A-LRN": (64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "C": (64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
# The torchvision / common names of the paper's configs.
CONFIG_ALIASES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C",
                  "vgg16": "D", "vgg19": "E"}
FC_POOL_SIZE = (7, 7)  # torchvision's AdaptiveAvgPool2d((7, 7)); the paper's FC1 receptive field.

_CONV = re.compile(r"^conv(\d+_\d+)$")
_POOL = re.compile(r"^pool(\d+)$")
_FEATURE = re.compile(r"^(conv|bn|relu)\d+_\d+$|^(lrn|pool|stage)\d+$")


def resolve_config(config: str | Sequence[ConfigEntry]) -> tuple[ConfigEntry, ...]:
    """A config name ("D", "vgg16", ...) or a custom list, checked, as a tuple of entries."""
    if isinstance(config, str):
        key = CONFIG_ALIASES.get(config, config)
        if key not in CONFIGS:
            raise KeyError(f"unknown VGG config {config!r}; valid names: "
                           f"{sorted(CONFIGS) + sorted(CONFIG_ALIASES)}")
        return CONFIGS[key]
    entries = tuple(tuple(e) if isinstance(e, list) else e for e in config)
    for e in entries:
        ok = (e in ("M", "LRN") or (isinstance(e, int) and e > 0)
              or (isinstance(e, tuple) and len(e) == 2 and all(isinstance(v, int) and v > 0
                                                              for v in e)))
        if not ok:
            raise ValueError(f"bad config entry {e!r}: expected a width, 'M', 'LRN' or "
                             "a (width, kernel_size) pair")
    return entries


def parse_config(spec) -> str | tuple[ConfigEntry, ...]:
    """A config name ("D", "vgg16", ...), a list, or a comma string such as "64,M,128,M,256x1,M".

    String entries: a width (3x3 conv), "M" (max-pool), "LRN", or "WIDTHxK" for a KxK conv. A string
    keeps the config type-stable in a locked ConfigDict and easy to set from the command line. A
    name is returned as it is; anything else as `resolve_config`'s checked tuple.
    """
    if not isinstance(spec, str):
        return resolve_config(spec)
    spec = spec.strip()
    if spec in CONFIGS or spec in CONFIG_ALIASES:
        return spec
    entries: list[ConfigEntry] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token.upper() in ("M", "LRN"):
            entries.append(token.upper())
        elif "x" in token:
            width, kernel = token.split("x")
            entries.append((int(width), int(kernel)))
        elif token.isdigit():
            entries.append(int(token))
        else:
            raise ValueError(f"bad model.config entry {token!r} in {spec!r}: expected a width, 'M', "
                             f"'LRN', 'WIDTHxK' or a name from {sorted(CONFIGS)}")
    return resolve_config(entries)


def config_to_json(config: str | Sequence[ConfigEntry]) -> str | list:
    """A config as JSON: a name as it is, a custom config as a list (pairs as [width, kernel])."""
    if isinstance(config, str):
        return config
    return [list(e) if isinstance(e, tuple) else e for e in resolve_config(config)]


def config_to_spec(config: str | Sequence[ConfigEntry]) -> str:
    """`parse_config`'s inverse: a name as it is, a custom config as its comma string ("8,M,16x1,M")."""
    if isinstance(config, str):
        return config
    return ",".join(f"{e[0]}x{e[1]}" if isinstance(e, list | tuple) else str(e) for e in config)


def conv_width(entry: ConfigEntry) -> tuple[int, int]:
    """(width, kernel_size) of a conv entry: a bare width is a 3x3 conv."""
    return entry if isinstance(entry, tuple) else (entry, 3)


def layer_names(config: str | Sequence[ConfigEntry]) -> list[tuple[str, ConfigEntry]]:
    """(name, entry) for every entry of a config: conv{b}_{k}, lrn{b}, pool{b}."""
    names, block, k = [], 1, 0
    for e in resolve_config(config):
        if e == "M":
            names.append((f"pool{block}", e))
            block, k = block + 1, 0
        elif e == "LRN":
            names.append((f"lrn{block}", e))
        else:
            k += 1
            names.append((f"conv{block}_{k}", e))
    return names


def stages(config) -> list[tuple[tuple[str, ConfigEntry], ...]]:
    """`layer_names` cut into blocks, each ending with its pool (the last may have none)."""
    out, current = [], []
    for name, entry in layer_names(config):
        current.append((name, entry))
        if is_pool_layer(name):
            out.append(tuple(current))
            current = []
    return out + ([tuple(current)] if current else [])


def is_conv_layer(name: str) -> bool:
    """True for conv{b}_{k}."""
    return _CONV.match(name) is not None


def is_pool_layer(name: str) -> bool:
    """True for pool{b}."""
    return _POOL.match(name) is not None


def is_feature_layer(name: str) -> bool:
    """True for the layers (and taps) of the convolutional feature extractor, False for a head's."""
    return _FEATURE.match(name) is not None


def _conv_suffix(conv: str) -> str:
    match = _CONV.match(conv)
    if match is None:
        raise ValueError(f"{conv!r} is not a conv layer name (conv{{block}}_{{k}})")
    return match.group(1)


def bn_name(conv: str) -> str:
    """The BatchNorm that follows a conv: "conv3_2" -> "bn3_2"."""
    return "bn" + _conv_suffix(conv)


def relu_name(conv: str) -> str:
    """The ReLU tap that follows a conv (and its BatchNorm): "conv3_2" -> "relu3_2"."""
    return "relu" + _conv_suffix(conv)


def stage_name(pool: str) -> str:
    """The tap of a block's output before its pool: "pool3" -> "stage3"."""
    match = _POOL.match(pool)
    if match is None:
        raise ValueError(f"{pool!r} is not a pool layer name (pool{{block}})")
    return "stage" + match.group(1)


def last_width(config) -> int:
    """Channels of a config's last conv (what a head sees)."""
    convs = [e for e in resolve_config(config) if not isinstance(e, str)]
    return conv_width(convs[-1])[0]
