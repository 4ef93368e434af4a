"""``mergesmith eval``: each mode (zoo, classification, perplexity, exact match) on tiny models, in-process,
and the one-line errors of a wrong command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from mergesmith.cli import main
from mergesmith.fit.evaluate import load_classification, load_exact_match, load_perplexity
from tests.fit.tiny_models import (
    build_causal_lm,
    build_classifier,
    linear_head,
    write_classification,
    write_prompts,
    write_text,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A BERT classifier, a Llama classifier, a GPT-2 causal LM, a linear head and the data files."""
    root = tmp_path_factory.mktemp("eval-cli")
    build_classifier(root / "bert", "bert", 0)
    build_classifier(root / "llama", "llama", 0)
    build_causal_lm(root / "gpt2-lm", "gpt2", 0)
    save_file(linear_head(0), str(root / "head.safetensors"))
    write_classification(root / "cls.jsonl")
    write_text(root / "text.txt")
    write_prompts(root / "qa.jsonl")
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_classification(tiny, capsys):
    code, out, _ = run(
        capsys, "eval", tiny / "bert", "--task", "classification", "--data", tiny / "cls.jsonl"
    )
    task, model = load_classification(tiny / "bert", tiny / "cls.jsonl")
    metrics = task.evaluate(model)
    assert code == 0
    assert out.splitlines()[0] == f"classification of {tiny / 'bert'} on {tiny / 'cls.jsonl'}"
    table = dict(line.split() for line in out.splitlines()[1:])
    assert table == {
        "accuracy": f"{metrics['accuracy']:.4f}",
        "loss": f"{metrics['loss']:.4f}",
        "examples": "24",
    }
    code, out, _ = run(
        capsys,
        "eval",
        tiny / "llama",
        "--task",
        "classification",
        "--data",
        tiny / "cls.jsonl",
        "--head",
        tiny / "head.safetensors",
        "--pooling",
        "last",
        "--json",
    )
    task, model = load_classification(
        tiny / "llama", tiny / "cls.jsonl", head=tiny / "head.safetensors", pooling="last"
    )
    assert code == 0 and json.loads(out) == pytest.approx(task.evaluate(model))


def test_eval_perplexity(tiny, capsys):
    code, out, _ = run(
        capsys,
        "eval",
        tiny / "gpt2-lm",
        "--task",
        "perplexity",
        "--data",
        tiny / "text.txt",
        "--max-length",
        "32",
        "--json",
    )
    task, model = load_perplexity(tiny / "gpt2-lm", tiny / "text.txt", max_length=32)
    assert code == 0 and json.loads(out) == pytest.approx(task.evaluate(model))
    code, out, _ = run(capsys, "eval", tiny / "gpt2-lm", "--task", "perplexity", "--data", tiny / "text.txt")
    assert code == 0 and "perplexity" in out and "tokens" in out


def test_eval_exact_match(tiny, capsys):
    code, out, _ = run(
        capsys,
        "eval",
        tiny / "gpt2-lm",
        "--task",
        "exact-match",
        "--data",
        tiny / "qa.jsonl",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "3",
        "--json",
    )
    task, model = load_exact_match(tiny / "gpt2-lm", tiny / "qa.jsonl", max_new_tokens=4)
    assert code == 0 and json.loads(out) == task.evaluate(model)
    assert json.loads(out)["examples"] == 10


def test_eval_zoo(tiny_zoo, capsys, monkeypatch):
    monkeypatch.setenv("MERGESMITH_CACHE", str(tiny_zoo.root.parents[1]))
    code, out, _ = run(capsys, "eval", tiny_zoo.encoder_path("a"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["task", "accuracy", "fine-tuned", "normalized"]
    assert [line.split()[0] for line in lines[1:]] == ["a", "b", "average"]
    acc = tiny_zoo.evaluate(tiny_zoo.encoder_path("a"), "val")
    code, out, _ = run(
        capsys, "eval", tiny_zoo.encoder_path("a"), "--zoo", "text8", "--split", "val", "--json"
    )
    assert code == 0 and json.loads(out)["accuracy"] == acc


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "perplexity"], "error: --task perplexity needs --data FILE"),
        (
            ["--task", "perplexity", "--data", "{tiny}/text.txt", "--head", "h.safetensors"],
            "error: --head does not apply to --task perplexity",
        ),
        (
            ["--task", "classification", "--data", "{tiny}/cls.jsonl", "--split", "val"],
            "error: --zoo, --quick and --split go with a zoo evaluation; with --task give --data FILE",
        ),
        (["--data", "{tiny}/cls.jsonl"], "error: --data goes with --task"),
        (
            ["--task", "exact-match", "--data", "{tiny}/missing.jsonl"],
            "error: {tiny}/missing.jsonl: data file not found",
        ),
        (
            ["--task", "classification", "--data", "{tiny}/cls.jsonl", "--label-column", "y"],
            "error: {tiny}/cls.jsonl: line 1 has no 'y' column",
        ),
    ],
)
def test_eval_user_mistakes_are_one_line_errors(tiny, capsys, args, message):
    code, out, err = run(capsys, "eval", tiny / "gpt2-lm", *[a.format(tiny=tiny) for a in args])
    assert code == 2 and out == ""
    assert err.startswith(message.format(tiny=tiny)) and err.count("\n") == 1


def test_eval_not_a_causal_lm(tiny, capsys):
    code, _, err = run(capsys, "eval", tiny / "bert", "--task", "perplexity", "--data", tiny / "text.txt")
    assert code == 2 and err.startswith(f"error: {tiny / 'bert'}: not a causal language model")
