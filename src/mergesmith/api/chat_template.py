"""``chat_template:`` in a recipe (mergekit's key): the output tokenizer's chat template — a named template
(``chatml``, ``llama3``, ``mistral``, ``alpaca``, ``zephyr``), a Jinja template written in the recipe, or ``auto``:
the template most of the input models carry (ties: the base's, else the first model's). It is written into
``tokenizer_config.json`` and ``chat_template.jinja``, and checked before the merge (a template that does not
compile, an unknown name, ``auto`` with no template among the inputs, an output without a tokenizer)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergesmith.errors import RecipeError

NAMED = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + "
        "'\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + "
        "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}


def template_of(folder: Path | None) -> str | None:
    """A model folder's chat template (``chat_template.jinja``, else ``tokenizer_config.json``), if any."""
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def resolve_template(spec: str, folders: list[Path | None]) -> str:
    """The template ``spec`` means; ``folders``: the input models' folders, the base (or first) first."""
    if spec == "auto":
        found = [t for t in (template_of(f) for f in folders) if t is not None]
        if not found:
            raise RecipeError("chat_template: auto, but no input model has a chat template; name one")
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best)  # ties: the earliest (the base first)
    if spec in NAMED:
        return NAMED[spec]
    if "{%" not in spec and "{{" not in spec:
        raise RecipeError(
            f"chat_template: '{spec}' is neither a known name ({', '.join(NAMED)}, auto) nor a Jinja template"
        )
    import jinja2

    try:
        jinja2.Environment().parse(spec)
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(
            f"chat_template: the template does not compile ({e.message}, line {e.lineno})"
        ) from None
    return spec


def write_template(folder: Path, template: str) -> None:
    """Set the output tokenizer's chat template (both places transformers reads it from)."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        raise RecipeError("chat_template: the output has no tokenizer_config.json to carry it")
    data = json.loads(config.read_text(encoding="utf-8"))
    data["chat_template"] = template
    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
