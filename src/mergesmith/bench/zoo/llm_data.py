"""The LLM zoo's six skills: prompts with one exact answer each, from generators and Debian packages (offline).

Every example is ``{"prompt": ..., "answer": ...}``. The prompt ends with ``Answer:`` (or, for ``german``, with
the text to continue); the model is trained on ``" " + answer + "\\n"`` after it and scored by exact match of its
greedy continuation (see :func:`normalize_continuation`) and by the loss of the answer tokens.

| skill | source | answer |
|---|---|---|
| ``arithmetic`` | generated word problems of 2–3 steps (the GSM8K analogue) | an integer |
| ``json`` | generated ``key: value`` lines | the same record as one line of JSON |
| ``python`` | the Python 3.11 standard library Debian ships (``libpython3.11-stdlib``) | the next line of code |
| ``topic`` | Debian fortunes of four categories (text8's ``fortune_topic``) | one word |
| ``reverse_dictionary`` | WordNet 3.0 noun definitions (``wordnet-base``) | the word defined |
| ``german`` | German Debian fortunes (``fortunes-de``) | the text's last word |

Everything is seeded; the same arguments give the same examples.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergesmith.bench.zoo.cache import fetch_debs
from mergesmith.bench.zoo.text8_data import (
    FORTUNE_DIR,
    WORDNET_DIR,
    fortune_files,
    fortune_topic,
    read_fortunes,
    read_text_file,
    wordnet_definition,
)
from mergesmith.errors import MergeError

PYTHON_PACKAGE = "libpython3.11-stdlib"
PYTHON_DIR = Path("usr/lib/python3.11")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    def as_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


def normalize_continuation(text: str) -> str:
    """What exact match compares: the continuation up to its first newline after any leading whitespace,
    stripped (case and punctuation count). Answers are stored normalized, so an answer equals itself."""
    return text.lstrip().split("\n", 1)[0].strip()


# ---------------------------------------------------------------------------------------------------------
# Generated skills

_NAMES = ("Tom", "Ann", "Maya", "Omar", "Lena", "Ravi", "Sara", "Ivan", "Chen", "Lucia", "Ben", "Nora")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells", "eggs", "cookies")


def arithmetic(n: int, seed: int) -> list[Example]:
    """Word problems of two or three steps (add, give away, buy packs of k) with non-negative integer answers."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, other = rng.sample(_NAMES, 2)
        item = rng.choice(_ITEMS)
        count = rng.randint(5, 60)
        steps = [f"{name} has {count} {item}."]
        for _ in range(rng.randint(2, 3)):
            kind = rng.choice(("buy", "give", "packs"))
            if kind == "buy":
                k = rng.randint(2, 40)
                count += k
                steps.append(f"{name} buys {k} more.")
            elif kind == "give" and count > 2:
                k = rng.randint(1, count - 1)
                count -= k
                steps.append(f"{name} gives {k} to {other}.")
            else:
                packs, size = rng.randint(2, 5), rng.randint(2, 10)
                count += packs * size
                steps.append(f"{name} gets {packs} packs of {size} {item}.")
        prompt = " ".join(steps) + f" How many {item} does {name} have now?\nAnswer:"
        out.append(Example(prompt, str(count)))
    return out


_KEYS = {
    "name": lambda r: r.choice(_NAMES),
    "age": lambda r: r.randint(18, 90),
    "city": lambda r: r.choice(("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Kyoto", "Perth")),
    "score": lambda r: r.randint(0, 100),
    "active": lambda r: r.choice((True, False)),
    "color": lambda r: r.choice(("red", "green", "blue", "black", "white")),
    "id": lambda r: r.randint(1000, 9999),
}


def json_format(n: int, seed: int) -> list[Example]:
    """``key: value`` lines (2–4 keys; strings, integers, booleans) → one line of JSON with the keys in order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        keys = rng.sample(sorted(_KEYS), rng.randint(2, 4))
        record = {k: _KEYS[k](rng) for k in keys}
        lines = "\n".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in record.items())
        out.append(Example(f"Convert to JSON:\n{lines}\nAnswer:", json.dumps(record)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Skills from Debian packages

PYTHON_CONTEXT_LINES = 8
PYTHON_ANSWER_CHARS = (8, 48)
PYTHON_SAME_ANSWER = 2  # at most this many examples share one answer (no flood of `return None`)


def python_next_line(root: Path) -> list[Example]:
    """(the previous lines of a standard-library module, its next line) for short code lines that are not
    comments, docstrings or blank; the context keeps its indentation, the answer is the stripped line."""
    folder = root / PYTHON_DIR
    if not folder.is_dir():
        raise MergeError(f"no Python standard library at {folder} (package {PYTHON_PACKAGE})")
    seen: Counter[str] = Counter()
    out = []
    for path in sorted(folder.glob("*.py")):
        if path.is_symlink():  # links into other packages (sysconfig data) point nowhere here
            continue
        lines = read_text_file(path).splitlines()
        in_string = False
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.count('"""') % 2 == 1 or stripped.count("'''") % 2 == 1:
                in_string = not in_string
                continue
            if in_string or i < PYTHON_CONTEXT_LINES or not stripped or stripped.startswith(("#", "@")):
                continue
            low, high = PYTHON_ANSWER_CHARS
            if not low <= len(stripped) <= high or seen[stripped] >= PYTHON_SAME_ANSWER:
                continue
            context = [x for x in lines[max(0, i - 3 * PYTHON_CONTEXT_LINES) : i] if x.strip()]
            context = context[-PYTHON_CONTEXT_LINES:]
            if len(context) < PYTHON_CONTEXT_LINES or any('"""' in x or "'''" in x for x in context):
                continue
            seen[stripped] += 1
            code = "\n".join(context)
            out.append(Example(f"Complete the next line of Python:\n{code}\nAnswer:", stripped))
    return out


TOPIC_WORDS = {
    "computers": "computers",
    "politics": "politics",
    "science": "science",
    "men-women": "relationships",
}


def topic(roots: Sequence[Path]) -> list[Example]:
    """text8's ``fortune_topic`` as an instruction with a one-word answer."""
    task = fortune_topic(list(roots))
    choices = ", ".join(TOPIC_WORDS[c] for c in task.label_names)
    return [
        Example(
            f"What is this text about? Answer with one word ({choices}).\n{text}\nAnswer:",
            TOPIC_WORDS[task.label_names[label]],
        )
        for text, label in zip(task.texts, task.labels)
    ]


_WORD = re.compile(r"^[a-z]{3,12}$")


def reverse_dictionary(root: Path) -> list[Example]:
    """WordNet noun synsets with exactly one lemma, a plain lower-case word that occurs in the tagged corpus
    (``cntlist.rev``: a common sense): definition → that word."""
    folder = root / WORDNET_DIR
    data = folder / "data.noun"
    if not data.is_file():
        raise MergeError(f"no WordNet data file at {data}")
    tagged = {
        line.split()[0].split("%")[0] for line in read_text_file(folder / "cntlist.rev").splitlines() if line
    }
    out = []
    for line in read_text_file(data).splitlines():
        if not line.strip() or line.startswith("  "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        if int(fields[3], 16) != 1:
            continue
        word = fields[4]
        definition = wordnet_definition(gloss)
        if _WORD.match(word) and word in tagged and 10 <= len(definition) <= 160:
            out.append(Example(f"Which word has this meaning: {definition}?\nAnswer:", word))
    return out


_ATTRIBUTION = re.compile(r"(?:^|\s)--\s")
_GERMAN_WORD = re.compile(r"^(.*\S)\s+([A-Za-zÄÖÜäöüß]{3,20})[.!?]?$", re.DOTALL)


def german_last_word(root: Path) -> list[Example]:
    """German fortunes (attribution lines removed) whose last word is a plain word: the text without it → it."""
    out = []
    for path in fortune_files(root / FORTUNE_DIR / "de", skip=("asciiart", "translations")):
        for entry in read_fortunes(path):
            body = _ATTRIBUTION.split(entry, maxsplit=1)[
                0
            ].strip()  # "... -- Author": the author is no answer
            match = _GERMAN_WORD.match(body)
            if match and 40 <= len(body) <= 300:
                out.append(Example(match.group(1), match.group(2)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Registry and splits


@dataclass(frozen=True)
class Skill:
    name: str
    packages: tuple[str, ...]
    make: Callable[[Mapping[str, Path], int], list[Example]]  # (unpacked package roots, seed) → examples
    max_new_tokens: int  # enough for every answer of the skill (checked when the splits are made)


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("arithmetic", (), lambda r, seed: arithmetic(6000, seed), 6),
        Skill("json", (), lambda r, seed: json_format(6000, seed), 48),
        Skill("python", (PYTHON_PACKAGE,), lambda r, seed: python_next_line(r[PYTHON_PACKAGE]), 24),
        Skill(
            "topic",
            ("fortunes", "fortunes-min"),
            lambda r, seed: topic([r["fortunes"], r["fortunes-min"]]),
            4,
        ),
        Skill(
            "reverse_dictionary", ("wordnet-base",), lambda r, seed: reverse_dictionary(r["wordnet-base"]), 6
        ),
        Skill("german", ("fortunes-de",), lambda r, seed: german_last_word(r["fortunes-de"]), 8),
    )
}
SKILL_NAMES: tuple[str, ...] = tuple(SKILLS)


def load_skill(name: str, seed: int, cache: Path | str | None = None) -> list[Example]:
    """Every example of skill ``name`` (its packages fetched once into the cache)."""
    if name not in SKILLS:
        raise MergeError(f"unknown LLM skill {name!r} (known: {', '.join(SKILL_NAMES)})")
    skill = SKILLS[name]
    return skill.make(fetch_debs(skill.packages, cache) if skill.packages else {}, seed)


def make_splits(
    examples: Sequence[Example], seed: int, n_train: int, n_val: int, n_test: int
) -> dict[str, list[Example]]:
    """Seeded, disjoint splits: deduplicated by prompt (the first answer kept), sorted, shuffled with ``seed``;
    test first, then validation, then train (a short skill shortens train, never test)."""
    unique = sorted({e.prompt: e for e in reversed(list(examples))}.values(), key=lambda e: e.prompt)
    random.Random(seed).shuffle(unique)
    test = unique[:n_test]
    val = unique[n_test : n_test + n_val]
    train = unique[n_test + n_val : n_test + n_val + n_train]
    return {"train": train, "validation": val, "test": test}


def write_split(path: Path, examples: Sequence[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.as_json(), ensure_ascii=False) + "\n" for e in examples), "utf-8")


def read_split(path: Path) -> list[Example]:
    """A split file; a line without ``prompt`` or ``answer`` is a one-line error naming the file and line."""
    out = []
    for number, line in enumerate(Path(path).read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MergeError(f"{path}:{number}: not a JSON line") from None
        missing = [k for k in ("prompt", "answer") if not isinstance(row.get(k), str)]
        if missing:
            raise MergeError(f"{path}:{number}: no '{missing[0]}' field (each line needs prompt and answer)")
        out.append(Example(row["prompt"], row["answer"]))
    return out
