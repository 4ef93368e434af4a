"""`make demo`: train a small Llama and two fine-tunes of it on this CPU, merge the fine-tunes, compare.

What it shows: two experts fine-tuned from one base on different kinds of text can be merged into one
checkpoint that keeps much of each expert's skill, without any training. Everything is built locally in a
few minutes, with no downloads:

1. Text found on every Debian/Python machine, in two domains: **Python source** (the standard library's
   ``*.py`` files) and **English prose** (the license texts in ``/usr/share/common-licenses`` and the English
   reference text ``pydoc`` shows, from the stdlib's ``pydoc_data``; code examples and repeats left out).
   Each domain gets a fixed, seeded train / held-out split (by file for Python, by paragraph for prose).
2. A byte-level BPE tokenizer trained on the training text of both domains, saved with every model so that
   ``AutoTokenizer.from_pretrained(folder)`` works.
3. A **base** Llama (random init, fixed seed; 2 layers, hidden 128, untied embeddings, 0.8M parameters)
   trained briefly on both domains, then two **experts** fine-tuned from it, one on each domain. Saved as HF
   folders (safetensors) under ``<out>/models``, with a marker file so a second run reuses them
   (``--rebuild`` retrains).
4. Merges of the two experts with ``mergesmith.merge``: TIES from the example recipe ``examples/demo.yaml``,
   and from in-process dict recipes the plain average (linear) and task arithmetic (base + the sum of both
   task vectors, which is what TIES refines: it trims small changes and drops the ones whose sign disagrees).
5. A table of held-out loss (mean token cross-entropy, and perplexity) on each domain for the base, each
   expert and each merge. Each expert is better than the base on its own domain and worse on the other. The
   linear and TIES merges keep part of each expert's gain and lose less of the other domain, so on average
   they beat the base and both experts; task arithmetic at full weight (the plain sum) overshoots: the
   interference between task vectors that TIES was designed to reduce.

The experts fine-tune the transformer layers and keep the base's embeddings and output head frozen
(``freeze_vocab``). At this size a fully fine-tuned output head mostly learns which tokens its domain never
uses (a large loss on the other domain, a small gain on its own), and that change dominates the interference
between the experts; freezing it leaves task vectors that merge well. Set ``freeze_vocab=False`` to see the
full fine-tune: the experts forget more, and no merge does much better than the base.

Training runs in fp32: on CPUs without native bf16 (AVX2 only, like the one this was tuned on) bf16 autocast
is several times slower. Everything is seeded (weights, data order, splits, tokenizer); a rebuild on the
same machine gives the same numbers.

Run: ``python -m mergesmith.bench.llama_demo [--out demo-out] [--rebuild] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from mergesmith.api import merge

EOS = "<|endoftext|>"
MARKER = "demo-complete.json"
ROLES = ("base", "python", "prose")
DEFAULT_OUT = Path("demo-out")
DEFAULT_RECIPE = Path(__file__).resolve().parents[3] / "examples" / "demo.yaml"
# stdlib folders that are not ordinary hand-written Python (tests, data tables, vendored packages)
SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "__pycache__",
}
LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class DemoConfig:
    """Model size, training and data settings. The defaults take about two minutes to train on two cores."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab: int = 1024
    seq_len: int = 128
    batch: int = 8
    base_steps: int = 800
    expert_steps: int = 250
    base_lr: float = 3e-3
    expert_lr: float = 1e-3
    freeze_vocab: bool = True  # experts keep the base's embeddings and output head (see the module docstring)
    python_chars: int = 1_200_000  # how much stdlib source to read (a seeded sample of files)
    heldout_frac: float = 0.1
    eval_blocks: int = 128  # at most this many held-out windows of seq_len tokens per domain
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------
# Data


def python_documents(max_chars: int, seed: int) -> list[str]:
    """A seeded sample of the standard library's own ``*.py`` files (one document per file)."""
    lib = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in lib.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(lib).parts))
    random.Random(seed).shuffle(files)
    docs: list[str] = []
    total = 0
    for path in files:
        if total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text[:50_000]  # long modules would crowd out the rest
        docs.append(text)
        total += len(text)
    if not docs:
        raise RuntimeError(f"no Python source found under {lib}")
    return docs


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace inside each collapsed to single spaces."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def is_prose(paragraph: str) -> bool:
    """A sentence or more of mostly letters and spaces (drops headings, code examples, tables)."""
    return len(paragraph) >= 40 and sum(c.isalpha() or c == " " for c in paragraph) >= 0.85 * len(paragraph)


def prose_documents() -> list[str]:
    """English prose, one document per paragraph, exact repeats removed (the GPL family shares many).

    Two sources every Debian machine with Python has: the license texts in ``/usr/share/common-licenses``
    (Debian's base-files) and the English reference text that ``pydoc`` shows (the stdlib's
    ``pydoc_data.topics``), code examples left out. Either alone is enough where the other is missing.
    """
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    if LICENSES.is_dir():
        for path in sorted({p.resolve() for p in LICENSES.iterdir() if p.is_file()}):
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
    docs = list(dict.fromkeys(p for t in texts for p in paragraphs(t) if is_prose(p)))
    if not docs:
        raise RuntimeError("no English prose found (pydoc_data, /usr/share/common-licenses)")
    return docs


def split_documents(docs: list[str], frac: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded train / held-out split of whole documents (at least one of each), order kept."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[: min(len(docs) - 1, max(1, round(frac * len(docs))))])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def load_corpora(cfg: DemoConfig) -> dict[str, tuple[list[str], list[str]]]:
    """Domain name -> (train documents, held-out documents)."""
    return {
        "python": split_documents(python_documents(cfg.python_chars, cfg.seed), cfg.heldout_frac, cfg.seed),
        "prose": split_documents(prose_documents(), cfg.heldout_frac, cfg.seed),
    }


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style, lossless on any text) trained on ``texts``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def encode(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token."""
    ids: list[int] = []
    for row in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_texts(corpora: dict[str, tuple[list[str], list[str]]]) -> list[str]:
    """Training text of every domain, each capped at the smallest domain's size so none dominates."""
    cap = min(sum(len(d) for d in train) for train, _ in corpora.values())
    texts = []
    for train, _ in corpora.values():
        total = 0
        for doc in train:
            if total >= cap:
                break
            texts.append(doc)
            total += len(doc)
    return texts


# ---------------------------------------------------------------------------------------------------------
# Model, training, evaluation


def make_model(cfg: DemoConfig, tokenizer):
    """A randomly initialised LlamaForCausalLM (seeded). Untied embeddings, like most Llama checkpoints
    people merge: ``embed_tokens`` and ``lm_head`` are then two tensors the merge handles separately."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 10 % of steps, then cosine decay to lr / 10."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model, streams: list[torch.Tensor], cfg: DemoConfig, steps: int, lr: float, seed: int, desc: str
) -> float:
    """AdamW on random windows of ``seq_len`` tokens; batch rows cycle over ``streams`` (a mix of domains
    when more than one). Returns the mean loss of the last 10 % of steps."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        rows = []
        for i in range(cfg.batch):
            stream = streams[i % len(streams)]
            start = int(torch.randint(0, len(stream) - cfg.seq_len, (1,), generator=generator))
            rows.append(stream[start : start + cfg.seq_len])
        x = torch.stack(rows)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


def eval_blocks(stream: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens from a held-out stream (at most eval_blocks)."""
    n = min(cfg.eval_blocks, len(stream) // cfg.seq_len)
    return stream[: n * cfg.seq_len].view(n, cfg.seq_len)


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats per token) over every position of every block, in fp32."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        x = blocks[start : start + batch]
        logits = model(input_ids=x).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


# ---------------------------------------------------------------------------------------------------------
# Building the models


def _stamp(cfg: DemoConfig, role: str) -> dict[str, Any]:
    """What a saved model depends on: every setting but the evaluation size."""
    config = asdict(cfg)
    del config["eval_blocks"]
    return {"role": role, "config": config}


def is_complete(folder: Path, cfg: DemoConfig, role: str) -> bool:
    """True when ``folder`` holds a finished model built with this config (its marker file matches)."""
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text()) == _stamp(cfg, role) and (folder / "config.json").exists()
    except (OSError, ValueError):
        return False


def save(model, tokenizer, folder: Path, cfg: DemoConfig, role: str, info: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    model.save_pretrained(folder)  # safetensors: the only format transformers 5 writes
    tokenizer.save_pretrained(folder)
    (folder / "demo-train.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / MARKER).write_text(json.dumps(_stamp(cfg, role), indent=2) + "\n")  # written last


def build_models(
    out: str | Path,
    cfg: DemoConfig | None = None,
    rebuild: bool = False,
    corpora: dict[str, tuple[list[str], list[str]]] | None = None,
) -> dict[str, Path]:
    """Train (or reuse) the tokenizer, the base and the two experts; returns role -> model folder.

    A model is reused when its folder's marker matches ``cfg``; retraining the base retrains the experts.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = cfg or DemoConfig()
    root = Path(out) / "models"
    folders = {role: root / role for role in ROLES}
    if not rebuild and all(is_complete(folders[r], cfg, r) for r in ROLES):
        print(f"reusing the models in {root} (--rebuild to train them again)")
        return folders
    corpora = corpora or load_corpora(cfg)

    if rebuild or not is_complete(folders["base"], cfg, "base"):
        start = time.perf_counter()
        tokenizer = train_tokenizer(tokenizer_texts(corpora), cfg.vocab)
        streams = {name: encode(tokenizer, train_docs) for name, (train_docs, _) in corpora.items()}
        tokens = ", ".join(f"{name} {len(s) / 1e3:.0f}k" for name, s in streams.items())
        print(
            f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - start:.1f} s); training tokens: {tokens}"
        )
        model = make_model(cfg, tokenizer)
        print(
            f"model: Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
            f"({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, vocab {len(tokenizer)})"
        )
        loss = train(model, list(streams.values()), cfg, cfg.base_steps, cfg.base_lr, cfg.seed, "base")
        save(
            model,
            tokenizer,
            folders["base"],
            cfg,
            "base",
            {"domains": list(streams), "steps": cfg.base_steps, "final_loss": loss},
        )
        rebuild = True  # the experts must start from this base
    else:
        tokenizer = AutoTokenizer.from_pretrained(folders["base"])
        streams = {name: encode(tokenizer, train_docs) for name, (train_docs, _) in corpora.items()}

    for i, role in enumerate(ROLES[1:], start=1):
        if not rebuild and is_complete(folders[role], cfg, role):
            continue
        model = LlamaForCausalLM.from_pretrained(folders["base"], dtype=torch.float32)
        if cfg.freeze_vocab:
            model.get_input_embeddings().weight.requires_grad_(False)
            model.get_output_embeddings().weight.requires_grad_(False)
        loss = train(model, [streams[role]], cfg, cfg.expert_steps, cfg.expert_lr, cfg.seed + i, role)
        save(
            model,
            tokenizer,
            folders[role],
            cfg,
            role,
            {"domains": [role], "steps": cfg.expert_steps, "final_loss": loss},
        )
    return folders


# ---------------------------------------------------------------------------------------------------------
# Merging and the comparison


def demo_recipes(recipe_path: Path, out: Path) -> dict[str, str | Path | dict[str, Any]]:
    """Method name -> recipe: the example YAML for TIES (a dict with its paths moved when ``--out`` is not
    the default), and linear and task arithmetic over the same models."""
    ties = yaml.safe_load(recipe_path.read_text())
    prefix = str(DEFAULT_OUT / "models")

    def moved(path: str) -> str:
        return str(out / "models" / Path(path).relative_to(prefix)) if path.startswith(prefix) else path

    same_place = out.resolve() == DEFAULT_OUT.resolve()
    base = moved(ties["base_model"])
    experts = [moved(m["model"]) for m in ties["models"]]
    ties = {
        **ties,
        "base_model": base,
        "models": [{**m, "model": e} for m, e in zip(ties["models"], experts)],
    }
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
            "dtype": "float32",
        },
        "ties": recipe_path if same_place else ties,
    }


def run_merges(out: Path, recipe_path: Path) -> dict[str, Path]:
    """Merge the experts with each demo recipe; returns method -> merged folder."""
    folders = {}
    for method, recipe in demo_recipes(recipe_path, out).items():
        folder = out / f"merged-{method}"
        result = merge(recipe, folder, force=True, progress=False)
        print(result.summary())
        folders[method] = folder
    return folders


def evaluate(
    folders: dict[str, Path], corpora: dict[str, tuple[list[str], list[str]]], cfg: DemoConfig
) -> dict[str, dict[str, float]]:
    """Row name -> domain -> held-out loss, every model loaded from its folder with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(next(iter(folders.values())))
    blocks = {name: eval_blocks(encode(tokenizer, held), cfg) for name, (_, held) in corpora.items()}
    print(
        "\nheld-out loss in nats per token (lower is better) on "
        + " and ".join(f"{b.numel()} {n} tokens" for n, b in blocks.items())
    )
    results = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        results[name] = {domain: heldout_loss(model, b) for domain, b in blocks.items()}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Rows of held-out loss and perplexity per domain, and the mean loss over the domains."""
    domains = list(next(iter(results.values())))
    width = max(len(name) for name in results) + 2
    head = (
        f"{'model':<{width}}"
        + "".join(f"{d + ' loss':>13}{d + ' ppl':>12}" for d in domains)
        + f"{'avg loss':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, losses in results.items():
        avg = sum(losses.values()) / len(losses)
        cells = "".join(f"{losses[d]:>13.3f}{math.exp(losses[d]):>12.1f}" for d in domains)
        lines.append(f"{name:<{width}}{cells}{avg:>10.3f}")
    return "\n".join(lines)


def free_cores() -> int:
    """Cores not busy with other work (by the 1-minute load average), at least 1. On a shared machine
    one thread is many times faster than threads that wait on each other. The numbers do not depend on it
    (1 and 2 threads give bit-identical training here); pass --threads to pin it anyway."""
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mergesmith.bench.llama_demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: demo-out)")
    parser.add_argument("--rebuild", action="store_true", help="retrain the models even if they exist")
    parser.add_argument(
        "--recipe", type=Path, default=DEFAULT_RECIPE, help="the TIES recipe (examples/demo.yaml)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the cores not already busy, at least 1)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads or free_cores())
    print(f"mergesmith demo: models and merges in {args.out}/, {torch.get_num_threads()} torch thread(s)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # only the training bars: loading and saving are instant at this size
    if not args.recipe.exists():
        parser.error(f"recipe {args.recipe} not found; pass --recipe path/to/demo.yaml")
    cfg = DemoConfig()
    args.out.mkdir(parents=True, exist_ok=True)

    corpora = load_corpora(cfg)
    models = build_models(args.out, cfg, args.rebuild, corpora)
    merged = run_merges(args.out, args.recipe)
    names = {"base": "base", "python": "python expert", "prose": "prose expert"}
    rows = {names[k]: v for k, v in models.items()} | {f"merge: {k}": v for k, v in merged.items()}
    results = evaluate(rows, corpora, cfg)
    print(format_table(results))
    print(f"\ntotal wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
