"""The evaluator against transformers itself, on tiny random BERT, RoBERTa, MPNet, DeBERTa-v2, GPT-2, Llama,
Mistral and Qwen2 models: classification (sequence classifiers, and encoders with a linear head over pooled
states), perplexity and greedy exact match, ``params=``, batch-size independence, the one-line errors, and the
zoo's evaluation through the evaluator."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mergesmith.errors import CheckpointError, MergeError, RecipeError
from mergesmith.fit.data import encode, mean_pool
from mergesmith.fit.evaluate import (
    ClassificationTask,
    EvalTask,
    ExactMatchTask,
    PerplexityTask,
    load_classification,
    load_exact_match,
    load_perplexity,
    normalize_answer,
)
from mergesmith.fit.hf import load_causal_lm, load_classifier
from mergesmith.fit.task import TaskModel
from tests.fit.tiny_models import (
    ARCHS,
    DECODERS,
    ENCODERS,
    build_causal_lm,
    build_classifier,
    linear_head,
    write_classification,
    write_prompts,
    write_text,
)

WINDOW = 40  # perplexity windows: the text is not a multiple of this, so the last window is shorter
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Every architecture's classifier (seed 0), the decoders' causal LMs (seed 0), second checkpoints (seed
    1) for the ``params=`` tests, a linear head and the data files."""
    root = tmp_path_factory.mktemp("evaluate")
    for arch in ARCHS:
        build_classifier(root / arch, arch, 0)
    for arch in DECODERS:
        build_causal_lm(root / f"{arch}-lm", arch, 0)
    for arch in ("bert", "llama"):
        build_classifier(root / f"{arch}-b", arch, 1)
    for arch in ("gpt2", "qwen2"):
        build_causal_lm(root / f"{arch}-lm-b", arch, 1)
    save_file(linear_head(0), str(root / "head.safetensors"))
    write_classification(root / "cls.jsonl")
    write_text(root / "text.txt")
    write_prompts(root / "qa.jsonl")
    return root


def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reference_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def hf_inputs(folder: Path, data: Path) -> tuple[dict, torch.Tensor]:
    examples = rows(data)
    inputs = tokenizer(folder)(
        [r["text"] for r in examples], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    return dict(inputs), torch.tensor([r["label"] for r in examples])


def assert_close_metrics(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key


# --- classification


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_classifier_matches_hf_logits(tiny, arch):
    from transformers import AutoModelForSequenceClassification

    task, model = load_classification(tiny / arch, tiny / "cls.jsonl")
    metrics = task.evaluate(model, batch_size=8)
    inputs, labels = hf_inputs(tiny / arch, tiny / "cls.jsonl")
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(tiny / arch)(**inputs).logits
    accuracy, loss = reference_metrics(logits, labels)
    assert metrics["examples"] == len(labels) == 24
    assert metrics["accuracy"] == accuracy
    assert metrics["loss"] == pytest.approx(loss, abs=1e-5)
    assert torch.allclose(task.logits(model), logits, atol=1e-5)
    assert_close_metrics(task.evaluate(model, batch_size=1), metrics)
    outcomes = task.outcomes(model)  # per example, in the data's order: what a bootstrap interval resamples
    assert outcomes.dtype == torch.bool and outcomes.tolist() == (logits.argmax(1) == labels).tolist()


HEAD_CASES = [
    *((a, p) for a in ENCODERS for p in ("mean", "cls")),
    *((a, "last") for a in DECODERS),
    ("gpt2", "mean"),
]


@pytest.mark.parametrize(("arch", "pooling"), HEAD_CASES)
def test_encoder_with_linear_head_matches_pooled_hf_states(tiny, arch, pooling):
    from transformers import AutoModel

    head = linear_head(0)
    task, model = load_classification(
        tiny / arch, tiny / "cls.jsonl", head=tiny / "head.safetensors", pooling=pooling
    )
    metrics = task.evaluate(model, batch_size=8)
    inputs, labels = hf_inputs(tiny / arch, tiny / "cls.jsonl")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(tiny / arch)(**inputs).last_hidden_state
    mask = inputs["attention_mask"]
    if pooling == "mean":
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:  # right padding: the last real token is at length - 1
        pooled = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
    accuracy, loss = reference_metrics(pooled @ head["weight"].T + head["bias"], labels)
    assert metrics["accuracy"] == accuracy
    assert metrics["loss"] == pytest.approx(loss, abs=1e-5)
    assert_close_metrics(task.evaluate(model, batch_size=1), metrics)


def test_mean_pooling_is_bit_identical_to_the_old_form(tiny):
    task, model = load_classification(tiny / "bert", tiny / "cls.jsonl", head=tiny / "head.safetensors")
    assert model.pooling == "mean"
    batch = task.data.batch(torch.arange(8))
    with torch.no_grad():
        hidden = model.module(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        old = F.linear(
            mean_pool(hidden.float(), batch.attention_mask), model.head["weight"], model.head["bias"]
        )
        assert torch.equal(model.logits(batch), old)
    with pytest.raises(MergeError, match="unknown pooling 'max'"):
        TaskModel(model.module, model.head, pooling="max")  # type: ignore[arg-type]


def test_a_left_padding_tokenizer_is_set_to_pad_right(tiny, tmp_path):
    folder = tmp_path / "llama-left"
    folder.mkdir()
    for f in (tiny / "llama").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    assert tokenizer(folder).padding_side == "left"
    task, model = load_classification(folder, tiny / "cls.jsonl")
    reference, reference_model = load_classification(tiny / "llama", tiny / "cls.jsonl")
    assert torch.equal(task.data.input_ids, reference.data.input_ids)
    assert task.evaluate(model) == reference.evaluate(reference_model)


def test_params_give_the_other_checkpoints_classification_metrics(tiny):
    for arch in ("bert", "llama"):
        task, model = load_classification(tiny / arch, tiny / "cls.jsonl")
        _, other = load_classification(tiny / f"{arch}-b", tiny / "cls.jsonl")
        before = {k: v.clone() for k, v in model.module.state_dict().items()}
        params = load_file(tiny / f"{arch}-b" / "model.safetensors")
        with_params = task.evaluate(model, params=params)
        assert_close_metrics(with_params, task.evaluate(other), tol=1e-6)
        assert with_params != task.evaluate(model)
        after = model.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the module's own weights are untouched


def test_evaluation_runs_in_eval_mode_and_restores_the_mode(tiny):
    task, model = load_classification(tiny / "roberta", tiny / "cls.jsonl")
    for m in model.module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # would change every result in training mode
    model.module.train()
    first = task.evaluate(model)
    assert model.module.training
    assert task.evaluate(model) == first
    model.module.eval()
    assert task.evaluate(model) == first


# --- perplexity


@pytest.mark.parametrize("arch", DECODERS)
def test_perplexity_is_exp_of_the_hf_loss_over_the_windows(tiny, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny / f"{arch}-lm"
    task, model = load_perplexity(folder, tiny / "text.txt", max_length=WINDOW)
    metrics = task.evaluate(model, batch_size=8)
    ids = torch.tensor(tokenizer(folder)((tiny / "text.txt").read_text())["input_ids"])
    windows = [w for w in torch.split(ids, WINDOW) if len(w) > 1]
    assert len(windows[-1]) < WINDOW and metrics["windows"] == len(windows)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    total = 0.0
    with torch.no_grad():
        for w in windows:
            total += float(reference(input_ids=w[None], labels=w[None]).loss) * (len(w) - 1)
    tokens = len(ids) - len(windows)
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert_close_metrics(task.evaluate(model, batch_size=1), metrics)


def test_params_give_the_other_checkpoints_perplexity(tiny):
    # GPT-2 ties its LM head to the embedding: the saved file has only the latter
    for arch in ("gpt2", "qwen2"):
        task, model = load_perplexity(tiny / f"{arch}-lm", tiny / "text.txt", max_length=WINDOW)
        _, other = load_perplexity(tiny / f"{arch}-lm-b", tiny / "text.txt", max_length=WINDOW)
        params = load_file(tiny / f"{arch}-lm-b" / "model.safetensors")
        with_params = task.evaluate(model, params=params)
        assert_close_metrics(with_params, task.evaluate(other), tol=1e-6)
        assert with_params["loss"] != task.evaluate(model)["loss"]


def test_default_window_is_the_models_context(tiny):
    task, model = load_perplexity(tiny / "gpt2-lm", tiny / "text.txt")
    assert task.max_length == model.config.n_positions == 64
    assert isinstance(task, EvalTask)


# --- exact match


def hf_greedy(model, tok, prompts: list[str]) -> list[str]:
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            new = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=tok.pad_token_id,
            )
            new = new[0, ids.shape[1] :].tolist()
            eos = model.generation_config.eos_token_id
            stops = set(eos if isinstance(eos, list) else [eos])
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            out.append(tok.decode(new[:cut], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_exact_match_agrees_with_generate(tiny, arch, tmp_path):
    folder = tiny / f"{arch}-lm"
    prompts = [r["prompt"] for r in rows(tiny / "qa.jsonl")]
    task, model = load_exact_match(folder, tiny / "qa.jsonl", max_new_tokens=NEW_TOKENS)
    tok = tokenizer(folder)
    reference = hf_greedy(model, tok, prompts)
    full = dataclasses.replace(task, stop_at_newline=False)  # every token up to the budget or end-of-text
    assert full.generate(model, batch_size=8) == reference
    assert full.generate(model, batch_size=1) == reference
    # stopping a row at its first line's newline is exact: a prefix of the full continuation, same first line
    early = task.generate(model, batch_size=8)
    assert all(r.startswith(e) for e, r in zip(early, reference, strict=True))
    assert [normalize_answer(e) for e in early] == [normalize_answer(r) for r in reference]
    # answers: the model's own (normalized) output for every other prompt, a wrong one for the rest
    answers = [normalize_answer(r) if i % 2 == 0 else "xyz" for i, r in enumerate(reference)]
    data = write_prompts(tmp_path / "qa.jsonl", answers=answers)
    mixed, _ = load_exact_match(folder, data, max_new_tokens=NEW_TOKENS)
    assert mixed.evaluate(model, batch_size=8) == {"exact_match": 0.5, "examples": 10}
    assert mixed.evaluate(model, batch_size=3) == {"exact_match": 0.5, "examples": 10}
    # stopping at EOS: make the second new token of the longest continuation the end-of-text token
    longest = tok(prompts[max(range(len(prompts)), key=lambda i: len(reference[i]))])["input_ids"]
    new = model.generate(
        torch.tensor([longest]), do_sample=False, max_new_tokens=2, pad_token_id=tok.pad_token_id
    )[0, len(longest) :]
    assert len(new) == 2
    model.generation_config.eos_token_id = int(new[1])
    stopped = hf_greedy(model, tok, prompts)
    assert stopped != reference and full.generate(model, batch_size=4) == stopped


def test_a_row_stops_where_finished_says_and_keeps_the_tokens_before(tiny):
    from mergesmith.fit.evaluate import check_params, greedy

    task, model = load_exact_match(tiny / "llama-lm", tiny / "qa.jsonl", max_new_tokens=NEW_TOKENS)
    args = (model, check_params(model, None), task.prompts, NEW_TOKENS, [], 0)
    full = greedy(*args)
    assert all(len(row) == NEW_TOKENS for row in full)
    cut = greedy(*args, finished=lambda tokens: len(tokens) == 2 or tokens[-1] == full[0][0])
    assert cut[0] == full[0][:1] and all(row == f[:2] or row == f[:1] for row, f in zip(cut, full))


def test_params_give_the_other_checkpoints_generations(tiny):
    task, model = load_exact_match(tiny / "qwen2-lm", tiny / "qa.jsonl", max_new_tokens=NEW_TOKENS)
    _, other = load_exact_match(tiny / "qwen2-lm-b", tiny / "qa.jsonl", max_new_tokens=NEW_TOKENS)
    params = load_file(tiny / "qwen2-lm-b" / "model.safetensors")
    assert task.generate(model, params=params) == task.generate(other) != task.generate(model)


def test_answer_normalization():
    assert normalize_answer("  Paris \nThe next question") == "Paris"
    assert normalize_answer("\n\n 42\n") == "42"
    assert normalize_answer(" a\nb ", stop_at_newline=False) == "a\nb"
    assert normalize_answer("Paris.") != "Paris"  # punctuation and case count


# --- errors


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line_and_name_the_file(tiny, tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(RecipeError) as e:
        load_exact_match(tiny / "gpt2-lm", missing)
    assert str(missing) in one_line(e) and "not found" in one_line(e)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ba", "answer": "be"}\n{"question": "ba", "answer": "be"}\n')
    with pytest.raises(RecipeError) as e:
        load_exact_match(tiny / "gpt2-lm", bad)
    assert one_line(e) == (
        f"{bad}: line 2 has no 'prompt' column (columns: question, answer); name the column (--prompt-column)"
    )
    with pytest.raises(RecipeError, match="has no 'sentence' column"):
        load_classification(tiny / "bert", tiny / "cls.jsonl", text_column="sentence")
    with pytest.raises(RecipeError, match=r"must be a \.txt"):
        load_perplexity(tiny / "gpt2-lm", tiny / "cls.jsonl")
    for folder, hint in (
        (tiny / "bert", "not a causal language model"),
        (tiny / "deberta-v2", "cannot load it as a causal language model"),
    ):
        with pytest.raises(CheckpointError) as e:
            load_perplexity(folder, tiny / "text.txt")
        assert one_line(e).startswith(f"{folder}: {hint}") and "ForCausalLM checkpoint" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_classification(tmp_path / "nowhere", tiny / "cls.jsonl")
    assert "no such model folder" in one_line(e) and "nothing is downloaded" in one_line(e)
    with pytest.raises(RecipeError, match="longer than the model's context"):
        load_perplexity(tiny / "gpt2-lm", tiny / "text.txt", max_length=100)
    with pytest.raises(MergeError, match="pooling goes with a linear head"):
        load_classification(tiny / "bert", tiny / "cls.jsonl", pooling="cls")


def test_model_errors(tiny, tmp_path):
    from transformers import AutoModel

    bare = tmp_path / "bare-encoder"
    AutoModel.from_pretrained(tiny / "bert").save_pretrained(bare)
    (bare / "tokenizer.json").write_bytes((tiny / "bert" / "tokenizer.json").read_bytes())
    (bare / "tokenizer_config.json").write_bytes((tiny / "bert" / "tokenizer_config.json").read_bytes())
    with pytest.raises(CheckpointError) as e:
        load_classification(bare, tiny / "cls.jsonl")
    assert one_line(e).startswith(f"{bare}: not a sequence classifier") and "--head" in one_line(e)
    wide = tmp_path / "wide.safetensors"
    save_file(linear_head(0, width=8), str(wide))
    with pytest.raises(CheckpointError, match="reads 8 features but the model's hidden size is 16"):
        load_classification(tiny / "bert", tiny / "cls.jsonl", head=wide)
    task, model = load_classification(tiny / "bert", tiny / "cls.jsonl")
    with pytest.raises(CheckpointError, match=r"does not have, e\.g\. 'bert\.nothing'"):
        task.evaluate(model, params={"bert.nothing": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"'classifier.bias' has shape \(2,\)"):
        task.evaluate(model, params={"classifier.bias": torch.zeros(2)})
    many = ClassificationTask(encode(tokenizer(tiny / "bert"), ["ba be", "da"], [0, 7]), name="many")
    with pytest.raises(CheckpointError, match="many: label 7 but the model has 3 classes"):
        many.evaluate(model)
    with pytest.raises(RecipeError, match="encodes to no tokens"):
        ExactMatchTask([[1], []], ["a", "b"], tokenizer(tiny / "gpt2-lm"))
    with pytest.raises(RecipeError, match="too short"):
        PerplexityTask(torch.arange(10), max_length=1)


def test_loaders_give_fp32_eval_modules_without_gradients(tiny):
    for module in (load_classifier(tiny / "llama", require_head=True), load_causal_lm(tiny / "llama-lm")):
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())


# --- the zoo through the evaluator


def old_accuracy(encoder, head, data, bf16):
    """The zoo's accuracy before the evaluator (``bench.zoo.models.accuracy`` at f6417b9): mean-pooled features
    in length-sorted batches of 128, then the linear head."""
    from mergesmith.bench.zoo.models import pooled

    predictions = torch.nn.functional.linear(pooled(encoder, data, 128, bf16), head["weight"], head["bias"])
    return float((predictions.argmax(1) == data.labels).float().mean()) if len(data) else math.nan


def test_zoo_evaluate_equals_the_old_accuracy_path(tiny_zoo, monkeypatch):
    from mergesmith.bench.zoo.models import accuracy, load_encoder

    base = load_encoder(tiny_zoo.base)
    expert = load_encoder(tiny_zoo.encoder_path("a"))
    merged = {
        k: (v + tiny_zoo.state_dict(tiny_zoo.encoder_path("b"))[k]) / 2
        for k, v in tiny_zoo.state_dict(tiny_zoo.encoder_path("a")).items()
    }
    merged_encoder = load_encoder(tiny_zoo.base, merged)
    shared = {k: v.clone() for k, v in tiny_zoo.shared_module().state_dict().items()}
    for given, encoder in (
        (tiny_zoo.encoder_path("a"), expert),
        (expert, expert),
        (merged, merged_encoder),
        (tiny_zoo.state_dict(tiny_zoo.base), base),
    ):
        for split in ("val", "test"):
            old = {
                t: old_accuracy(encoder, tiny_zoo.head(t), tiny_zoo.split(t, split), False)
                for t in tiny_zoo.tasks
            }
            assert tiny_zoo.evaluate(given, split) == old
            # the zoo build's and the backdoor bench's accuracy goes through the evaluator too
            assert {
                t: accuracy(encoder, tiny_zoo.head(t), tiny_zoo.split(t, split), bf16=False) for t in old
            } == old
    # a merge runs through params=: the shared encoder keeps the base weights
    assert all(torch.equal(v, tiny_zoo.shared_module().state_dict()[k]) for k, v in shared.items())
    # a zoo built with bf16 evaluates its encoders under bf16 autocast, as before
    monkeypatch.setitem(tiny_zoo.manifest["config"], "bf16", True)
    for given, encoder in ((expert, expert), (merged, merged_encoder)):
        old = {
            t: old_accuracy(encoder, tiny_zoo.head(t), tiny_zoo.split(t, "test"), True)
            for t in tiny_zoo.tasks
        }
        assert tiny_zoo.evaluate(given, "test") == old
