"""``mergesmith bench BENCH.yaml`` and ``mergesmith eval MODEL BENCH.yaml`` on tiny random models of two
architectures: a BERT suite (a sequence classifier and an encoder with a head file) and a Llama suite (a sequence
classifier, a perplexity task and an exact-match task). Each number is checked against an independent computation
(the experts' own modules with the merged backbone loaded the ordinary way); a rerun resumes without merging;
every bad input is a one-line error naming the file or key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergesmith.bench.suite import Suite, backbone, folder_tensors
from mergesmith.bench.zoo.bench import markdown_table, reference_rows
from mergesmith.cli import main
from mergesmith.errors import RecipeError
from mergesmith.fit.evaluate import ClassificationTask, PerplexityTask, load_exact_match, normalize_answer
from tests.fit.tiny_models import (
    build_tokenizer,
    config,
    linear_head,
    write_classification,
    write_prompts,
    write_text,
)


def perturbed(module: torch.nn.Module, seed: int, names_under: str = "") -> None:
    """'Fine-tuning': add seeded noise to the module's backbone weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(names_under) and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def with_backbone(module: torch.nn.Module, base: torch.nn.Module, prefix: str) -> torch.nn.Module:
    """``module`` with its backbone replaced by ``base``'s weights (an ordinary load_state_dict)."""
    state = {f"{prefix}.{k}": v for k, v in base.state_dict().items()}
    module.load_state_dict(state, strict=False)
    return module


@pytest.fixture(scope="module")
def bert_suite(tmp_path_factory) -> Path:
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("bert-suite")
    torch.manual_seed(0)
    base = BertModel(config("bert"))
    base.save_pretrained(root / "base")
    build_tokenizer(root / "base", with_cls=True)
    torch.manual_seed(1)
    classifier = with_backbone(BertForSequenceClassification(config("bert")), base, "bert")
    perturbed(classifier, 1, "bert.")
    classifier.save_pretrained(root / "cls")
    build_tokenizer(root / "cls", with_cls=True)
    encoder = BertModel(config("bert"))
    encoder.load_state_dict(base.state_dict())
    perturbed(encoder, 2)
    encoder.save_pretrained(root / "enc")
    build_tokenizer(root / "enc", with_cls=True)
    save_file(linear_head(3), str(root / "head.safetensors"))
    data = root / "data"
    data.mkdir()
    for task, seed in (("cls", 10), ("enc", 20)):
        write_classification(data / f"{task}-train.jsonl", n=16, seed=seed + 2)
        write_classification(data / f"{task}-val.jsonl", n=12, seed=seed)
        write_classification(data / f"{task}-test.jsonl", n=40, seed=seed + 1)
    spec = {
        "name": "tiny-bert",
        "base": "base",
        "seeds": 2,
        "out": "out",
        "tasks": {
            "cls": {
                "expert": "cls",
                "train": "data/cls-train.jsonl",
                "val": "data/cls-val.jsonl",
                "test": "data/cls-test.jsonl",
            },
            "enc": {
                "expert": "enc",
                "head": "head.safetensors",
                "train": "data/enc-train.jsonl",
                "val": "data/enc-val.jsonl",
                "test": "data/enc-test.jsonl",
            },
        },
    }
    (root / "BENCH.yaml").write_text(yaml.safe_dump(spec))
    return root / "BENCH.yaml"


@pytest.fixture(scope="module")
def llama_suite(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("llama-suite")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config("llama"))
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() > 1:
                p.mul_(8.0)  # greedy continuations that vary with the prompt
    base.save_pretrained(root / "base")
    build_tokenizer(root / "base", with_cls=False)
    torch.manual_seed(1)
    classifier = with_backbone(LlamaForSequenceClassification(config("llama")), base.model, "model")
    perturbed(classifier, 1, "model.")
    classifier.save_pretrained(root / "cls")
    for name, seed in (("lm", 2), ("qa", 3)):
        lm = LlamaForCausalLM(config("llama"))
        lm.load_state_dict(base.state_dict())
        perturbed(lm, seed)
        lm.save_pretrained(root / name)
    for name in ("cls", "lm", "qa"):
        build_tokenizer(root / name, with_cls=False)
    data = root / "data"
    data.mkdir()
    write_classification(data / "cls-val.jsonl", n=8, seed=1)
    write_classification(data / "cls-test.jsonl", n=30, seed=2)
    write_text(data / "lm-val.txt", lines=20, seed=3)
    write_text(data / "lm-test.txt", lines=60, seed=4)
    for split, n, seed in (("val", 6, 5), ("test", 24, 6)):
        # the answers are the qa expert's own greedy continuations: it scores 100 % on its task
        path = write_prompts(data / f"qa-{split}.jsonl", n=n, seed=seed)
        task, model = load_exact_match(root / "qa", path, max_new_tokens=3)
        answers = [normalize_answer(c) for c in task.generate(model)]
        write_prompts(path, n=n, seed=seed, answers=answers)
    spec = {
        "base": "base",
        "seeds": 1,
        "tasks": {
            "cls": {"expert": "cls", "val": "data/cls-val.jsonl", "test": "data/cls-test.jsonl"},
            "lm": {
                "expert": "lm",
                "metric": "perplexity",
                "max_length": 16,
                "val": "data/lm-val.txt",
                "test": "data/lm-test.txt",
            },
            "qa": {
                "expert": "qa",
                "metric": "exact_match",
                "max_new_tokens": 3,
                "val": "data/qa-val.jsonl",
                "test": "data/qa-test.jsonl",
            },
        },
    }
    (root / "BENCH.yaml").write_text(yaml.safe_dump(spec))
    return root / "BENCH.yaml"


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def mean_backbone(*folders: Path, prefix: str) -> dict[str, torch.Tensor]:
    states = [backbone(folder_tensors(f), prefix) for f in folders]
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def test_bert_suite_end_to_end(bert_suite, capsys):
    from transformers import AutoModelForSequenceClassification, BertModel

    root = bert_suite.parent
    code, _, _ = run(capsys, "bench", bert_suite, "--methods", "linear", "task_arithmetic")
    assert code == 0
    results = json.loads((root / "out" / "tiny-bert.json").read_text())
    assert results["tasks"] == ["cls", "enc"] and results["kinds"] == {"cls": "accuracy", "enc": "accuracy"}
    ref = results["reference"]
    assert ref["finetuned"]["normalized"] == pytest.approx(1.0)
    # the experts' accuracies and the zero-shot row, recomputed with ordinary modules
    suite = Suite(bert_suite, progress=False)
    cls_test = suite._tasks["cls"].splits["test"]
    enc_test = suite._tasks["enc"].splits["test"]
    expert = AutoModelForSequenceClassification.from_pretrained(root / "cls").eval()
    assert ref["finetuned"]["accuracy"]["cls"] == pytest.approx(cls_test.evaluate(expert)["accuracy"])
    base = BertModel.from_pretrained(root / "base")
    zeroshot = with_backbone(AutoModelForSequenceClassification.from_pretrained(root / "cls"), base, "bert")
    assert ref["zeroshot"]["accuracy"]["cls"] == pytest.approx(cls_test.evaluate(zeroshot.eval())["accuracy"])
    # the linear row: the mean of the two backbones, loaded into each task's own model
    merged = mean_backbone(root / "cls", root / "enc", prefix="bert")
    model = AutoModelForSequenceClassification.from_pretrained(root / "cls")
    model.load_state_dict({f"bert.{k}": v for k, v in merged.items()}, strict=False)
    linear = results["methods"]["linear"]["default"]
    assert linear["accuracy"]["cls"] == pytest.approx(cls_test.evaluate(model.eval())["accuracy"])
    encoder = BertModel.from_pretrained(root / "enc", add_pooling_layer=False)
    encoder.load_state_dict({k: v for k, v in merged.items() if not k.startswith("pooler.")})
    head_model = suite._tasks["enc"].model
    from mergesmith.fit.task import TaskModel

    ours = ClassificationTask(enc_test.data).evaluate(TaskModel(encoder.eval(), head_model.head))["accuracy"]
    assert linear["accuracy"]["enc"] == pytest.approx(ours)
    # intervals and the table
    assert linear["ci"]["low"] <= linear["normalized"] <= linear["ci"]["high"]
    table = (root / "out" / "tiny-bert.md").read_text()
    first = table.splitlines()[0]  # the command that made the report
    assert first.startswith("# Benchmark `tiny-bert`: `mergesmith bench ") and str(bert_suite) in first
    assert "norm. avg [95 % CI]" in table and "`task_arithmetic`" in table and "vs TA" in table
    assert (root / "out" / "tiny-bert.png").stat().st_size > 1000


def test_bert_suite_resumes_without_merging(bert_suite, capsys, monkeypatch):
    from mergesmith.bench.zoo import bench

    root = bert_suite.parent
    run(capsys, "bench", bert_suite, "--methods", "linear")
    first = json.loads((root / "out" / "tiny-bert.json").read_text())

    def no_merge(*args, **kwargs):
        raise AssertionError("a finished method was merged again")

    monkeypatch.setattr(bench, "merge_state_dicts", no_merge)
    code, _, _ = run(capsys, "bench", bert_suite, "--methods", "linear")
    assert code == 0
    again = json.loads((root / "out" / "tiny-bert.json").read_text())
    assert (
        again["methods"]["linear"]["default"]["accuracy"] == first["methods"]["linear"]["default"]["accuracy"]
    )


def test_eval_a_model_on_a_bench_file(bert_suite, capsys):
    root = bert_suite.parent
    code, out, _ = run(capsys, "eval", root / "cls", bert_suite, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["values"]["cls"] == pytest.approx(report["finetuned"]["cls"])  # the expert on its own task
    assert report["ci"]["low"] <= report["normalized"] <= report["ci"]["high"]
    code, out, _ = run(capsys, "eval", root / "base", bert_suite)
    assert code == 0 and "normalized average" in out


def test_llama_suite_with_causal_lm_tasks(llama_suite, capsys):
    from transformers import AutoModelForCausalLM

    root = llama_suite.parent
    code, _, _ = run(capsys, "bench", llama_suite, "--methods", "linear")
    assert code == 0
    results = json.loads((root / "bench-out" / "BENCH.json").read_text())
    assert results["kinds"] == {"cls": "accuracy", "lm": "loss", "qa": "accuracy"}
    ref = results["reference"]
    assert ref["finetuned"]["normalized"] == pytest.approx(1.0)
    # perplexity of the zero-shot row: the base's backbone under the expert's own LM head, scored the ordinary way
    suite = Suite(llama_suite, progress=False)
    lm_task: PerplexityTask = suite._tasks["lm"].splits["test"]
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    zeroshot = with_backbone(AutoModelForCausalLM.from_pretrained(root / "lm"), base.model, "model").eval()
    sums, counts = lm_task.window_sums(zeroshot)
    assert ref["zeroshot"]["accuracy"]["lm"] == pytest.approx(float((sums / counts).mean()))
    # its normalized score is the ratio of perplexities
    ft_loss = ref["finetuned"]["accuracy"]["lm"]
    zs_loss = ref["zeroshot"]["accuracy"]["lm"]
    others = [ref["zeroshot"]["accuracy"][t] / ref["finetuned"]["accuracy"][t] for t in ("cls", "qa")]
    expected = (math.exp(ft_loss - zs_loss) + sum(others)) / 3
    assert ref["zeroshot"]["normalized"] == pytest.approx(expected)
    assert ref["finetuned"]["accuracy"]["qa"] == 1.0
    assert "lm (ppl)" in (root / "bench-out" / "BENCH.md").read_text()


def edit(bench_file: Path, tmp_path: Path, change) -> Path:
    """A copy of the suite's BENCH.yaml (same folder: its relative paths still hold) changed by ``change``."""
    spec = yaml.safe_load(bench_file.read_text())
    change(spec, bench_file.parent)
    target = bench_file.parent / f"bad-{tmp_path.name}.yaml"
    target.write_text(yaml.safe_dump(spec))
    return target


def set_task(key, value, task="cls"):
    def change(spec, root):
        spec["tasks"][task][key] = value

    return change


def write_labels(name, labels):
    def change(spec, root):
        rows = [{"text": "ba be", "label": y} for y in labels]
        (root / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec["tasks"]["cls"]["test"] = f"data/{name}"

    return change


def other_architecture(spec, root):
    from transformers import RobertaForSequenceClassification

    if not (root / "roberta").exists():
        RobertaForSequenceClassification(config("roberta")).save_pretrained(root / "roberta")
        build_tokenizer(root / "roberta", with_cls=True)
    spec["tasks"]["cls"]["expert"] = "roberta"


def renamed_tensor(spec, root):
    from safetensors.torch import load_file

    if not (root / "renamed").exists():
        (root / "renamed").mkdir()
        for f in (root / "enc").iterdir():
            (root / "renamed" / f.name).write_bytes(f.read_bytes())
        state = load_file(root / "enc" / "model.safetensors")
        key = next(k for k in state if k.endswith("query.weight"))
        state[key.replace("query", "querry")] = state.pop(key)
        save_file(state, str(root / "renamed" / "model.safetensors"), metadata={"format": "pt"})
    spec["tasks"]["enc"]["expert"] = "renamed"


BAD = [
    (set_task("test", "data/missing.jsonl"), "data file not found"),
    (set_task("text_column", "sentence"), "no 'sentence' column"),
    (write_labels("big-label.jsonl", [0, 1, 7] * 10), "label 7 is outside the expert's 3 classes"),
    (write_labels("few.jsonl", [0, 1, 2]), "has 3 examples; a test split needs at least 20"),
    (other_architecture, "different backbones"),
    (renamed_tensor, "different backbones"),
    (set_task("expert", "nowhere"), "no such model folder"),
    (set_task("heads", "x.safetensors"), "unknown key 'tasks.cls.heads'"),
    (lambda spec, root: spec.pop("base"), "missing required key 'base'"),
    (lambda spec, root: spec.update(methods=["nope"]), "'nope' is not in the benchmark"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_bench_files_are_one_line_errors(bert_suite, tmp_path, capsys, change, message):
    bad = edit(bert_suite, tmp_path, change)
    code, _, err = run(capsys, "bench", bad, "--methods", "linear")
    errors = [line for line in err.splitlines() if line.strip() and "\r" not in line and "shards" not in line]
    assert code != 0 and len(errors) == 1 and message in errors[0], err  # one line (progress bars aside)
    assert "Traceback" not in err
    assert not (bad.parent / "out" / f"{bad.stem}.json").exists()  # nothing half-written


# ---------------------------------------------------------------------------------------------------------
# --data: the data-driven rows on a BENCH.yaml


def test_fit_tasks_name_parameters_as_the_merged_backbone(bert_suite):
    """A classifier's fit task runs its backbone under the backbone's own names (the head is never merged), so
    that classifier and head-file tasks fit in one name space; its pooled features are its last hidden layer."""
    from transformers import AutoModelForSequenceClassification

    from mergesmith.fit.data import mean_pool

    suite = Suite(bert_suite, progress=False)
    names = set(suite.base_state())
    for name in ("cls", "enc"):
        task = suite.task(name, "train", limit=4)
        assert set(task.model.merge_names()) <= names
        assert not any(n.startswith(("classifier.", "bert.")) for n in task.model.merge_names())
        assert len(task.data) == 4 and task.labeled
    cls = suite.task("cls", "train", limit=4, labeled=False)
    assert bool((cls.data.labels == -1).all())
    expert = AutoModelForSequenceClassification.from_pretrained(bert_suite.parent / "cls").eval()
    batch = cls.data
    with torch.no_grad():
        want = mean_pool(
            expert.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state,
            batch.attention_mask,
        )
        # params= under backbone names reach the backbone: the base's weights give the base's logits
        base_state = suite.base_state()
        zeroshot = with_backbone(
            AutoModelForSequenceClassification.from_pretrained(bert_suite.parent / "cls"),
            type(expert.bert).from_pretrained(bert_suite.parent / "base"),
            "bert",
        ).eval()
        got_logits = cls.model.logits(batch, {n: base_state[n] for n in cls.model.merge_names()})
        want_logits = zeroshot(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(cls.model.features(batch), want)
    torch.testing.assert_close(got_logits, want_logits)


def test_bert_suite_data_rows(bert_suite, capsys, monkeypatch):
    root = bert_suite.parent
    assert run(capsys, "bench", bert_suite, "--methods", "task_arithmetic", "--no-search")[0] == 0
    rows = ["fisher", "regmean", "adamerging", "twin", "dam"]
    args = ["bench", bert_suite, "--data", "--step-scale", "0.01", "--seeds", "1", "--no-search"]
    code, out, err = run(capsys, *args, "--methods", *rows)
    assert code == 0, err
    results = json.loads((root / "out" / "tiny-bert.json").read_text())
    data = results["data_methods"]
    assert list(data["methods"]) == rows and data["step_scale"] == 0.01
    for key in rows:
        row = data["methods"][key]
        assert set(row["accuracy"]) == {"cls", "enc"}
        assert row["ci"]["low"] <= row["normalized"] <= row["ci"]["high"]
        assert "vs_task_arithmetic" in row
    assert data["methods"]["twin"]["runs"][0]["info"]["router_accuracy"] is not None
    assert "`regmean`" in out and "`twin`" in (root / "out" / "tiny-bert.md").read_text()
    assert (root / "out" / "tiny-bert-data.png").stat().st_size > 1000

    # finished rows resume without fitting again
    from mergesmith.bench.zoo import databench

    def no_fit(*a, **k):
        raise AssertionError("a finished row was fitted again")

    monkeypatch.setattr(databench, "fit_state_dicts", no_fit)
    monkeypatch.setattr(databench, "build_twin", no_fit)
    assert run(capsys, *args, "--methods", *rows)[0] == 0
    again = json.loads((root / "out" / "tiny-bert.json").read_text())["data_methods"]
    assert again["methods"]["fisher"]["accuracy"] == data["methods"]["fisher"]["accuracy"]


def test_data_rows_of_identical_experts_keep_the_expert(tmp_path, bert_suite, capsys):
    """Fisher and RegMean merges of one expert given twice are that expert: each task scores what the expert
    scores (normalized 100 %), whichever data each task brings."""
    root = bert_suite.parent
    spec = yaml.safe_load(bert_suite.read_text())
    cls = spec["tasks"]["cls"]
    spec["tasks"] = {"a": cls, "b": {**cls, "train": "data/enc-train.jsonl", "test": "data/enc-test.jsonl"}}
    spec.update(name="twice", out=str(tmp_path / "out"))
    spec["base"] = str(root / "base")
    for task in spec["tasks"].values():
        for key in ("expert", "train", "val", "test"):
            task[key] = str(root / task[key])
    path = tmp_path / "BENCH.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run(capsys, "bench", path, "--methods", "task_arithmetic", "--no-search")[0] == 0
    code, _, err = run(capsys, "bench", path, "--data", "--methods", "fisher", "regmean", "--no-search")
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "twice.json").read_text())["data_methods"]
    for key in ("fisher", "regmean"):
        assert data["methods"][key]["accuracy"] == pytest.approx(data["finetuned"]), key


def test_data_rows_need_classification_tasks_and_training_texts(bert_suite, llama_suite, tmp_path, capsys):
    code, _, err = run(capsys, "bench", llama_suite, "--data", "--methods", "adamerging")
    assert code != 0 and "tasks.lm: the data-driven rows fit on classification or prompt/answer tasks" in err

    def drop_train(spec, root):
        spec["tasks"]["enc"].pop("train")
        spec["name"] = "no-train"

    no_train = edit(bert_suite, tmp_path, drop_train)
    assert run(capsys, "bench", no_train, "--methods", "task_arithmetic", "--no-search")[0] == 0
    code, _, err = run(capsys, "bench", no_train, "--data", "--methods", "fisher")
    assert code != 0 and "tasks.enc: Fisher, RegMean and Twin-Merging fit on labeled training texts" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    code, _, err = run(capsys, "bench", no_train, "--data", "--methods", "nope")
    assert code != 0 and "'nope' is not in the benchmark" in err


def test_evolve_scores_candidates_on_a_bench_file_as_the_bench_does(bert_suite, tmp_path):
    """``fitness: {kind: bench}``: the search's best fitness is the normalized validation average of its best
    recipe merged to disk, computed by the suite directly; the test split is never read by the search."""
    from transformers import BertModel

    from mergesmith.bench.zoo.bench import accuracies
    from mergesmith.bench.zoo.evolve_fitness import BENCH_KINDS
    from mergesmith.bench.zoo.text8 import summarize
    from mergesmith.drivers.evolve.search import MODEL, evolve

    root = bert_suite.parent
    other = BertModel.from_pretrained(root / "base")
    perturbed(other, 3)
    other.save_pretrained(tmp_path / "enc2")
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [str(root / "enc"), str(tmp_path / "enc2")],
        "fitness": {"kind": "bench", "bench": str(bert_suite), "split": "val"},
        "optimizer": {"budget": 8, "popsize": 4},
    }
    result = evolve(spec, tmp_path / "s", ray=False, progress=False, extra_kinds=BENCH_KINDS)
    suite = Suite(bert_suite, progress=False)
    finetuned = accuracies(suite.reference_outcomes()["finetuned"])
    merged = backbone(folder_tensors(tmp_path / "s" / MODEL), suite.arch_prefix)
    expected = summarize(accuracies(suite.outcomes(merged, "val")), finetuned, suite.kinds)["normalized"]
    assert result.best_fitness == pytest.approx(expected, rel=1e-6)
    bad = {**spec, "fitness": {"kind": "bench", "bench": str(bert_suite), "split": "test"}}
    with pytest.raises(Exception, match="validation split"):
        evolve(bad, tmp_path / "t", ray=False, progress=False, extra_kinds=BENCH_KINDS)


def test_a_limit_cuts_exact_match_splits_too(llama_suite):
    """``--val-limit`` scores the first examples of exact-match tasks as of classification ones (it used to
    score every prompt); a whole causal LM of another shape is refused on a suite with a classification task."""
    suite = Suite(llama_suite, progress=False)
    full, cut = suite.outcomes(None, "val"), suite.outcomes(None, "val", limit=3)
    assert len(full["qa"]) > 3 and len(cut["qa"]) == 3
    assert torch.equal(cut["qa"], full["qa"][:3])
    assert torch.equal(cut["cls"], full["cls"][:3])
    with pytest.raises(RecipeError, match="task 'cls' classifies with the expert's head"):
        suite.module_outcomes(torch.nn.Linear(1, 1), "val")


def test_an_added_reference_row_is_shown_and_bootstrapped_like_the_suites_own(llama_suite):
    """A reference row scored elsewhere (the LLM zoo's multi-task model) joins the zero-shot and fine-tuned rows:
    one that equals the fine-tuned outcomes normalizes to 1 with the same interval."""
    suite = Suite(llama_suite, progress=False)
    finetuned = suite.reference_outcomes()["finetuned"]
    suite.add_reference("multitask", finetuned)
    rows = reference_rows(suite)
    assert list(rows) == ["zeroshot", "finetuned", "multitask"]
    assert rows["multitask"]["normalized"] == pytest.approx(1.0)
    results = {"tasks": suite.tasks, "kinds": suite.kinds, "reference": rows, "methods": {}}
    table = markdown_table(results)
    assert rows["multitask"]["ci"] == rows["finetuned"]["ci"]
    assert "| multi-task | — |" in table
