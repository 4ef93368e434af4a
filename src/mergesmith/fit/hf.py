"""Loading Hugging Face models and tokenizers to run them on data (fits and the evaluator): quietly, in fp32, in
eval mode without gradients, with one-line errors that name the folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergesmith.errors import CheckpointError


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No load reports or progress bars from transformers while the shared module loads (mergesmith reports)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"{folder}: no tokenizer to encode the data ({type(e).__name__}); set "
                              "tokenizer_source: to a folder that has one") from None


def load_encoder(folder: Path) -> nn.Module:
    """``AutoModel`` of the base, without BERT's pooler (the mean-pooled zoo form; other encoders have none)."""
    from transformers import AutoModel

    try:
        with quiet_transformers():
            try:
                module = AutoModel.from_pretrained(folder, add_pooling_layer=False, dtype=torch.float32)
            except TypeError:  # architectures without a pooler do not take the argument
                module = AutoModel.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load the model to run it on the data ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return module.eval().requires_grad_(False)


def load_classifier(folder: Path, meta: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        with quiet_transformers():
            if meta:
                with torch.device("meta"):
                    return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder))
            module = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load it as a sequence classifier ({type(e).__name__}); give every "
                              "model a head: (a safetensors linear head over mean-pooled states)") from None
    return module.eval().requires_grad_(False)


def classifier_names(module: nn.Module) -> frozenset[str]:
    """The parameters of a sequence classifier outside its backbone (``base_model_prefix``): its task head."""
    prefix = getattr(module, "base_model_prefix", "") + "."
    return frozenset(n for n, _ in module.named_parameters() if not n.startswith(prefix))
