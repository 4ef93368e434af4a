"""``chat_template:``: a named template, a Jinja template, or ``auto`` (the inputs' most common), written so that the
output tokenizer's ``apply_chat_template`` uses it; an unknown name or a template that does not compile is a
one-line error before the merge."""

from __future__ import annotations

import json

import pytest
import torch

from mergesmith import merge
from mergesmith.errors import RecipeError
from tests.fit.tiny_models import build_tokenizer, config

MESSAGES = [{"role": "user", "content": "alpha beta"}]
CUSTOM = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat")
    templates = {"base": None, "a": CUSTOM, "b": CUSTOM, "c": "{{ 'other' }}"}
    for seed, (name, template) in enumerate(templates.items()):
        torch.manual_seed(seed)
        LlamaForCausalLM(config("llama")).save_pretrained(root / name)
        build_tokenizer(root / name, with_cls=False)
        if template is not None:
            path = root / name / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    return root


def recipe(root, template) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(root / n)} for n in ("base", "a", "b", "c")],
        "chat_template": template,
    }


@pytest.mark.parametrize(
    "template,expected",
    [
        ("chatml", "<|im_start|>user\nalpha beta<|im_end|>\n"),
        ("auto", "<user>alpha beta"),
        (CUSTOM, "<user>alpha beta"),
    ],
)
def test_output_tokenizer_uses_the_template(chat_models, tmp_path, template, expected):
    from transformers import AutoTokenizer

    merge(recipe(chat_models, template), tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == expected


@pytest.mark.parametrize(
    "template,message",
    [("chatmk", "neither a known name"), ("{% for m in messages %}", "does not compile")],
)
def test_bad_templates_are_errors(chat_models, tmp_path, template, message):
    with pytest.raises(RecipeError, match=message):
        merge(recipe(chat_models, template), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
