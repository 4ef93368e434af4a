"""The README: its first lines give the two commands, it stays short (the details live in docs/), its method table
is the registry's (regenerate with `mergesmith methods --markdown`), and every YAML block in it runs as printed on
tiny local models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mergesmith import merge
from mergesmith.api.multi import run_multi
from mergesmith.cli import methods_markdown
from tests.helpers import build_llama

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)


def test_readme_is_short_and_starts_with_the_two_commands():
    first = README.splitlines()[:6]
    assert any("make demo" in line for line in first) and any("make test" in line for line in first)
    assert len(README.encode()) < 15_000


def test_method_tables_are_current():
    assert methods_markdown(full=False) in README, (
        "README table is stale: paste `mergesmith methods --markdown`"
    )
    methods = (ROOT / "docs" / "methods.md").read_text()
    assert methods_markdown(full=True) in methods, "docs/methods.md is stale: `mergesmith methods --markdown`"


@pytest.fixture(scope="module")
def readme_models(tmp_path_factory) -> Path:
    """The folders the README's recipes name: models/{base,math,code} and a LoRA adapter of the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("readme")
    base = build_llama(root / "models" / "base", 0)
    build_llama(root / "models" / "math", 1, base)
    build_llama(root / "models" / "code", 2, base)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    model.save_pretrained(root / "adapters" / "math-lora")
    config = root / "adapters" / "math-lora" / "adapter_config.json"
    config.write_text(config.read_text().replace(str(base), "models/base"))
    return root


@pytest.mark.parametrize("index", range(len(YAML_BLOCKS)))
def test_every_yaml_block_runs_as_printed(index, readme_models, tmp_path, monkeypatch):
    monkeypatch.chdir(readme_models)
    block = YAML_BLOCKS[index]
    documents = [d for d in yaml.safe_load_all(block) if d is not None]
    if len(documents) > 1:
        (tmp_path / "merges.yaml").write_text(block)
        results = run_multi(
            tmp_path / "merges.yaml",
            tmp_path / "work",
            tmp_path / "final",
            progress=False,
            report=lambda _: None,
        )
        assert (tmp_path / "final" / "config.json").exists() and len(results) == len(documents)
    else:
        result = merge(documents[0], tmp_path / "out", progress=False)
        assert result.tensors > 0 and (tmp_path / "out" / "manifest.json").exists()
