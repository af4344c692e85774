"""The former single weights module, kept as re-exports for old imports; new code imports the
module of each role (errors, hashing, readers, device, format, data.classes)."""

from vgg_flax.convert.device import to_device
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.format import (
    FORMAT,
    MODEL_FIELDS,
    check_variables,
    flatten_variables,
    load_pretrained,
    model_config,
    pretrained_metadata,
    save_pretrained,
    unflatten_variables,
)
from vgg_flax.convert.hashing import file_sha256, hash_prefix, verify_hash_prefix
from vgg_flax.convert.readers import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    FileTensor,
    read_safetensors,
    read_state_dict,
)
from vgg_flax.data.classes import imagenet_classes

__all__ = ["FORMAT", "MODEL_FIELDS", "SAFETENSORS_SUFFIXES", "TORCH_SUFFIXES", "ConversionError",
           "FileTensor", "check_variables", "file_sha256", "flatten_variables", "hash_prefix",
           "imagenet_classes", "load_pretrained", "model_config", "pretrained_metadata",
           "read_safetensors", "read_state_dict", "save_pretrained", "to_device",
           "unflatten_variables", "verify_hash_prefix"]
