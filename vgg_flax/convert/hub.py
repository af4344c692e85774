"""`hf-hub:ORG/REPO` weights through huggingface_hub (optional), sharing the user's hub cache.

huggingface_hub keeps its own cache (`$HF_HUB_CACHE`, `models--ORG--REPO/snapshots/REV/...`), token
and offline mode (`HF_HUB_OFFLINE=1`); VGG_FLAX_OFFLINE=1 is honoured as well.
"""

from __future__ import annotations

import os

from vgg_flax.convert.download import offline
from vgg_flax.convert.errors import ConversionError

PREFIX = "hf-hub:"
FILENAME = "model.safetensors"  # timm's hub copies


def hub_offline() -> bool:
    return offline() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_file(source: str, filename: str = FILENAME) -> str:
    """The local path of `filename` in the hub repo `hf-hub:ORG/REPO[@REVISION]`, downloading it once."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError as e:
        raise ConversionError(f"{source}: hub weights need huggingface_hub (pip install "
                              "'vgg-flax[hub]')") from e
    repo, _, revision = source[len(PREFIX):].partition("@")
    try:
        return huggingface_hub.hf_hub_download(repo, filename, revision=revision or None,
                                               local_files_only=hub_offline())
    except errors.LocalEntryNotFoundError as e:
        place = os.path.join(constants.HF_HUB_CACHE,
                             f"models--{repo.replace('/', '--')}", "snapshots", "<revision>", filename)
        raise ConversionError(f"{source}: offline and {filename} is not in the hub cache; place it at "
                              f"{place} (with refs/main naming the revision), or unset HF_HUB_OFFLINE / "
                              "VGG_FLAX_OFFLINE") from e
    except (errors.HfHubHTTPError, errors.RepositoryNotFoundError, errors.EntryNotFoundError) as e:
        raise ConversionError(f"{source}: {str(e).splitlines()[0]}") from e
