"""Hugging Face Hub model ids in recipes: ``org/name`` or ``org/name@revision`` in any model field (mergekit's
form), resolved to a local snapshot folder through ``huggingface_hub``.

Online, the snapshot is downloaded into the Hub cache (only the files a merge reads: configs, safetensors weights
and their index, tokenizer files; pickled ``.bin`` weights only with ``allow_pickle``). With ``HF_HUB_OFFLINE=1``
it comes from the cache alone, and a model not in it is a one-line error saying how to get it. A path that exists
on disk always wins over a Hub id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergesmith.errors import CheckpointError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
TEXT_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
SAFE_FILES = ["*.safetensors"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]


def hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``spec`` names a Hub model and is not an existing local path."""
    if Path(spec).expanduser().exists():
        return None
    match = HUB_ID.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        return None
    return match["repo"], match["revision"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(spec: str, allow_pickle: bool = False) -> Path:
    """The local path of a recipe's model: the path itself, or the Hub snapshot folder of ``org/name[@rev]``."""
    parsed = hub_id(spec)
    if parsed is None:
        return Path(spec).expanduser()
    repo, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{spec}: a Hub id needs huggingface_hub (pip install 'mergesmith[hf]'), or give a local path"
        ) from None

    patterns = TEXT_FILES + SAFE_FILES + (PICKLE_FILES if allow_pickle else [])
    try:
        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                local_files_only=offline(),
            )
        )
    except LocalEntryNotFoundError:
        how = (
            f"HF_HUB_OFFLINE is set and {spec} is not in the Hugging Face cache; download it once with network "
            f"access (`hf download {repo}`), or give a local folder"
            if offline()
            else f"{spec} could not be downloaded (no connection?); retry, or give a local folder"
        )
        raise CheckpointError(how) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{spec}: no such model on the Hugging Face Hub (or it is gated: log in with `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{spec}: the Hub refused the download ({e.__class__.__name__})") from None
    if not any(folder.glob("*.safetensors")) and not (allow_pickle and any(folder.glob("*.bin"))):
        hint = "pass --allow-pickle to read its pickled .bin weights" if not allow_pickle else ""
        raise CheckpointError(
            f"{spec}: the snapshot has no safetensors weights; {hint or 'nothing to merge'}"
        )
    return folder
