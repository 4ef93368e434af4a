"""Data for the "text8" benchmark zoo: eight real, labeled English/multilingual text-classification tasks.

Everything comes from Debian packages (fetched with :func:`mergesmith.bench.zoo.cache.fetch_deb`, nothing is
downloaded from a data hub); R data sets are read without R (:func:`mergesmith.bench.zoo.cache.read_r_lazyload`).

=================  =======  ===========================================================================
task               classes  data
=================  =======  ===========================================================================
``sentiment``      2        Amazon fine-food reviews, score ``great`` vs ``other``
                            (``r-cran-modeldata``: ``training_data`` + ``testing_data``, 5,000 reviews).
``fortune_topic``  4        English fortunes by category file: computers, politics, science, men-women
                            (``fortunes``). Noisy labels: a fortune's file is a loose topic.
``language``       8        Language of a fortune: en, de, es, ru, it, pl, cs, pt-br (``fortunes``,
                            ``fortunes-min``, ``fortunes-de`` ... ``fortunes-br``).
``noun_category``  8        WordNet noun definition -> lexicographer file, the 8 largest noun files
                            (``wordnet-base``, ``data.noun``).
``verb_category``  8        WordNet verb definition -> lexicographer file, the 8 largest verb files
                            (``wordnet-base``, ``data.verb``).
``austen``         6        Which Jane Austen novel a chunk of 4 consecutive lines comes from
                            (``r-cran-janeaustenr``).
``tweet_device``   2        Donald Trump's tweets, posted from Android vs iPhone, retweets dropped
                            (``r-cran-dslabs``: ``trump_tweets``).
``gloss_pos``      4        Part of speech (noun/verb/adj/adv) of the word a WordNet definition defines
                            (``wordnet-base``).
=================  =======  ===========================================================================

Choices:

* Texts are whitespace-normalized (runs of spaces/newlines become one space). Every task is deduplicated:
  a text that occurs several times is kept once; a text that occurs with different labels is dropped.
  Examples are sorted by text, so a task is the same on every run.
* WordNet tasks use the *definition only*: the synset's words are not included, and the quoted example
  sentences after the definition are removed, because they almost always contain the word being defined.
  The categories are the 8 lexicographer files with the most synsets (noun: act, animal, artifact,
  communication, location, person, plant, state; verb: change, cognition, communication, contact, motion,
  possession, social, stative in WordNet 3.0).
* ``gloss_pos`` is the eighth task because it needs a different skill from the other seven: they are
  about *what* a text is about (topic, sentiment, author, language, device), while the part of speech of a
  defined word shows in the *form* of its definition ("to move fast" / "a person who ..." / "having ..." /
  "in a ... manner") - syntax, not topic. Adjective satellites (``s``) count as adjectives.
* Fortunes: entries shorter than 20 or longer than 500 characters are dropped (one-word entries, ASCII
  art, whole song texts). ``language`` skips the few files that are not prose in their language (ASCII art,
  banners, bilingual translation lists, the Slovak file of ``fortunes-cs``) and the offensive ``es/off``
  folder; it reads files only, never symlinks, ``.dat`` indexes or empty ``.u8`` copies.
* ``austen``: blank lines, title lines before the first chapter and chapter/volume headings are dropped; the
  remaining lines of each novel are cut into consecutive, non-overlapping chunks of 4 lines. Character names
  give the novel away sometimes; that is part of the task.
* ``tweet_device``: tweets flagged ``is_retweet`` or starting with ``RT @`` are dropped; HTML entities
  (``&amp;``) are unescaped. Links are kept (the iPhone account posted more links and pictures: a real cue).

:func:`make_splits` makes seeded, stratified, class-balanced, disjoint train/validation/test splits.
Run ``python -m mergesmith.bench.zoo.text8_data`` to fetch every package and print a summary of each task.
"""

from __future__ import annotations

import html
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesmith.bench.zoo.cache import fetch_debs, read_r_lazyload
from mergesmith.errors import MergeError

R_LIBRARY = Path("usr/lib/R/site-library")
FORTUNE_DIR = Path("usr/share/games/fortunes")
WORDNET_DIR = Path("usr/share/wordnet")

FORTUNE_MIN_CHARS = 20
FORTUNE_MAX_CHARS = 500
FORTUNE_TOPICS: tuple[str, ...] = ("computers", "politics", "science", "men-women")

# (label, Debian package, folder inside the unpacked package). English comes from two packages.
LANGUAGE_SOURCES: tuple[tuple[str, str, Path], ...] = (
    ("en", "fortunes", FORTUNE_DIR),
    ("en", "fortunes-min", FORTUNE_DIR),
    ("de", "fortunes-de", FORTUNE_DIR / "de"),
    ("es", "fortunes-es", FORTUNE_DIR / "es"),
    ("ru", "fortunes-ru", FORTUNE_DIR / "ru"),
    ("it", "fortunes-it", FORTUNE_DIR / "it"),
    ("pl", "fortunes-pl", FORTUNE_DIR / "pl"),
    ("cs", "fortunes-cs", FORTUNE_DIR / "cs"),
    ("pt-br", "fortunes-br", FORTUNE_DIR),
)
LANGUAGES: tuple[str, ...] = tuple(dict.fromkeys(label for label, _, _ in LANGUAGE_SOURCES))
# Files that are not prose in their package's language.
LANGUAGE_SKIP_FILES = frozenset(
    {"ascii-art", "asciiart", "banner", "translations", "translate-me", "klasik-sk"}
)

# The standard WordNet lexicographer files, in lex_filenum order (WordNet's lexnames file).
WORDNET_LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
WORDNET_POS: dict[str, str] = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}  # label -> file
WORDNET_MIN_CHARS = 10

AUSTEN_NOVELS: dict[str, str] = {  # R object name -> label
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_CHUNK_LINES = 4
_AUSTEN_HEADING = re.compile(r"^\s*(chapter|volume)\b", re.IGNORECASE)

TWEET_DEVICES: dict[str, str] = {"Twitter for Android": "android", "Twitter for iPhone": "iphone"}

# One short description per class, in label order: what the CLIP-style ``descriptions`` protocol embeds as its
# zero-shot heads (the analogue of CLIP's "a photo of a {class}" prompts).
CLASS_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "sentiment": ("a lukewarm or negative review of a food product", "an enthusiastic, glowing review of a food product"),
    "fortune_topic": ("a joke about computers and programming", "a quip about politics and politicians",
                      "a saying about science and scientists", "a joke about men and women"),
    "language": ("a text in English", "ein Text auf Deutsch", "un texto en español", "текст на русском языке",
                 "un testo in italiano", "tekst po polsku", "text v češtině", "um texto em português"),
    "noun_category": ("an act, action or activity", "an animal", "a man-made object, an artifact",
                      "communication: language, writing or a message", "a place or location", "a person, a human",
                      "a plant", "a state or condition"),
    "verb_category": ("to change something", "to think, know or judge", "to speak, write or communicate",
                      "to touch, hit or attach", "to move or travel", "to own, buy, sell or transfer",
                      "to act socially, in groups or institutions", "to be, exist or have a property"),
    "austen": ("a passage from Sense and Sensibility by Jane Austen", "a passage from Pride and Prejudice by Jane Austen",
               "a passage from Mansfield Park by Jane Austen", "a passage from Emma by Jane Austen",
               "a passage from Northanger Abbey by Jane Austen", "a passage from Persuasion by Jane Austen"),
    "tweet_device": ("a tweet by Donald Trump himself, angry and in his own voice",
                     "a tweet by Donald Trump's staff, announcing events with a link"),
    "gloss_pos": ("the definition of a noun: a thing", "the definition of a verb: to do something",
                  "the definition of an adjective: having a quality", "the definition of an adverb: in a manner"),
}  # fmt: skip

_SPACE = re.compile(r"\s+")
_EXAMPLE = re.compile(r';?\s*"[^"]*"')


@dataclass(frozen=True)
class TaskData:
    """A labeled text-classification data set: ``texts[i]`` has class ``label_names[labels[i]]``."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"task {self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        bad = [label for label in self.labels if not 0 <= label < len(self.label_names)]
        if bad:
            raise ValueError(f"task {self.name}: label {bad[0]} outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> dict[str, int]:
        """Examples per class, in label order."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return _SPACE.sub(" ", text).strip()


def build_task(
    name: str, examples: Iterable[tuple[str, str]], label_names: Sequence[str], source: str
) -> TaskData:
    """Make a :class:`TaskData` from ``(text, label name)`` pairs: normalize, dedupe, sort by text.

    A text seen with more than one label is dropped; empty texts are dropped.
    """
    index = {label: i for i, label in enumerate(label_names)}
    seen: dict[str, set[int]] = defaultdict(set)
    for text, label in examples:
        text = normalize_text(text)
        if text:
            seen[text].add(index[label])
    kept = sorted((text, next(iter(labels))) for text, labels in seen.items() if len(labels) == 1)
    return TaskData(
        name=name,
        texts=[text for text, _ in kept],
        labels=[label for _, label in kept],
        label_names=list(label_names),
        source=source,
    )


def dedupe(task: TaskData) -> TaskData:
    """``task`` with normalized, unique texts (conflicting duplicates dropped), sorted by text."""
    pairs = ((text, task.label_names[label]) for text, label in zip(task.texts, task.labels))
    return build_task(task.name, pairs, task.label_names, task.source)


# ---------------------------------------------------------------------------------------------------------
# Fortunes


def read_text_file(path: Path) -> str:
    """Read a text file as UTF-8, falling back to Latin-1 for old 8-bit files."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_fortunes(path: Path) -> list[str]:
    """The entries of a fortune file (entries are separated by a line holding only ``%``), normalized."""
    entries: list[str] = []
    current: list[str] = []
    for line in read_text_file(path).splitlines():
        if line.strip() == "%":
            entries.append(normalize_text("\n".join(current)))
            current = []
        else:
            current.append(line)
    entries.append(normalize_text("\n".join(current)))
    return [entry for entry in entries if entry]


def keep_fortune(text: str) -> bool:
    return FORTUNE_MIN_CHARS <= len(text) <= FORTUNE_MAX_CHARS


def fortune_files(folder: Path, skip: Iterable[str] = ()) -> list[Path]:
    """The fortune text files directly in ``folder`` (sorted by name).

    Skips symlinks, ``.dat`` indexes, empty files, names in ``skip``, and ``NAME.u8`` when ``NAME`` exists
    (the ``.u8`` file is then a copy or a link).
    """
    skip = set(skip)
    if not folder.is_dir():
        raise MergeError(f"no fortunes folder at {folder}")
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix == ".dat" or path.stat().st_size == 0:
            continue
        if path.suffix == ".u8" and (path.with_suffix("")).exists():
            continue
        stem = path.name.removesuffix(".u8")
        if stem in skip:
            continue
        files.append(path)
    return files


def _find_category(roots: Sequence[Path], category: str) -> Path:
    for root in roots:
        path = root / FORTUNE_DIR / category
        if path.is_file():
            return path
    raise MergeError(
        f"fortune category {category!r} not found under {FORTUNE_DIR} in {', '.join(map(str, roots))}"
    )


def fortune_topic(roots: Path | Sequence[Path], categories: Sequence[str] = FORTUNE_TOPICS) -> TaskData:
    """English fortunes labeled by their category file (``roots``: unpacked ``fortunes``/``fortunes-min``)."""
    roots = [roots] if isinstance(roots, Path) else list(roots)
    examples = [
        (entry, category)
        for category in categories
        for entry in read_fortunes(_find_category(roots, category))
        if keep_fortune(entry)
    ]
    return build_task("fortune_topic", examples, categories, "Debian fortunes: " + ", ".join(categories))


def language(roots: Mapping[str, Path]) -> TaskData:
    """Fortunes labeled by language; ``roots`` maps each package of :data:`LANGUAGE_SOURCES` to its root."""
    examples = []
    for label, package, folder in LANGUAGE_SOURCES:
        if package not in roots:
            raise MergeError(f"language task: no unpacked root given for package {package!r}")
        for path in fortune_files(roots[package] / folder, skip=LANGUAGE_SKIP_FILES):
            examples.extend((entry, label) for entry in read_fortunes(path) if keep_fortune(entry))
    packages = ", ".join(dict.fromkeys(package for _, package, _ in LANGUAGE_SOURCES))
    return build_task("language", examples, LANGUAGES, f"Debian {packages}")


# ---------------------------------------------------------------------------------------------------------
# WordNet


def wordnet_definition(gloss: str) -> str:
    """The definition part of a WordNet gloss: quoted example sentences removed."""
    return normalize_text(_EXAMPLE.sub("", gloss)).strip(" ;")


def read_wordnet_data(path: Path) -> list[tuple[str, str, str]]:
    """Parse a WordNet ``data.*`` file into ``(lexname, ss_type, definition)`` per synset.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; license lines start with
    two spaces.
    """
    if not path.is_file():
        raise MergeError(f"no WordNet data file at {path}")
    rows = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip() or line.startswith("  "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 3 or not fields[1].isdigit():
            raise MergeError(f"{path}:{number}: not a WordNet data line")
        lex_filenum = int(fields[1])
        if not 0 <= lex_filenum < len(WORDNET_LEXNAMES):
            raise MergeError(f"{path}:{number}: unknown lex_filenum {lex_filenum}")
        definition = wordnet_definition(gloss)
        if len(definition) >= WORDNET_MIN_CHARS:
            rows.append((WORDNET_LEXNAMES[lex_filenum], fields[2], definition))
    return rows


def _lexname_task(name: str, root: Path, pos: str, n_classes: int) -> TaskData:
    rows = read_wordnet_data(root / WORDNET_DIR / f"data.{pos}")
    counts = Counter(lexname for lexname, _, _ in rows)
    largest = sorted(counts, key=lambda lexname: (-counts[lexname], lexname))[:n_classes]
    label_names = sorted(largest)
    examples = [(definition, lexname) for lexname, _, definition in rows if lexname in label_names]
    return build_task(name, examples, label_names, f"WordNet 3.0 data.{pos} (Debian wordnet-base)")


def noun_category(root: Path, n_classes: int = 8) -> TaskData:
    """WordNet noun definition -> lexicographer file (the ``n_classes`` largest); ``root``: wordnet-base."""
    return _lexname_task("noun_category", root, "noun", n_classes)


def verb_category(root: Path, n_classes: int = 8) -> TaskData:
    """WordNet verb definition -> lexicographer file (the ``n_classes`` largest); ``root``: wordnet-base."""
    return _lexname_task("verb_category", root, "verb", n_classes)


def gloss_pos(root: Path) -> TaskData:
    """WordNet definition -> part of speech of the defined word (noun/verb/adj/adv); ``root``: wordnet-base."""
    examples = [
        (definition, label)
        for label, pos in WORDNET_POS.items()
        for _, _, definition in read_wordnet_data(root / WORDNET_DIR / f"data.{pos}")
    ]
    return build_task("gloss_pos", examples, list(WORDNET_POS), "WordNet 3.0 data.* (Debian wordnet-base)")


# ---------------------------------------------------------------------------------------------------------
# R data sets


def _r_data(root: Path, package: str, names: Sequence[str]) -> dict[str, Any]:
    return read_r_lazyload(root / R_LIBRARY / package / "data", names)


def sentiment(root: Path) -> TaskData:
    """Fine-food reviews, ``great`` vs ``other``; ``root``: unpacked ``r-cran-modeldata``."""
    objects = _r_data(root, "modeldata", ["training_data", "testing_data"])
    examples = []
    for frame in objects.values():
        for review, score in zip(frame["review"], frame["score"]):
            if isinstance(review, str) and str(score) in ("great", "other"):
                examples.append((re.sub(r"<br\s*/?>", " ", html.unescape(review)), str(score)))
    return build_task(
        "sentiment", examples, ["other", "great"], "R modeldata small_fine_foods (r-cran-modeldata)"
    )


def austen_chunks(lines: Sequence[str], chunk_lines: int = AUSTEN_CHUNK_LINES) -> list[str]:
    """Cut a novel's lines into chunks of ``chunk_lines`` non-blank lines, skipping front matter and headings.

    Lines before the first chapter heading are front matter (title, author, preface) and are dropped.
    """
    body: list[str] = []
    started = False
    for line in lines:
        line = str(line).strip()
        if _AUSTEN_HEADING.match(line):
            started = True
            continue
        if started and line:
            body.append(line)
    return [" ".join(body[i : i + chunk_lines]) for i in range(0, len(body) - chunk_lines + 1, chunk_lines)]


def austen(root: Path) -> TaskData:
    """Which of Jane Austen's six novels a 4-line chunk comes from; ``root``: unpacked ``r-cran-janeaustenr``."""
    objects = _r_data(root, "janeaustenr", list(AUSTEN_NOVELS))
    examples = [
        (chunk, AUSTEN_NOVELS[name]) for name, lines in objects.items() for chunk in austen_chunks(lines)
    ]
    return build_task("austen", examples, list(AUSTEN_NOVELS.values()), "R janeaustenr (r-cran-janeaustenr)")


def _is_true(value: Any) -> bool:
    """R logical as rdata gives it (numpy bool, pandas NA, ...) -> True only for TRUE."""
    try:
        return bool(value)
    except (TypeError, ValueError):  # NA
        return False


def tweet_device(root: Path) -> TaskData:
    """Trump tweets from Android vs iPhone, retweets dropped; ``root``: unpacked ``r-cran-dslabs``."""
    frame = _r_data(root, "dslabs", ["trump_tweets"])["trump_tweets"]
    examples = []
    for text, source, retweet in zip(frame["text"], frame["source"], frame["is_retweet"]):
        if not isinstance(text, str) or source not in TWEET_DEVICES or _is_true(retweet):
            continue
        text = html.unescape(text)
        if not text.startswith("RT @"):
            examples.append((text, TWEET_DEVICES[source]))
    return build_task(
        "tweet_device", examples, list(TWEET_DEVICES.values()), "R dslabs trump_tweets (r-cran-dslabs)"
    )


# ---------------------------------------------------------------------------------------------------------
# Registry, loading and splits


@dataclass(frozen=True)
class _TaskSpec:
    packages: tuple[str, ...]
    build: Callable[[Mapping[str, Path]], TaskData]


_LANGUAGE_PACKAGES = tuple(dict.fromkeys(package for _, package, _ in LANGUAGE_SOURCES))

_TASK_SPECS: dict[str, _TaskSpec] = {
    "sentiment": _TaskSpec(("r-cran-modeldata",), lambda r: sentiment(r["r-cran-modeldata"])),
    "fortune_topic": _TaskSpec(
        ("fortunes", "fortunes-min"), lambda r: fortune_topic([r["fortunes"], r["fortunes-min"]])
    ),
    "language": _TaskSpec(_LANGUAGE_PACKAGES, language),
    "noun_category": _TaskSpec(("wordnet-base",), lambda r: noun_category(r["wordnet-base"])),
    "verb_category": _TaskSpec(("wordnet-base",), lambda r: verb_category(r["wordnet-base"])),
    "austen": _TaskSpec(("r-cran-janeaustenr",), lambda r: austen(r["r-cran-janeaustenr"])),
    "tweet_device": _TaskSpec(("r-cran-dslabs",), lambda r: tweet_device(r["r-cran-dslabs"])),
    "gloss_pos": _TaskSpec(("wordnet-base",), lambda r: gloss_pos(r["wordnet-base"])),
}

TASKS: tuple[str, ...] = tuple(_TASK_SPECS)


def task_packages(name: str) -> tuple[str, ...]:
    """The Debian packages task ``name`` reads."""
    if name not in _TASK_SPECS:
        raise MergeError(f"unknown text8 task {name!r} (known: {', '.join(TASKS)})")
    return _TASK_SPECS[name].packages


def load_task(name: str, cache: Path | str | None = None) -> TaskData:
    """Fetch (once) the packages of task ``name`` into ``cache`` (default: ``cache_dir()``) and load it."""
    packages = task_packages(name)
    return _TASK_SPECS[name].build(fetch_debs(packages, cache))


def _quotas(total: int, num_classes: int) -> list[int]:
    base, extra = divmod(total, num_classes)
    return [base + (1 if label < extra else 0) for label in range(num_classes)]


def make_splits(task: TaskData, seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, TaskData]:
    """Seeded, stratified, class-balanced, disjoint ``train``/``validation``/``test`` splits of ``task``.

    The task is deduplicated first (so no text is in two splits) and sorted, so the result depends only on
    the data and the arguments. Each split asks every class for an equal share of its size (the remainder
    going to the first classes). Each class is shuffled with ``random.Random(seed)`` and serves test first,
    then validation, then train: a class too small for every quota shortens train (then validation) and
    the test split stays full, and the test split does not change with ``n_train``/``n_val``. Classes are
    not topped up from others, so a split is smaller than asked when a class runs out. Within a split the
    examples are shuffled.
    """
    if min(n_train, n_val, n_test) < 0:
        raise ValueError("split sizes must be >= 0")
    task = dedupe(task)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(task.labels):
        by_class[label].append(i)
    order = (("test", n_test), ("validation", n_val), ("train", n_train))
    quotas = {split: _quotas(size, task.num_classes) for split, size in order}
    chosen: dict[str, list[int]] = {split: [] for split, _ in order}
    for label in range(task.num_classes):
        pool = by_class.get(label, [])
        rng.shuffle(pool)
        start = 0
        for split, _ in order:
            take = pool[start : start + quotas[split][label]]
            chosen[split].extend(take)
            start += len(take)
    splits = {}
    for split in ("train", "validation", "test"):
        indices = chosen[split]
        rng.shuffle(indices)
        splits[split] = TaskData(
            name=task.name,
            texts=[task.texts[i] for i in indices],
            labels=[task.labels[i] for i in indices],
            label_names=list(task.label_names),
            source=task.source,
        )
    return splits


def _shorten(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch every package and print, per task, the examples per class and two example texts."""
    names = list(argv if argv is not None else sys.argv[1:]) or list(TASKS)
    for name in names:
        task_packages(name)  # fail early on an unknown name
    fetch_debs(package for name in names for package in task_packages(name))
    for name in names:
        task = load_task(name)
        print(f"\n== {name}: {len(task)} examples, {task.num_classes} classes  [{task.source}]")
        print("   " + ", ".join(f"{label}: {count}" for label, count in task.class_counts().items()))
        picks = random.Random(0).sample(range(len(task)), k=min(2, len(task)))
        for i in picks:
            print(f"   [{task.label_names[task.labels[i]]}] {_shorten(task.texts[i])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
