"""Data loading and answer normalisation for the mergesmith_llm tasks (written by mergesmith)."""

from pathlib import Path


def load(skill, **kwargs):
    """The split beside this file as lm-eval's dataset (``custom_dataset``)."""
    import json

    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / f"{skill}.jsonl").read_text("utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def normalize(text):
    """The continuation up to its first newline after any leading whitespace, stripped."""
    return text.lstrip().split("\n", 1)[0].strip()


def normalize_responses(resps, docs):
    return [[normalize(r) for r in resp] for resp in resps]
