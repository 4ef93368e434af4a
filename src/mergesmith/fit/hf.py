"""Loading Hugging Face models and tokenizers to run them on data (fits and the evaluator): from local folders
only (nothing is downloaded), quietly, in fp32, in eval mode without gradients, with one-line errors that name
the folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
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


def load_tokenizer(folder: Path, hint: str = "set tokenizer_source: to a folder that has one") -> Any:
    """``AutoTokenizer`` of a local folder; if it has none, a CheckpointError ending in ``hint`` (what to
    do)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{folder}: no tokenizer to encode the data ({type(e).__name__}); {hint}"
        ) from None


def load_encoder(folder: Path) -> nn.Module:
    """``AutoModel`` of the base, without BERT's pooler (the mean-pooled zoo form; other encoders have none)."""
    from transformers import AutoModel

    try:
        with quiet_transformers():
            try:
                module = AutoModel.from_pretrained(
                    folder, add_pooling_layer=False, dtype=torch.float32, local_files_only=True
                )
            except TypeError:  # architectures without a pooler do not take the argument
                module = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except Exception as e:
        raise _cannot_run(folder, e) from None
    return module.eval().requires_grad_(False)


def load_classifier(
    folder: Path,
    meta: bool = False,
    require_head: bool = False,
    hint: str = "give every model a head: (a safetensors linear head over mean-pooled states)",
) -> nn.Module:
    """``AutoModelForSequenceClassification`` of a local folder (on the meta device with ``meta``: the
    architecture without weights). With ``require_head``, a folder whose weights lack the classifier (a bare
    backbone, whose head would be freshly random) is a CheckpointError; ``hint`` says what to do instead."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        with quiet_transformers():
            if meta:
                with torch.device("meta"):
                    return AutoModelForSequenceClassification.from_config(
                        AutoConfig.from_pretrained(folder, local_files_only=True)
                    )
            module, info = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=torch.float32, local_files_only=True, output_loading_info=True
            )
    except Exception as e:
        raise CheckpointError(
            f"{folder}: cannot load it as a sequence classifier ({type(e).__name__}); {hint}"
        ) from None
    missing = sorted(set(info.get("missing_keys", ())) & classifier_names(module))
    if require_head and missing:
        raise CheckpointError(
            f"{folder}: not a sequence classifier (its weights have no '{missing[0]}'; "
            f"{getattr(module.config, 'architectures', None) or 'no architectures'} in "
            f"config.json); {hint}"
        )
    return module.eval().requires_grad_(False)


def load_causal_lm(folder: Path) -> nn.Module:
    """``AutoModelForCausalLM`` of a local folder, fp32, eval mode, no gradients. A folder that is not a
    causal language model is a CheckpointError: an architecture without a causal-LM class (DeBERTa), or
    weights that lack the LM head (an encoder, or a classifier, would get a freshly random one)."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            module, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, local_files_only=True, output_loading_info=True
            )
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{folder}: cannot load it as a causal language model ({type(e).__name__}: "
            f"{first}); perplexity and exact-match need a ...ForCausalLM "
            "checkpoint"
        ) from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise CheckpointError(
            f"{folder}: not a causal language model ({len(missing)} weights of "
            f"{type(module).__name__} are missing, e.g. '{missing[0]}'; config.json says "
            f"{getattr(module.config, 'architectures', None)}); perplexity and exact-match "
            "need a ...ForCausalLM checkpoint"
        )
    return module.eval().requires_grad_(False)


def classifier_names(module: nn.Module) -> frozenset[str]:
    """The parameters of a sequence classifier outside its backbone (``base_model_prefix``): its task head."""
    prefix = getattr(module, "base_model_prefix", "") + "."
    return frozenset(n for n, _ in module.named_parameters() if not n.startswith(prefix))


def load_as_saved(folder: Path) -> nn.Module:
    """The folder's own architecture (``architectures[0]`` of config.json, else ``AutoModel``), fp32, eval mode: its
    module names are its checkpoint's tensor names (what a permutation spec speaks of)."""
    import transformers

    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            model_class = saved_class(config.to_dict())
            module = model_class.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except Exception as e:
        raise _cannot_run(folder, e) from None
    return module.eval().requires_grad_(False)


def saved_class(config: dict[str, Any]) -> Any:
    """The transformers class config.json's ``architectures[0]`` names (``AutoModel`` when it names none that
    transformers has): the class whose module names are the checkpoint's tensor names."""
    import transformers

    names = config.get("architectures") or []
    return (getattr(transformers, names[0], None) if names else None) or transformers.AutoModel


def _cannot_run(folder: Path, error: Exception) -> CheckpointError:
    first = str(error).splitlines()[0] if str(error) else ""
    return CheckpointError(
        f"{folder}: cannot load the model to run it on the data ({type(error).__name__}: {first})"
    )


def causal_lm_from_state(config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A transformers causal LM of ``config`` (a config.json dict) holding ``state`` (a tied head may be absent);
    fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k != "model_type"}
    with quiet_transformers():
        module = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.get("tie_word_embeddings"))]
    if missing or unexpected:
        raise CheckpointError(f"the rewritten model does not fit its config ({(missing or unexpected)[0]})")
    module.tie_weights()
    return module.float().eval()
