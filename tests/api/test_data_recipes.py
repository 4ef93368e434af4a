"""Data for data-driven merges: data files, recipe keys, the fit inside ``merge``, its saved result and replay."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith import RecipeError, load_recipe, merge, merge_state_dicts
from mergesmith.cli import main, methods_markdown
from mergesmith.fit.data import load_examples
from mergesmith.fit.task import FIT_FILE, FitInputs, FitResult, batches, entropy
from mergesmith.methods import registry
from mergesmith.methods.base import DataNeed, Fit, MergeMethod, Rule
from mergesmith.methods.registry import get_method, register
from mergesmith.ops.stream import TensorContext
from mergesmith.recipe.data import DataSpec, read_examples

METHOD = "test_entropy_average"
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------
# A tiny data-driven method: each expert's weight is its mean prediction entropy on its own data.


def entropy_fit(inputs: FitInputs) -> FitResult:
    values, classes = [], []
    for params, task in zip(inputs.experts, inputs.tasks):
        with torch.no_grad():
            logits = torch.cat([task.model.logits(b, params) for b in batches(task.data, 8)])
        values.append(entropy(logits))
        classes.append(logits.shape[1])
    return FitResult(
        {"entropy": torch.stack(values)},
        {
            "classes": classes,
            "examples": [len(t.data) for t in inputs.tasks],
            "labeled": [t.labeled for t in inputs.tasks],
            "names": len(inputs.experts[0]),
        },
    )


def entropy_rule(
    base: torch.Tensor | None, experts: list[torch.Tensor], params: dict, ctx: TensorContext
) -> torch.Tensor:
    weights = ctx.fitted.tensors["entropy"]
    weights = weights / weights.sum()
    return sum(w * e for w, e in zip(weights.tolist(), experts))


def register_test_method() -> None:
    register(
        MergeMethod(
            name=METHOD,
            rule=Rule(entropy_rule),
            summary="entropy-weighted average (test)",
            paper="test",
            fit=Fit(entropy_fit, DataNeed.UNLABELED),
        )
    )


@pytest.fixture(scope="module", autouse=True)
def test_method():
    register_test_method()
    yield
    del registry.registered[METHOD]


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of an output folder (not its saved fit)."""
    from safetensors.torch import load_file

    return {
        k: v
        for f in sorted(folder.glob("*.safetensors"))
        if f.name != FIT_FILE
        for k, v in load_file(f).items()
    }


def expected_average(
    experts: list[dict[str, torch.Tensor]], weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    w = weights / weights.sum()
    return {n: sum(wi * e[n] for wi, e in zip(w.tolist(), experts)) for n in experts[0]}


# ---------------------------------------------------------------------------------------------------------
# Data files


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_error(spec: dict, need_labels: bool = False) -> str:
    with pytest.raises(RecipeError) as info:
        read_examples(DataSpec.model_validate(spec), need_labels, "model 'm'")
    message = str(info.value)
    assert "\n" not in message and message.startswith("model 'm': ")
    return message


def test_data_file_errors_are_one_line(tmp_path):
    good = write(
        tmp_path / "good.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(12)),
    )
    assert "data file not found" in read_error({"path": str(tmp_path / "missing.jsonl")})
    assert "unknown data format '.txt'" in read_error({"path": str(write(tmp_path / "d.txt", "x"))})
    bad = write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n{"text": "b",\n')
    assert "line 3 is not valid JSON" in read_error({"path": str(bad)})
    assert "line 1 is not a JSON object" in read_error({"path": str(write(tmp_path / "l.jsonl", "[1, 2]\n"))})
    assert "no examples (the file is empty)" in read_error({"path": str(write(tmp_path / "e.jsonl", "\n"))})
    assert "no examples" in read_error({"path": str(write(tmp_path / "e.csv", ""))})
    message = read_error({"path": str(good), "text_column": "sentence"})
    assert "line 1 has no 'sentence' column (columns: text, label)" in message
    assert "has no 'y' column" in read_error({"path": str(good), "label_column": "y"}, need_labels=True)
    read_examples(
        DataSpec(path=str(good), label_column="y"), False
    )  # labels not needed: no label column needed
    assert "line 2: empty text" in read_error(
        {"path": str(write(tmp_path / "s.jsonl", '{"text": "a"}\n{"text": " "}\n'))}
    )
    assert (
        read_error({"path": str(good), "limit": 256})
        == f"model 'm': {good}: 12 examples, the recipe asks for 256 (limit)"
    )
    assert "label 0.5 must be an int" in read_error(
        {"path": str(write(tmp_path / "f.jsonl", '{"text": "a", "label": 0.5}\n'))}, need_labels=True
    )
    assert "has no 'text' column (columns: sentence)" in read_error(
        {"path": str(write(tmp_path / "c.csv", "sentence\nhello\n"))}
    )
    with pytest.raises(RecipeError, match="not found; the text8 zoo has no 'nope' train split"):
        read_examples(DataSpec(zoo="text8", task="nope"), False)


def test_jsonl_and_csv_round_trip_with_string_labels(tmp_path, tiny_zoo):
    rows = [("apple red", "pos"), ("river, slow", "neg"), ("forest", "neutral"), ("blue", "pos")]
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows))
    csv_text = "y,sentence\n" + "".join(f'{y},"{t}"\n' for t, y in rows)  # a quoted comma stays in the text
    csv = write(tmp_path / "d.csv", csv_text)
    ids = {"neg": 0, "neutral": 1, "pos": 2}  # sorted order
    for path in (jsonl, csv):
        spec = DataSpec(path=str(path), text_column="sentence", label_column="y")
        ex = read_examples(spec, need_labels=True)
        assert ex.texts == [t for t, _ in rows]
        assert ex.labels == [ids[y] for _, y in rows]
        assert ex.report()["label_ids"] == ids
        encoded = load_examples(spec, tiny_zoo.tokenizer, need_labels=True)
        assert encoded.labels.tolist() == ex.labels
        reference = tiny_zoo.tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        assert torch.equal(encoded.input_ids, reference["input_ids"])
        hidden = load_examples(spec, tiny_zoo.tokenizer, need_labels=False)
        assert hidden.labels.tolist() == [-1] * len(rows)
        first = read_examples(spec.model_copy(update={"limit": 2}), need_labels=True)
        assert first.texts == ex.texts[:2] and first.labels == ex.labels[:2]  # ids from the whole file
    csv_ints = write(tmp_path / "i.csv", "text,label\na,1\nb,0\n")
    assert read_examples(DataSpec(path=str(csv_ints)), True).labels == [1, 0]  # CSV digits are class ids


def test_recipe_data_keys():
    recipe = load_recipe(
        {
            "merge_method": METHOD,
            "base_model": "b",
            "data": "d.jsonl",
            "fitted": "out",
            "models": [
                {
                    "model": "x",
                    "head": "h.safetensors",
                    "data": {"zoo": "text8", "task": "a", "split": "val", "limit": 8},
                }
            ],
        }
    )
    assert recipe.data == DataSpec(path="d.jsonl")
    assert recipe.models[0].data.split == "val" and recipe.models[0].head == "h.safetensors"
    assert load_recipe(recipe.to_yaml()) == recipe  # the saved recipe reloads (replay, resume)
    for data, pattern in [
        ({"path": "a.jsonl", "zoo": "text8", "task": "a"}, "either `path:`"),
        ({"zoo": "text8"}, "needs `task:`"),
        ({"path": "a.csv", "split": "val"}, "goes with `zoo:`"),
        ({"path": "a.csv", "colum": "x"}, "unknown key 'data.colum' \\(known data keys: path"),
    ]:
        with pytest.raises(RecipeError, match=pattern) as info:
            load_recipe({"merge_method": "linear", "data": data})
        assert "\n" not in str(info.value) and "Value error" not in str(info.value)


def test_methods_listing_marks_data_methods(capsys):
    assert f"| `{METHOD}` | required | unlabeled |" in methods_markdown()
    assert "| `ties` | required | — |" in methods_markdown()
    assert main(["methods"]) == 0
    assert "[needs unlabeled data]" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Merging with data

LIMIT = 16


def zoo_recipe(zoo, **extra) -> dict:
    """Model 'a' with its own data file, model 'b' with the recipe's data (the zoo's split), each with its head."""
    return {
        "merge_method": METHOD,
        "base_model": str(zoo.base),
        "models": [
            {
                "model": str(zoo.encoder_path("a")),
                "head": str(zoo.root / "tasks/a/head.safetensors"),
                "data": {"path": str(zoo.root / "data/a/train.jsonl"), "limit": LIMIT},
            },
            {"model": str(zoo.encoder_path("b")), "head": str(zoo.root / "tasks/b/head.safetensors")},
        ],
        "data": {"zoo": "text8", "task": "b", "limit": LIMIT},
        **extra,
    }


@pytest.fixture
def zoo_cache(tiny_zoo, monkeypatch):
    monkeypatch.setenv("MERGESMITH_CACHE", str(tiny_zoo.root.parent.parent))  # so that `zoo: text8` finds it
    return tiny_zoo


def test_recipe_merge_fits_saves_and_replays(zoo_cache, tmp_path, monkeypatch):
    zoo = zoo_cache
    out = tmp_path / "merged"
    merge(zoo_recipe(zoo), out, progress=False)
    fitted = FitResult.load(out)
    assert (out / FIT_FILE).exists() and fitted.info["examples"] == [LIMIT, LIMIT]
    assert fitted.info["labeled"] == [False, False]  # an unlabeled method never sees labels
    tasks = [zoo.task(t, "train", LIMIT, labeled=False) for t in ("a", "b")]
    experts = [zoo.state_dict(zoo.encoder_path(t)) for t in ("a", "b")]
    for i, task in enumerate(tasks):  # the fit ran each expert's weights with its own head on its own data
        logits = torch.cat([task.model.logits(b, experts[i]) for b in batches(task.data, 8)])
        torch.testing.assert_close(fitted.tensors["entropy"][i], entropy(logits.detach()))
    merged = load_tensors(out)
    for name, value in expected_average(experts, fitted.tensors["entropy"]).items():
        torch.testing.assert_close(merged[name], value)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["examples"] == {
        str(zoo.encoder_path("a")): LIMIT,
        str(zoo.encoder_path("b")): LIMIT,
    }
    assert manifest["fit"]["data"][str(zoo.encoder_path("b"))]["file"].endswith("data/b/train.jsonl")

    # the state-dict route with the zoo's tasks gives the same tensors
    in_memory = merge_state_dicts(zoo.state_dict(zoo.base), experts, METHOD, tasks=tasks)
    assert in_memory.keys() == merged.keys() and all(torch.equal(in_memory[n], merged[n]) for n in merged)

    # replay: the same output, bit for bit, without fitting
    def no_fit(inputs):
        raise AssertionError("replay must not fit")

    monkeypatch.setitem(registry.registered, METHOD, dataclasses.replace(get_method(METHOD), fit=Fit(no_fit)))
    replay = tmp_path / "replayed"
    merge(zoo_recipe(zoo, fitted=str(out)), replay, progress=False)
    again = load_tensors(replay)
    assert merged.keys() == again.keys() and all(torch.equal(merged[n], again[n]) for n in merged)
    assert json.loads((replay / "manifest.json").read_text())["fit"]["replayed_from"] == str(out)
    assert torch.equal(FitResult.load(replay).tensors["entropy"], fitted.tensors["entropy"])


def test_sequence_classifiers_keep_their_own_heads(tiny_zoo, tmp_path):
    """Without head:, each checkpoint's classifier (2 and 3 classes here) is its task head: used for the fit, never
    merged; the output keeps the base's classifier."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_zoo.base)
    base = BertForSequenceClassification(config)
    base.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny_zoo.base).save_pretrained(tmp_path / "base")
    paths = []
    for k in (2, 3):
        expert = BertForSequenceClassification(BertConfig.from_pretrained(tiny_zoo.base, num_labels=k))
        state = {
            n: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
            for n, v in base.state_dict().items()
            if not n.startswith("classifier.")
        }
        expert.load_state_dict(state, strict=False)
        expert.save_pretrained(tmp_path / f"cls{k}")
        paths.append(tmp_path / f"cls{k}")
    out = tmp_path / "merged"
    merge(
        {
            "merge_method": METHOD,
            "base_model": str(tmp_path / "base"),
            "models": [str(p) for p in paths],
            "data": {"path": str(tiny_zoo.root / "data/a/train.jsonl"), "limit": 8},
        },
        out,
        progress=False,
    )
    fitted = FitResult.load(out)
    assert fitted.info["classes"] == [2, 3]
    merged, base_tensors = load_tensors(out), load_tensors(tmp_path / "base")
    experts = [load_tensors(p) for p in paths]
    assert fitted.info["names"] == len(
        [n for n in experts[0] if not n.startswith("classifier.") and experts[0][n].is_floating_point()]
    )  # heads are not merge inputs
    assert merged.keys() == base_tensors.keys()
    assert torch.equal(merged["classifier.weight"], base_tensors["classifier.weight"])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(
        merged[name], expected_average([{name: e[name]} for e in experts], fitted.tensors["entropy"])[name]
    )


def test_recipe_data_errors_leave_no_output(tiny_zoo, tmp_path, monkeypatch, capsys):
    zoo = tiny_zoo
    recipe = zoo_recipe(zoo)
    del recipe["data"]
    out = tmp_path / "out"
    cases = [
        (
            recipe,
            f"model '{zoo.encoder_path('b')}': method '{METHOD}' needs data: add `data:` to this model or to "
            "the recipe",
        ),
        (
            {
                **recipe,
                "models": [recipe["models"][0], {"model": str(zoo.encoder_path("b"))}],
                "data": {"path": str(zoo.root / "data/b/train.jsonl")},
            },
            "has no head: but model",
        ),
        (
            {**zoo_recipe(zoo), "data": {"path": str(tmp_path / "missing.jsonl")}},
            "missing.jsonl: data file not found",
        ),
        (
            {**zoo_recipe(zoo), "data": {"path": str(zoo.root / "data/b/train.jsonl"), "limit": 1000}},
            "40 examples, the recipe asks for 1000 \\(limit\\)",
        ),
        ({**zoo_recipe(zoo), "fitted": str(tmp_path)}, "no saved fit here"),
        (
            {
                **zoo_recipe(zoo),
                "data": {
                    "path": str(write(tmp_path / "l.jsonl", '{"text": "red", "label": 5}\n')),
                    "labeled": True,
                },
            },
            "has label 5 \\(class id 5\\) but the model's head has 2",
        ),
    ]
    for bad, pattern in cases:
        path = write(tmp_path / "recipe.yaml", yaml.safe_dump(bad))
        assert main(["merge", str(path), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
        assert pytest.importorskip("re").search(pattern, err), err
        assert not out.exists() and not list(tmp_path.glob(".out.*"))

    # a failing fit leaves nothing either (no output, no partial folder, no lock)
    def failing_fit(inputs):
        raise RecipeError("the fit failed")

    monkeypatch.setitem(
        registry.registered, METHOD, dataclasses.replace(get_method(METHOD), fit=Fit(failing_fit))
    )
    with pytest.raises(RecipeError, match="the fit failed"):
        merge(
            {**zoo_recipe(zoo), "data": {"path": str(zoo.root / "data/b/train.jsonl"), "limit": 4}},
            out,
            progress=False,
        )
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_process_reports_data_error_without_traceback(tiny_zoo, tmp_path):
    recipe = {**zoo_recipe(tiny_zoo), "data": {"path": str(tmp_path / "bad.jsonl")}}
    write(tmp_path / "bad.jsonl", '{"text": "apple"}\nnot json\n')
    path = write(tmp_path / "recipe.yaml", yaml.safe_dump(recipe))
    out = tmp_path / "out"
    bootstrap = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'src')!r}]; import tests.api.test_data_recipes as t; "
        "t.register_test_method(); from mergesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", bootstrap, "merge", str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == f"error: model '{tiny_zoo.encoder_path('b')}': {tmp_path / 'bad.jsonl'}: line 2 is not "
        "valid JSON (Expecting value)\n"
    )
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_resume_reuses_the_saved_fit(zoo_cache, tmp_path, monkeypatch):
    from mergesmith.api import pipeline

    out = tmp_path / "merged"
    real_write_tensors = pipeline.write_tensors

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(zoo_recipe(zoo_cache), out, progress=False)
    assert (tmp_path / ".merged.partial" / FIT_FILE).exists() and not out.exists()
    saved = FitResult.load(tmp_path / ".merged.partial")

    monkeypatch.setattr(pipeline, "write_tensors", real_write_tensors)
    monkeypatch.setitem(
        registry.registered, METHOD, dataclasses.replace(get_method(METHOD), fit=Fit(interrupted))
    )
    merge(zoo_recipe(zoo_cache), out, progress=False, resume=True)  # the saved fit, not a new one
    assert torch.equal(FitResult.load(out).tensors["entropy"], saved.tensors["entropy"])
    assert json.loads((out / "manifest.json").read_text())["fit"]["resumed"] is True


def test_adamerging_recipe_writes_a_replayable_learned_recipe(zoo_cache, tmp_path):
    """A recipe-level AdaMerging merge leaves learned_recipe.yaml: a plain task_arithmetic recipe with the learned
    coefficients that gives the same tensors without data."""
    zoo = zoo_cache
    out = tmp_path / "adamerged"
    recipe = zoo_recipe(zoo, merge_method="adamerging", parameters={"steps": 2, "batch_size": 4})
    merge(recipe, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["learned_recipe"] == "learned_recipe.yaml"
    replayed = tmp_path / "replayed"
    merge(out / "learned_recipe.yaml", replayed, progress=False)
    a, b = load_tensors(out), load_tensors(replayed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6)
