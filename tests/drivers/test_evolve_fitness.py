"""The built-in fitness kinds score a candidate's weights as the evaluator scores the same model written to disk:
perplexity, exact match and an lm-evaluation-harness task on local files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith.api.pipeline import merge
from mergesmith.drivers.evolve.candidates import Evaluator
from mergesmith.fit.evaluate import load_exact_match, load_perplexity
from mergesmith.recipe.search import load_search
from tests.fit.tiny_models import WORDS, build_tokenizer, config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama causal LM (2 layers, the tiny tokenizer) and two perturbed copies, each with the tokenizer;
    a text file, a prompt/answer file and a multiple-choice file of the tokenizer's words."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lms")
    settings = config("llama")
    settings.num_hidden_layers = 2
    torch.manual_seed(0)
    base = LlamaForCausalLM(settings)
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        model = LlamaForCausalLM(settings)
        model.load_state_dict(base.state_dict())
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(root / name)
        build_tokenizer(root / name, with_cls=False)
        paths[name] = root / name
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(6)))
    rows = [{"prompt": " ".join(rng.choice(WORDS, 3)), "answer": str(rng.choice(WORDS))} for _ in range(6)]
    (root / "em.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    choices = [
        {
            "query": " ".join(rng.choice(WORDS, 3)),
            "choices": list(rng.choice(WORDS, 3)),
            "gold": int(rng.integers(3)),
        }
        for _ in range(12)
    ]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in choices))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n"
    )
    paths["root"] = root
    return paths


def evaluator(tiny_lms, fitness: dict) -> Evaluator:
    spec = load_search(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_lms["base"]),
            "models": [str(tiny_lms["a"]), str(tiny_lms["b"])],
            "fitness": fitness,
        }
    )
    return Evaluator(spec)


def on_disk(ev: Evaluator, x: np.ndarray, out: Path) -> Path:
    merge(ev.space.recipe(x), out, progress=False)
    return out


def test_perplexity_and_exact_match_score_the_candidate_as_its_folder_scores(tiny_lms, tmp_path):
    root = tiny_lms["root"]
    ev = evaluator(
        tiny_lms,
        [
            {"kind": "perplexity", "data": str(root / "text.txt")},
            {"kind": "exact_match", "data": str(root / "em.jsonl"), "weight": 2.0},
        ],
    )
    for k, x in enumerate((np.full(ev.space.size, 0.3), np.full(ev.space.size, 0.9))):
        folder = on_disk(ev, x, tmp_path / f"m{k}")
        task, module = load_perplexity(folder, root / "text.txt")
        loss = task.evaluate(module)["loss"]
        em_task, em_module = load_exact_match(folder, root / "em.jsonl")
        em = em_task.evaluate(em_module)["exact_match"]
        assert ev.score(list(x))["fitness"] == pytest.approx((-loss + 2.0 * em) / 3.0, rel=1e-5)


def test_an_lm_eval_task_on_local_files_scores_the_candidate_as_lm_eval_scores_its_folder(tiny_lms, tmp_path):
    harness = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mergesmith.fit.hf import load_causal_lm, load_tokenizer

    root = tiny_lms["root"]
    ev = evaluator(
        tiny_lms,
        {"kind": "lm_eval", "tasks": ["tiny_mc"], "include_path": str(root / "tasks"), "metric": "acc"},
    )
    scores = []
    for k, x in enumerate((np.full(ev.space.size, 0.0), np.full(ev.space.size, 1.0))):
        folder = on_disk(ev, x, tmp_path / f"m{k}")
        lm = HFLM(pretrained=load_causal_lm(folder), tokenizer=load_tokenizer(folder), batch_size=1)
        direct = harness.simple_evaluate(
            model=lm,
            tasks=["tiny_mc"],
            task_manager=TaskManager(include_path=str(root / "tasks")),
            random_seed=0,
        )
        scores.append(ev.score(list(x))["fitness"])
        assert scores[-1] == pytest.approx(direct["results"]["tiny_mc"]["acc,none"])
