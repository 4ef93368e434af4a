"""The LLM zoo's skills as lm-eval-harness tasks (PyPI ``lm-eval`` 0.4.x) with local data files.

``write_lm_eval_tasks(zoo, OUT)`` writes a folder that ``lm_eval --include_path OUT --tasks mergesmith_llm`` (or
one task, ``mergesmith_llm_<skill>``) runs on any causal LM, offline:

    OUT/<skill>.jsonl                 the split's prompts and answers
    OUT/mergesmith_llm_<skill>.yaml   generate_until, greedy, at most the skill's token budget, exact match
    OUT/mergesmith_llm.yaml           the group (mean exact match over the skills)
    OUT/utils.py                      reads the data beside it; the answer normalisation as a filter

The scores equal ``mergesmith``'s own evaluator's (:func:`mergesmith.bench.zoo.llm.score_skill`): the same
prompts (no chat template, no few-shot), greedy decoding up to the same budget and the end-of-text token, and the
same normalisation (the continuation up to its first newline after any leading whitespace, stripped) — which is
why the tasks stop on the token budget and the end-of-text token rather than on ``"\\n"``: lm-eval's ``until``
would cut a continuation that starts with a newline before its answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergesmith.bench.zoo import llm_data
from mergesmith.bench.zoo.llm import LLMZoo

GROUP = "mergesmith_llm"

UTILS = '''"""Data loading and answer normalisation for the mergesmith_llm tasks (written by mergesmith)."""

from pathlib import Path


def load(skill, **kwargs):
    """The split beside this file as lm-eval's dataset (``custom_dataset``)."""
    import json

    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / f"{skill}.jsonl").read_text("utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def normalize(text):
    """The continuation up to its first newline after any leading whitespace, stripped."""
    return text.lstrip().split("\\n", 1)[0].strip()


def normalize_responses(resps, docs):
    return [[normalize(r) for r in resp] for resp in resps]
'''


def task_yaml(skill: str) -> str:
    """One skill's task definition (YAML text; ``!function`` tags resolve against ``utils.py`` beside it)."""
    budget = llm_data.SKILLS[skill].max_new_tokens
    return f"""task: {GROUP}_{skill}
tag: {GROUP}_tasks
custom_dataset: !function utils.load
dataset_kwargs:
  skill: {skill}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {budget}
  do_sample: false
filter_list:
  - name: normalized
    filter:
      - function: custom
        filter_fn: !function utils.normalize_responses
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def group_yaml(skills: list[str]) -> str:
    tasks = "".join(f"  - {GROUP}_{s}\n" for s in skills)
    return f"""group: {GROUP}
task:
{tasks}aggregate_metric_list:
  - metric: exact_match
    aggregation: mean
    weight_by_size: false
metadata:
  version: 1.0
"""


def write_lm_eval_tasks(zoo: LLMZoo, out: Path, split: str = "test") -> Path:
    """The zoo's ``split`` of every skill as an lm-eval task folder at ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(UTILS)
    for skill in zoo.skills:
        rows = [e.as_json() for e in zoo.split(skill, split)]
        (out / f"{skill}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
        )
        (out / f"{GROUP}_{skill}.yaml").write_text(task_yaml(skill))
    (out / f"{GROUP}.yaml").write_text(group_yaml(zoo.skills))
    return out
