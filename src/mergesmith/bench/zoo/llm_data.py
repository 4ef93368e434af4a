"""The LLM zoo's six skills: prompts with one exact answer each, from generators and Debian packages (offline).

Every example is ``{"prompt": ..., "answer": ...}``. The prompt ends with ``Answer:``; the model is trained on ``" " + answer + "\\n"`` after it and scored by exact match of its
greedy continuation (see :func:`normalize_continuation`) and by the loss of the answer tokens.

| skill | source | answer |
|---|---|---|
| ``arithmetic`` | generated word problems of 2–3 steps (the GSM8K analogue) | the worked steps, one line |
| ``json`` | generated ``key: value`` lines | the same record as one line of JSON |
| ``python_output`` | generated Python snippets (the CRUXEval-O analogue) | what the snippet prints |
| ``topic`` | Debian fortunes of four categories (text8's ``fortune_topic``) | one word |
| ``reverse_dictionary`` | WordNet 3.0 noun definitions (``wordnet-base``) | the word defined |
| ``german_numbers`` | generated numbers 1–9999 | the number in German words |

Everything is seeded; the same arguments give the same examples.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergesmith.bench.zoo.cache import fetch_debs
from mergesmith.bench.zoo.text8_data import WORDNET_DIR, fortune_topic, read_text_file, wordnet_definition
from mergesmith.errors import MergeError


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
    """Word problems of two or three steps (buy more, give some away, get packs of k) with their worked solution
    as the answer: one equation per step, ``a+b=c, c-d=e, p*q=r, e+r=s`` — the last result is the count asked
    for. Exact match compares the whole line, so it needs every step right (GSM8K-style chain of thought, in a
    fixed form the experts learn; 100 steps of final-answer-only training taught the 135M base nothing)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, other = rng.sample(_NAMES, 2)
        item = rng.choice(_ITEMS)
        count = rng.randint(5, 60)
        story = [f"{name} has {count} {item}."]
        work = []
        for _ in range(rng.randint(2, 3)):
            kind = rng.choice(("buy", "give", "packs"))
            if kind == "buy":
                k = rng.randint(2, 40)
                story.append(f"{name} buys {k} more.")
                work.append(f"{count}+{k}={count + k}")
                count += k
            elif kind == "give" and count > 2:
                k = rng.randint(1, count - 1)
                story.append(f"{name} gives {k} to {other}.")
                work.append(f"{count}-{k}={count - k}")
                count -= k
            else:
                packs, size = rng.randint(2, 5), rng.randint(2, 10)
                story.append(f"{name} gets {packs} packs of {size} {item}.")
                work += [f"{packs}*{size}={packs * size}", f"{count}+{packs * size}={count + packs * size}"]
                count += packs * size
        prompt = " ".join(story) + f" How many {item} does {name} have now?\nAnswer:"
        out.append(Example(prompt, ", ".join(work)))
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


_WORDS = (
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "melon",
    "peach",
    "pear",
    "plum",
    "kiwi",
    "lime",
)


def _python_snippet(rng: random.Random) -> str:
    """One short program of a randomly chosen kind (strings, lists, dicts, loops, integer arithmetic)."""
    word = rng.choice(_WORDS)
    numbers = rng.sample(range(1, 60), rng.randint(3, 5))
    a, b, k = rng.randint(10, 99), rng.randint(2, 9), rng.randint(2, 6)
    i = rng.randint(0, len(word) - 2)
    kinds = (
        lambda: f's = "{word}"\nprint(s.upper())',
        lambda: f'print("{word}"[::-1])',
        lambda: f"xs = {numbers}\nprint(sorted(xs))",
        lambda: f'print(len("{word}") * {k})',
        lambda: f"xs = {numbers}\nprint(sum(xs))",
        lambda: f'print("{"-".join(rng.sample(_WORDS, 3))}".split("-"))',
        lambda: f'd = {{"{word}": {a}}}\nd["{rng.choice(_WORDS)}"] = {b}\nprint(d)',
        lambda: f"xs = {numbers}\nprint(max(xs) - min(xs))",
        lambda: f'print("{word}".replace("{word[i]}", "{rng.choice("xyz")}"))',
        lambda: f"print([x * {k} for x in range({b})])",
        lambda: f'print("{word}"[{i}:{i + k}])',
        lambda: f"x = {a}\nfor i in range({b}):\n    x += {k}\nprint(x)",
        lambda: f"xs = {numbers}\nxs.append({a})\nprint(xs[::-1])",
        lambda: f"print({a} // {b}, {a} % {b})",
        lambda: f'print("{word}".count("{word[i]}") + {k})',
        lambda: f"xs = {numbers}\nprint([x for x in xs if x % 2 == 0])",
    )
    return rng.choice(kinds)()


def run_snippet(code: str) -> str:
    """What ``code`` prints (its last newline removed), run in a fresh namespace."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, {"__builtins__": __builtins__})  # our own generated snippets, never user input
    return buffer.getvalue().removesuffix("\n")


def python_output(n: int, seed: int) -> list[Example]:
    """Short generated Python programs → the line they print, found by running them (the CRUXEval-O analogue:
    reading code, not recalling it; next-line completion of the standard library taught the 135M base 2.5 %)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        code = _python_snippet(rng)
        out.append(Example(f"What does this Python code print?\n{code}\nAnswer:", run_snippet(code)))
    return out


_ONES = ("", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
_TEENS = (
    "zehn",
    "elf",
    "zwölf",
    "dreizehn",
    "vierzehn",
    "fünfzehn",
    "sechzehn",
    "siebzehn",
    "achtzehn",
    "neunzehn",
)
_TENS = ("", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig")


def german_number(n: int) -> str:
    """``n`` (1–999,999) in German words, one word as German writes them: 21 → einundzwanzig, 101 →
    einhunderteins, 1000 → eintausend (the prefixed form, never bare hundert/tausend)."""
    if not 1 <= n <= 999_999:
        raise ValueError(f"{n} is outside 1–999,999")
    thousands, rest = divmod(n, 1000)
    head = f"{_below_thousand(thousands, last=False)}tausend" if thousands else ""
    return head + (_below_thousand(rest, last=True) if rest else "")


def _below_thousand(n: int, last: bool) -> str:
    hundreds, rest = divmod(n, 100)
    head = f"{'ein' if hundreds == 1 else _ONES[hundreds]}hundert" if hundreds else ""
    if rest == 0:
        return head
    if rest == 1:
        return head + ("eins" if last else "ein")  # einundzwanzig, eintausend, but hunderteins
    if rest < 10:
        return head + _ONES[rest]
    if rest < 20:
        return head + _TEENS[rest - 10]
    tens, ones = divmod(rest, 10)
    unit = "ein" if ones == 1 else _ONES[ones]
    return head + (f"{unit}und{_TENS[tens]}" if ones else _TENS[tens])


def german_numbers(n: int, seed: int) -> list[Example]:
    """Numbers of 1–4 digits (the digit count uniform) → the number in German words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = rng.randint(1, 4)
        number = rng.randint(10 ** (digits - 1), 10**digits - 1)
        out.append(Example(f"Write the number in German words: {number}\nAnswer:", german_number(number)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Skills from Debian packages

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
        Skill("arithmetic", (), lambda r, seed: arithmetic(6000, seed), 64),
        Skill("json", (), lambda r, seed: json_format(6000, seed), 48),
        Skill("python_output", (), lambda r, seed: python_output(6000, seed), 40),
        Skill(
            "topic",
            ("fortunes", "fortunes-min"),
            lambda r, seed: topic([r["fortunes"], r["fortunes-min"]]),
            4,
        ),
        Skill(
            "reverse_dictionary", ("wordnet-base",), lambda r, seed: reverse_dictionary(r["wordnet-base"]), 6
        ),
        Skill("german_numbers", (), lambda r, seed: german_numbers(6000, seed), 24),
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
