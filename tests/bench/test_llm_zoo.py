"""The LLM zoo: skills' data, splits, training on answers only, evaluation, and the quick pipeline end to end on a
tiny random Llama with a byte-level tokenizer (the tests never load SmolLM2 and fetch no package)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mergesmith.bench.suite import Suite, backbone, folder_tensors
from mergesmith.bench.zoo import llm_data
from mergesmith.bench.zoo.llm import (
    Encoded,
    LLMZoo,
    LLMZooConfig,
    answer_losses,
    build_llm_zoo,
    encode_examples,
    multitask_outcomes,
    normalized_exact_match,
    reference_evaluations,
)
from mergesmith.bench.zoo.llm_data import Example
from mergesmith.errors import MergeError, RecipeError
from mergesmith.fit.evaluate import normalize_answer
from mergesmith.fit.hf import load_causal_lm, load_tokenizer
from tests.helpers import load_tensors


def tiny_lm(path: Path) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the generated skills' text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesmith.bench.llama_demo import train_tokenizer

    texts = [e.prompt + " " + e.answer for e in llm_data.arithmetic(200, 1) + llm_data.json_format(200, 1)]
    tokenizer = train_tokenizer(texts, 400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TINY = LLMZooConfig(
    n_train=64,
    n_val=8,
    n_test=20,
    steps=6,
    multitask_steps=6,
    batch_size=8,
    lr=3e-3,
    max_length=96,
    skills=("arithmetic", "json"),
    bf16=False,
)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llm-zoo")
    return build_llm_zoo(root=root / "zoo", config=TINY, base=tiny_lm(root / "base"), progress=False)


def test_generated_skills_are_seeded_and_answer_their_prompts():
    for make in (llm_data.arithmetic, llm_data.python_output, llm_data.german_numbers):
        assert make(50, 3) == make(50, 3) != make(50, 4)
    for example in llm_data.json_format(30, 0):
        lines = example.prompt.split("\n")[1:-1]
        record = json.loads(example.answer)
        assert [line.split(": ")[0] for line in lines] == list(record)
    for example in llm_data.arithmetic(200, 0):
        assert example.prompt.endswith("\nAnswer:") and "\n" not in example.answer
    assert Example("x", "1").as_json() == {"prompt": "x", "answer": "1"}


def test_word_problem_solutions_follow_the_story():
    """Each step of the worked answer is a true equation, the steps follow the story in order, and the last
    result is the count the story ends with."""
    import re

    for example in llm_data.arithmetic(300, 7):
        count = int(re.match(r"\w+ has (\d+)", example.prompt).group(1))
        expected = []
        for event in re.findall(r"(buys \d+|gives \d+|gets \d+ packs of \d+)", example.prompt):
            numbers = [int(x) for x in re.findall(r"\d+", event)]
            if event.startswith("buys"):
                expected.append(f"{count}+{numbers[0]}={count + numbers[0]}")
                count += numbers[0]
            elif event.startswith("gives"):
                expected.append(f"{count}-{numbers[0]}={count - numbers[0]}")
                count -= numbers[0]
            else:
                product = numbers[0] * numbers[1]
                expected += [f"{numbers[0]}*{numbers[1]}={product}", f"{count}+{product}={count + product}"]
                count += product
        assert example.answer == ", ".join(expected)
        assert example.answer.endswith(f"={count}") and count >= 0


def test_python_output_answers_are_what_a_separate_interpreter_prints():
    """Every kind of snippet, run by a fresh ``python -c``: its single printed line is the answer."""
    import re
    import subprocess
    import sys

    examples = llm_data.python_output(400, 0)
    codes = [e.prompt.split("\n", 1)[1].rsplit("\nAnswer:", 1)[0] for e in examples]
    shapes = {re.sub(r'\d+|"[a-z-]+"|\[[\d, ]+\]', "_", c) for c in codes}  # a program without its values
    assert len(shapes) == 16  # every kind of snippet occurs
    script = "import json, sys\nfor code in json.load(sys.stdin):\n    exec(code, {})\n"
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(codes[:80]),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.splitlines() == [e.answer for e in examples[:80]]
    assert all(e.answer and "\n" not in e.answer for e in examples)


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (1, "eins"),
        (7, "sieben"),
        (11, "elf"),
        (16, "sechzehn"),
        (17, "siebzehn"),
        (21, "einundzwanzig"),
        (30, "dreißig"),
        (99, "neunundneunzig"),
        (100, "einhundert"),
        (101, "einhunderteins"),
        (316, "dreihundertsechzehn"),
        (1000, "eintausend"),
        (1001, "eintausendeins"),
        (1997, "eintausendneunhundertsiebenundneunzig"),
        (2021, "zweitausendeinundzwanzig"),
        (21_000, "einundzwanzigtausend"),
        (101_101, "einhunderteintausendeinhunderteins"),
    ],
)
def test_german_number_words(number, words):
    assert llm_data.german_number(number) == words


def test_package_skills_parse_hand_made_files(tmp_path):
    wordnet = tmp_path / "wn" / llm_data.WORDNET_DIR
    wordnet.mkdir(parents=True)
    (wordnet / "data.noun").write_text(
        "  1 license line\n"
        "00001 03 n 01 problem 0 000 | a question raised for consideration or solution\n"
        "00002 03 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis\n"
        "00003 03 n 01 zzyzx 0 000 | a word nobody tagged in the corpus\n"
    )
    (wordnet / "cntlist.rev").write_text("problem%1:09:00:: 1 100\ndog%1:05:00:: 1 50\n")
    assert llm_data.reverse_dictionary(tmp_path / "wn") == [
        Example(
            "Which word has this meaning: a question raised for consideration or solution?\nAnswer:",
            "problem",
        )
    ]


def test_splits_are_disjoint_seeded_and_keep_test_fixed():
    examples = llm_data.arithmetic(300, 0)
    a = llm_data.make_splits(examples, 0, 100, 20, 50)
    b = llm_data.make_splits(examples, 0, 30, 20, 50)
    prompts = [{e.prompt for e in a[k]} for k in ("train", "validation", "test")]
    assert sum(map(len, prompts)) == len(set.union(*prompts)) == 170
    assert a["test"] == b["test"] and a["validation"] == b["validation"]


def test_a_split_line_without_its_answer_is_one_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(MergeError, match=r"test.jsonl:2: no 'answer' field") as e:
        llm_data.read_split(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("continuation", "expected"),
    [(" 42\nQuestion: next", "42"), ("\n  42 \n", "42"), ('{"a": 1}', '{"a": 1}'), ("", "")],
)
def test_exact_match_normalisation(continuation, expected):
    assert normalize_answer(continuation) == expected


def test_training_batches_mask_everything_but_the_answer():
    data = Encoded(prompts=[[5, 6, 7, 8], [9]], answers=[[1, 2], [3, 4, 2]])
    batch = data.batch([0, 1], pad=0, max_length=5)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 1, 2], [9, 3, 4, 2, 0]]  # a long prompt keeps its end
    assert batch["labels"].tolist() == [[-100, -100, -100, 1, 2], [-100, 3, 4, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_answer_loss_is_the_mean_over_answer_tokens_and_independent_of_batching(tiny_zoo):
    zoo = LLMZoo(tiny_zoo)
    module, tokenizer = load_causal_lm(zoo.base), zoo.tokenizer()
    examples = zoo.split("arithmetic", "test")[:5]
    encoded = encode_examples(tokenizer, examples)
    together = answer_losses(module, encoded, 0, 96, batch_size=5)
    alone = answer_losses(module, encoded, 0, 96, batch_size=1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([encoded.prompts[0] + encoded.answers[0]])
    logits = module(input_ids=ids).logits[0].double()
    start = len(encoded.prompts[0])
    direct = torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[0, start:])
    assert float(together[0]) == pytest.approx(float(direct), rel=1e-6)


def test_quick_pipeline_end_to_end(tiny_zoo):
    zoo = LLMZoo(tiny_zoo)
    assert zoo.skills == ["arithmetic", "json"]
    manifest = zoo.manifest
    assert set(manifest["scores"]) == {"base", "expert:arithmetic", "expert:json", "multitask"}
    for skill in zoo.skills:
        assert manifest["data"][skill]["sizes"] == {"train": 64, "validation": 8, "test": 20}
        # fine-tuning on a skill lowers its answers' loss (lr 3e-3 for 6 steps on a random model)
        assert (
            manifest["scores"][f"expert:{skill}"][skill]["loss"] < manifest["scores"]["base"][skill]["loss"]
        )
    expert = load_causal_lm(zoo.expert("json"))
    base = load_causal_lm(zoo.base)
    moved = [k for k, v in expert.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved, "the expert differs from the base"
    before = json.loads((tiny_zoo / "evals" / "base.json").read_text())
    assert len(before["per_skill"]["json"]["scores"]["hits"]) == 20


def test_a_second_build_reuses_every_stage(tiny_zoo, monkeypatch):
    from mergesmith.bench.zoo import llm

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(llm, "fine_tune", no_training)
    config = LLMZoo(tiny_zoo).manifest["config"]
    config["skills"] = tuple(config["skills"])
    assert build_llm_zoo(root=tiny_zoo, config=LLMZooConfig(**config), progress=False) == tiny_zoo
    assert load_tokenizer(tiny_zoo / "base") is not None


def test_an_experts_only_build_and_reference_rows_on_the_first_prompts(tmp_path, monkeypatch):
    from mergesmith.bench.zoo import llm

    root = build_llm_zoo(
        root=tmp_path / "zoo",
        config=TINY,
        base=tiny_lm(tmp_path / "base"),
        progress=False,
        multitask=False,
        scores=False,
    )
    zoo = LLMZoo(root)
    assert not zoo.multitask.exists() and zoo.manifest["scores"] == {}
    assert not (root / "evals").exists()
    first = reference_evaluations(zoo, ["expert:json"], limit=5)["expert:json"]
    assert [len(first[s]["hits"]) for s in zoo.skills] == [5, 5]
    assert first["json"]["exact_match"] == sum(first["json"]["hits"]) / 5
    with monkeypatch.context() as patched:  # a cached evaluation of 5 prompts answers for 3
        patched.setattr(LLMZoo, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        three = reference_evaluations(zoo, ["expert:json"], limit=3)["expert:json"]
        assert three["json"]["hits"] == first["json"]["hits"][:3]
    full = reference_evaluations(zoo, ["expert:json"])["expert:json"]  # 5 do not cover all 20: evaluated
    assert len(full["json"]["hits"]) == 20 and full["json"]["hits"][:5] == first["json"]["hits"]
    assert full["json"]["losses"][:5] == pytest.approx(first["json"]["losses"])
    # a build with fewer skills (the MoE bench's) reads the same file, and what it adds keeps the others'
    fewer = LLMZoo(root)
    fewer.skills = ["json"]
    calls: list[list[str]] = []
    evaluate = LLMZoo.evaluate
    monkeypatch.setattr(
        LLMZoo, "evaluate", lambda self, *a, **k: calls.append(k["skills"]) or evaluate(self, *a, **k)
    )
    assert reference_evaluations(fewer, ["expert:json"])["expert:json"] == {"json": full["json"]}
    assert reference_evaluations(fewer, ["base"], limit=4)["base"].keys() == {"json"}
    assert calls == [["json"]]
    assert reference_evaluations(zoo, ["expert:json"])["expert:json"] == full
    assert (
        reference_evaluations(zoo, ["base"], limit=4)["base"]["json"]["hits"]
        == (reference_evaluations(fewer, ["base"], limit=4)["base"]["json"]["hits"])
    )
    assert calls == [["json"], ["arithmetic"]]  # only the skill the smaller build had not scored
    with pytest.raises(MergeError, match="no reference row 'multitask'"):
        reference_evaluations(zoo, ["multitask"])
    # the full build trains only what is missing (the multi-task model) and evaluates every row
    trained = []
    real = llm.fine_tune
    monkeypatch.setattr(llm, "fine_tune", lambda *a, **k: trained.append(a[6]) or real(*a, **k))
    build_llm_zoo(root=root, config=TINY, progress=False)
    assert trained == ["multitask"]
    assert set(LLMZoo(root).manifest["scores"]) == {"base", "expert:arithmetic", "expert:json", "multitask"}
    # an experts-only build over a full one keeps the cached rows in its manifest
    build_llm_zoo(root=root, config=TINY, progress=False, multitask=False, scores=False)
    assert set(LLMZoo(root).manifest["scores"]) == {"base", "expert:arithmetic", "expert:json", "multitask"}


def test_lm_eval_harness_scores_equal_the_built_in_evaluator(tiny_zoo, tmp_path):
    """The exported task folder, run by lm-eval's own HF model class, gives the same normalized continuation for
    every prompt, hence the same exact match, as :func:`score_skill`."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mergesmith.bench.zoo.llm import score_skill
    from mergesmith.bench.zoo.lm_eval_tasks import write_lm_eval_tasks
    from mergesmith.fit.evaluate import ExactMatchTask

    zoo = LLMZoo(tiny_zoo)
    folder = write_lm_eval_tasks(zoo, tmp_path / "tasks")
    module, tokenizer = load_causal_lm(zoo.expert("json")), zoo.tokenizer()
    max_length = zoo.manifest["config"]["max_length"]
    model = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=1, max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=["mergesmith_llm"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        random_seed=0,
    )
    for skill in zoo.skills:
        examples = zoo.split(skill, "test")
        ours = score_skill(module, tokenizer, examples, skill, max_length)
        samples = sorted(results["samples"][f"mergesmith_llm_{skill}"], key=lambda s: s["doc_id"])
        theirs = [s["filtered_resps"][0] for s in samples]
        budget = llm_data.SKILLS[skill].max_new_tokens
        task = ExactMatchTask.from_texts(
            [e.prompt for e in examples],
            [e.answer for e in examples],
            tokenizer,
            max_new_tokens=budget,
            max_prompt_length=max_length - budget,
        )
        assert theirs == [normalize_answer(c) for c in task.generate(module, batch_size=1)]
        score = results["results"][f"mergesmith_llm_{skill}"]["exact_match,normalized"]
        assert score == pytest.approx(ours["exact_match"])


def test_the_zoo_is_a_bench_suite(tiny_zoo):
    """``BENCH.yaml`` in the zoo loads as a suite whose fine-tuned rows score what the zoo's own evaluator does."""
    import yaml

    spec = yaml.safe_load((tiny_zoo / "BENCH.yaml").read_text())
    assert set(spec["tasks"]) == {"arithmetic", "json"}
    assert spec["tasks"]["json"]["max_new_tokens"] == llm_data.SKILLS["json"].max_new_tokens
    for task in spec["tasks"].values():
        assert (tiny_zoo / task["expert"] / "config.json").exists()
        assert (tiny_zoo / task["test"]).exists() and (tiny_zoo / task["val"]).exists()


def test_stopping_at_the_first_lines_newline_changes_no_answer(tiny_zoo):
    """A byte-level tokenizer: rows stop once their first line is complete; the compared text is unchanged."""
    import dataclasses

    from mergesmith.fit.evaluate import ExactMatchTask

    zoo = LLMZoo(tiny_zoo)
    module, tokenizer = load_causal_lm(zoo.expert("arithmetic")), zoo.tokenizer()
    examples = zoo.split("arithmetic", "test")
    task = ExactMatchTask.from_texts(
        [e.prompt for e in examples], [e.answer for e in examples], tokenizer, max_new_tokens=12
    )
    early = task.generate(module, batch_size=8)
    full = dataclasses.replace(task, stop_at_newline=False).generate(module, batch_size=8)
    assert [normalize_answer(e) for e in early] == [normalize_answer(f) for f in full]
    assert all(f.startswith(e) for e, f in zip(early, full))
    assert task.first_line_done(tokenizer.encode(" 12\nQ", add_special_tokens=False))
    assert not task.first_line_done(tokenizer.encode("\n 12", add_special_tokens=False))


def self_scoring_suite(zoo_root: Path) -> Path:
    """The zoo's BENCH.yaml with every other answer replaced by its expert's own greedy answer, so that the
    random tiny experts score 50 % and rows can be normalized (their real answers they never learn)."""
    import shutil

    import yaml

    from mergesmith.fit.evaluate import ExactMatchTask

    root = zoo_root.parent / "self-scoring"
    if (root / "BENCH.yaml").exists():
        return root / "BENCH.yaml"
    shutil.copytree(zoo_root, root)
    zoo = LLMZoo(root)
    tokenizer = zoo.tokenizer()
    for skill in zoo.skills:
        module = load_causal_lm(zoo.expert(skill))
        for split in ("validation", "test"):
            examples = zoo.split(skill, split)
            task = ExactMatchTask.from_texts(
                [e.prompt for e in examples], [e.answer for e in examples], tokenizer
            )
            own = [normalize_answer(c) for c in task.generate(module)]
            rows = [Example(e.prompt, own[i] if i % 2 == 0 else e.answer) for i, e in enumerate(examples)]
            llm_data.write_split(root / "data" / skill / f"{split}.jsonl", rows)
    spec = yaml.safe_load((root / "BENCH.yaml").read_text())
    for task in spec["tasks"].values():
        task["max_new_tokens"] = 32  # the budget the answers above were generated with
    (root / "BENCH.yaml").write_text(yaml.safe_dump(spec))
    return root / "BENCH.yaml"


def test_community_rows_merge_under_mergekit_semantics_and_chosen_experts(tiny_zoo):
    """A community row is mergekit's recipe (compat: mergekit) over the experts it names; SLERP's first named
    expert is its base endpoint, as mergekit's slerp recipes put it."""
    from mergesmith import merge_state_dicts
    from mergesmith.bench.suite import Suite
    from mergesmith.bench.zoo.bench import COMMUNITY_ROWS, Bench, BenchMethod, run_bench

    suite = Suite(self_scoring_suite(tiny_zoo))
    bench = Bench(suite, progress=False)
    arithmetic, json_expert = bench.expert_states
    row = BenchMethod(
        "slerp",
        {"t": 0.3},
        [],
        key="slerp(json,arithmetic)",
        compat="mergekit",
        models=("json", "arithmetic"),
    )
    expected = merge_state_dicts(json_expert, [arithmetic], "slerp", compat="mergekit", t=0.3)
    got = bench.merged(row, {"t": 0.3})
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ties = COMMUNITY_ROWS["ties@mergekit"]
    expected = merge_state_dicts(
        bench.base_state, bench.expert_states, "ties", compat="mergekit", density=0.5, weight=0.5
    )
    got = bench.merged(ties, ties.default)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(
        MergeError, match="row 'slerp\\(arithmetic,python_output\\)' merges task 'python_output'"
    ):
        bench.merged(COMMUNITY_ROWS["slerp(arithmetic,python_output)"], {"t": 0.5})
    results = run_bench(suite, methods=["ties@mergekit"], seeds=1, progress=False)
    assert list(results["methods"]) == ["ties@mergekit"]
    assert results["methods"]["ties@mergekit"]["best"]["params"] == {"density": 0.5, "weight": 0.5}


def test_next_token_logits_are_the_lms_at_each_prompts_last_token(tiny_zoo):
    from mergesmith.fit.data import encode_prompts
    from mergesmith.fit.task import TaskModel

    zoo = LLMZoo(tiny_zoo)
    module, tokenizer = load_causal_lm(zoo.expert("json")), zoo.tokenizer()
    examples = zoo.split("json", "test")[:4]
    data = encode_prompts(tokenizer, [e.prompt for e in examples], [e.answer for e in examples], 64)
    logits = TaskModel(module, next_token=True).logits(data)
    for row, example in enumerate(examples):
        ids = torch.tensor([tokenizer(example.prompt)["input_ids"][-64:]])
        torch.testing.assert_close(logits[row], module(input_ids=ids).logits[0, -1], rtol=1e-4, atol=1e-5)
        assert (
            int(data.labels[row]) == tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"][0]
        )


def test_answer_sequences_give_the_answers_log_likelihood_and_its_empirical_fisher(tiny_zoo):
    """encode_answers' targets are the answer's tokens after the prompt; answer_log_likelihood equals minus the
    LM's own answer loss × answer length; the empirical Fisher on them is the mean of per-example squared
    gradients of that log-likelihood, computed here with plain backward passes."""
    from mergesmith.fit.data import encode_answers
    from mergesmith.fit.fisher import diagonal_fisher
    from mergesmith.fit.task import TaskModel

    zoo = LLMZoo(tiny_zoo)
    module, tokenizer = load_causal_lm(zoo.expert("json")), zoo.tokenizer()
    examples = zoo.split("json", "train")[:3]
    data = encode_answers(tokenizer, [e.prompt for e in examples], [e.answer for e in examples], 64)
    model = TaskModel(module, next_token=True)
    params = {n: p.detach() for n, p in module.named_parameters()}
    module.requires_grad_(True)  # the reference gradients below come from plain backward passes
    log_likelihood = model.answer_log_likelihood(data, params)
    expected_fisher = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    for row, example in enumerate(examples):
        prompt = tokenizer(example.prompt)["input_ids"][-64:]
        answer = tokenizer(" " + example.answer.strip(), add_special_tokens=False)["input_ids"]
        length = int(data.attention_mask[row].sum())
        assert data.input_ids[row, :length].tolist() == prompt + answer
        assert data.labels[row][data.labels[row] >= 0].tolist() == answer
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        module.zero_grad()
        loss = module(input_ids=ids, labels=labels).loss  # mean over the answer tokens
        (-loss * len(answer)).backward()
        for n, p in module.named_parameters():
            expected_fisher[n] += p.grad.square() / len(examples)
        torch.testing.assert_close(log_likelihood[row], -loss.detach() * len(answer), rtol=1e-5, atol=1e-5)
    fisher = diagonal_fisher(model, params, data, "empirical", chunk_size=2).fisher
    for n, expected in expected_fisher.items():
        torch.testing.assert_close(fisher[n], expected, rtol=1e-4, atol=1e-10)


def test_data_rows_on_llm_tasks(tiny_zoo, tmp_path, capsys):
    """Fisher (training prompts + answers), RegMean (training prompts) and AdaMerging (unlabeled test prompts) run on
    prompt/answer tasks; Fisher and RegMean merges of one expert given twice score exactly that expert."""
    import yaml

    from mergesmith.cli import main

    source = self_scoring_suite(tiny_zoo)
    spec = yaml.safe_load(source.read_text())
    root = source.parent
    task = spec["tasks"]["json"]
    twice = {"a": dict(task), "b": dict(task)}
    for t in twice.values():
        t["train"] = "data/json/train.jsonl"
        for key in ("expert", "train", "val", "test"):
            t[key] = str(root / t[key])
    bench = {"name": "twice", "base": str(root / "base"), "out": str(tmp_path / "out"), "tasks": twice}
    path = tmp_path / "BENCH.yaml"
    path.write_text(yaml.safe_dump(bench))
    assert main(["bench", str(path), "--methods", "task_arithmetic", "--no-search"]) == 0
    rows = ["fisher", "regmean", "adamerging"]
    code = main(["bench", str(path), "--data", "--methods", *rows, "--no-search", "--step-scale", "0.004"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "out" / "twice.json").read_text())["data_methods"]
    for key in ("fisher", "regmean"):
        assert data["methods"][key]["accuracy"] == pytest.approx(data["finetuned"]), key
    assert set(data["methods"]["adamerging"]["accuracy"]) == {"a", "b"}
    code = main(["bench", str(path), "--data", "--methods", "twin", "--no-search"])
    assert code != 0 and "Twin-Merging routes classification tasks" in capsys.readouterr().err


def test_single_expert_rows_and_the_llm_claims(tiny_zoo):
    """Task arithmetic at λ = 1 on each expert alone is that expert (the row scores exactly the fine-tuned
    accuracy); the LLM claims are checked on the rows they name."""
    from mergesmith.bench.suite import Suite
    from mergesmith.bench.zoo.bench import Bench, markdown_table, run_bench
    from mergesmith.bench.zoo.claims import LLM_CLAIMS, check_claims, extra_rows

    suite = Suite(self_scoring_suite(tiny_zoo))
    bench = Bench(suite, progress=False)
    row = bench.single_expert_row("task_arithmetic", {"lambda": 1.0}, 1)
    assert row["accuracy"] == pytest.approx(bench.finetuned)
    results = run_bench(suite, methods=["task_arithmetic", "ties"], seeds=1, progress=False, search=False)
    assert "| zero-shot (base) |" in markdown_table(results)  # no heads: a causal LM answers by itself
    results["zoo"] = "llm-tiny"
    results["claim_rows"] = extra_rows(suite, results, seeds=1)
    assert set(results["claim_rows"]) == {"dare_single_p0.9"}
    checked = {c["claim"]: c for c in check_claims(results, LLM_CLAIMS)}
    assert set(checked) == {
        "dropping 90 % of one expert's delta (rescaled) keeps its skill",
        "TIES > task arithmetic (paper defaults)",
    }
    for claim in checked.values():
        assert claim["verdict"] in ("reproduced", "not reproduced", "reversed", "not significant")


def test_the_moe_bench_runs_every_row_and_resumes(tiny_zoo, tmp_path, monkeypatch):
    from mergesmith.bench.zoo import moe_bench

    with pytest.raises(MergeError, match="the MoE bench wants arithmetic, json, python_output, topic"):
        moe_bench.run_moe_bench(tiny_zoo, tmp_path, moe_bench.MoEBenchConfig(), progress=False)
    # `--quick`'s settings (its compression row among them), shrunk to the tiny zoo
    quick = moe_bench.MoEBenchConfig.quick()
    config = dataclasses.replace(
        quick,
        skills=("arithmetic", "json"),
        gate_modes=("cheap_embed", "random"),
        prompts_per_expert=2,
        router_steps=2,
        eval_limit=4,
        group_fractions=(0.5,),
        compress=(*quick.compress, (2, 0.5, 0), (2, 0.5, 2)),
        top_p=(0.5,),
        calibration=8,
    )
    results = moe_bench.run_moe_bench(tiny_zoo, tmp_path, config, progress=False)
    rows = results["rows"]
    assert {
        "upcycled:cheap_embed",
        "routed:random",
        "m-smoe@1",
        "random-drop@1",
        "top-1",
        "top-p:0.5",
        "compressed:r8-0.1",
    } <= set(rows)
    assert 1.0 <= rows["top-p:0.5"]["experts_per_token"] <= 2.0
    assert rows["compressed:r2-0.5"]["moe_compress"]["rank"] == 2
    distilled = rows["compressed:r2-0.5-ft2"]["moe_compress"]
    assert distilled["steps"] == 2
    assert distilled["expert_parameters_stored"] < distilled["expert_parameters_dense"]  # S was pruned
    # parameters as stored: the full MoE > one expert per layer (+ its own attention etc.) > that one compressed
    full, merged, compressed = (
        rows[n]["parameters"] for n in ("routed:random", "m-smoe@1", "compressed:r2-0.5")
    )
    assert full == results["upcycled_parameters"]
    assert merged["experts"] * 2 == full["experts"]
    assert (
        full["model"] - full["experts"] == merged["model"] - merged["experts"] + 2 * 32
    )  # each layer's router loses a row
    assert compressed["experts"] == rows["compressed:r2-0.5"]["moe_compress"]["expert_parameters_stored"]
    assert compressed["model"] - compressed["experts"] == merged["model"] - merged["experts"]
    assert (tmp_path / "moe.md").read_text().startswith("# MoE benchmark")
    assert (tmp_path / "moe.png").stat().st_size > 0
    # shuffling the experts' units keeps the function; the merge with alignment undoes it, without does not
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(folder: str) -> torch.Tensor:
        with torch.no_grad():
            return load_causal_lm(tiny_zoo / "moe" / folder)(ids).logits

    assert {"permuted:cheap_embed", "m-smoe@1:permuted", "m-smoe-no-align@1:permuted"} <= set(rows)
    torch.testing.assert_close(logits("routed-cheap_embed-permuted"), logits("routed-cheap_embed"))
    merged = logits("m-smoe-g1")
    torch.testing.assert_close(logits("m-smoe-g1-permuted"), merged)
    assert not torch.allclose(logits("m-smoe-no-align-g1-permuted"), merged, atol=1e-3)
    # the routers trained, nothing else did
    upcycled = load_tensors(tiny_zoo / "moe" / "upcycled-cheap_embed")
    routed = load_causal_lm(tiny_zoo / "moe" / "routed-cheap_embed").state_dict()
    changed = {k for k in upcycled if not torch.equal(upcycled[k], routed[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    monkeypatch.setattr(LLMZoo, "evaluate", lambda *a, **k: pytest.fail("a finished row ran again"))
    assert moe_bench.run_moe_bench(tiny_zoo, tmp_path, config, progress=False)["rows"].keys() == rows.keys()


def test_normalized_exact_match_divides_by_each_skills_expert_and_pairs_rows_on_the_same_prompts():
    """(1/2 / 1/2 + 1/4 / 1/2) / 2 = 0.75; a skill whose expert answers nothing is left out; the paired
    difference is the difference of the two rows' normalized averages, inside its own interval."""
    experts = {"a": 0.5, "b": 0.5, "c": 0.0}
    row = {"a": {"hits": [1, 1, 0, 0]}, "b": {"hits": [1, 0, 0, 0]}, "c": {"hits": [0, 0, 0, 0]}}
    other = {"a": {"hits": [1, 0, 0, 0]}, "b": {"hits": [1, 0, 0, 0]}, "c": {"hits": [1, 1, 1, 1]}}
    alone = normalized_exact_match(row, experts)
    assert alone is not None and alone["estimate"] == pytest.approx(0.75)
    assert alone["low"] <= 0.75 <= alone["high"]
    paired = normalized_exact_match(row, experts, versus=other)
    assert paired is not None and paired["estimate"] == pytest.approx(0.75 - 0.5)
    assert paired["low"] <= 0.25 <= paired["high"]
    assert normalized_exact_match(row, {"a": 0.0}) is None


def test_the_moe_bench_rewrites_a_model_when_its_inputs_or_settings_change(tmp_path):
    """A written model is reused while its inputs (the source models' stamps), its settings and its data file's
    content are the ones it was written with; a progress flag is no setting."""
    from mergesmith.bench.zoo.moe_bench import _written

    writes: list[dict] = []

    def write(source: str, folder: Path, **settings: object) -> None:
        writes.append(settings)
        folder.mkdir(exist_ok=True)
        (folder / "manifest.json").write_text("{}")

    data = tmp_path / "calibration.jsonl"
    runs = [
        ("a", 0, "x", True),
        ("a", 0, "x", False),
        ("b", 0, "x", False),
        ("b", 1, "x", False),
        ("b", 1, "y", False),
    ]
    for inputs, seed, text, progress in runs:
        data.write_text(text)
        _written(write, "source", tmp_path / "model", inputs, data=data, seed=seed, progress=progress)
    assert [w["seed"] for w in writes] == [0, 0, 1, 1]  # the second run reused the first's model


def test_the_llm_evolve_bench_runs_every_row_on_a_tiny_zoo(tiny_zoo, tmp_path, monkeypatch):
    """Sources, the best hand recipe, PS, DFS and PS + DFS (short budgets, in one process): every row scored on
    every skill's test split; the hand recipe is the validation-best of its candidates; the paths load. A rerun
    with every search saved reads the rows back (nothing scored on the test split again); another hand recipe
    recomputes that row only."""
    from mergesmith.bench.zoo.evolve_bench import LLMEvolveConfig, llm_markdown, run_llm_evolve_bench

    # the tiny experts answer nothing, so nothing normalizes by them: the fitness is exact match on 2 prompts
    fitness = (
        {"kind": "exact_match", "data": str(tiny_zoo / "data" / "json" / "validation.jsonl"), "limit": 2},
    )
    config = LLMEvolveConfig(
        layer_granularity=1, ps_budget=12, dfs_budget=14, val_limit=4, hand_lambdas=(0.5,), fitness=fitness
    )
    report = run_llm_evolve_bench(tiny_zoo, tmp_path, config, progress=False, ray=False)
    rows = report["rows"]
    assert {
        "base",
        "expert:arithmetic",
        "expert:json",
        "multitask",
        "best hand recipe",
        "PS",
        "DFS",
        "PS + DFS",
    } <= set(rows)
    for row in rows.values():
        assert set(row["test"]) == {"arithmetic", "json"}
    assert rows["PS + DFS"]["models"][0].endswith("ps/model")
    assert rows["DFS"]["layers"] >= 1
    assert "| PS + DFS |" in llm_markdown(report, ["arithmetic", "json"])
    assert (tmp_path / "evolve-llm.json").exists() and (tmp_path / "evolve-llm.png").stat().st_size > 0

    scored: list[int] = []
    evaluate = LLMZoo.evaluate
    monkeypatch.setattr(LLMZoo, "evaluate", lambda *a, **k: scored.append(1) or evaluate(*a, **k))
    again = run_llm_evolve_bench(tiny_zoo, tmp_path, config, progress=False, ray=False)
    assert not scored
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(rows, sort_keys=True)
    other = dataclasses.replace(config, hand_lambdas=(0.3,))
    assert (
        run_llm_evolve_bench(tiny_zoo, tmp_path, other, progress=False, ray=False)["rows"]["PS"]
        == again["rows"]["PS"]
    )
    assert len(scored) == 1  # the hand recipe's row


def test_the_multitask_reference_row_is_the_suites_score_of_the_multitask_model(tiny_zoo):
    """The LLM table's multi-task row comes from the hits the build keeps; they must be what the suite scores
    for that model (its backbone under each skill's head, as merges are scored), prompt by prompt; a row that
    does not fit the suite is refused in one line."""
    suite = Suite(tiny_zoo / "BENCH.yaml", progress=False)
    kept = multitask_outcomes(LLMZoo(tiny_zoo))
    scored = suite.outcomes(backbone(folder_tensors(tiny_zoo / "multitask"), suite.arch_prefix), "test")
    assert kept.keys() == scored.keys()
    for skill in kept:
        assert torch.equal(kept[skill], scored[skill].bool())
    with pytest.raises(RecipeError, match="reference row 'finetuned' is the suite's own"):
        suite.add_reference("finetuned", kept)
    with pytest.raises(RecipeError, match="scores tasks"):
        suite.add_reference("other", {"json": kept["json"]})
    with pytest.raises(RecipeError, match="test outcomes"):
        suite.add_reference("other", {s: v[:3] for s, v in kept.items()})
