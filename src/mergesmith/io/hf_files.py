"""The non-weight files of a Hugging Face model folder that a merged or derived model carries over."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "added_tokens.json",
    "spiece.model",
    "generation_config.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(source: Path, destination: Path, with_config: bool = False) -> list[str]:
    """Copy the tokenizer (and generation) files that ``source`` has into ``destination`` (and config.json with
    ``with_config``); returns the names copied."""
    names = (("config.json",) if with_config else ()) + TOKENIZER_FILES
    copied = []
    for name in names:
        if (source / name).exists():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied
